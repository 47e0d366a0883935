"""Teacher jobs and SentiBench test sentences: a check that cannot run stops the job; KnowDist
inputs holding a test sentence (in any tokenisation) are dropped, flagged or fail; responses
quoting one are listed."""
import importlib.util
import json
import logging
import pathlib

import pytest

from sentijax.sampling import SamplingSettings
from sentijax.teacher import generate, icl_job, inputs, leaks
from teacher import teacher_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[2]
# A stand-in SentiBench test split, PTB-tokenised as SST-2 is.
TEST_SENTENCES = ["the staff forgot our order twice and never apologised .",
                  "i ca n't recommend the lasagna enough -- it 's perfect .",
                  "not bad ."]
# User texts as they come in: raw punctuation, other case, quoted, inside longer text.
TEXTS = [
    {"id": "a", "text": "The staff forgot our order twice, and never apologised!"},
    {"id": "b", "text": "We went on Friday. I can't recommend the lasagna enough - it's "
                        "perfect. Parking was hard."},
    {"id": "c", "text": "Not bad."},
    {"id": "d", "text": "The staff forgot our order once and apologised twice."},
    {"id": "e", "text": "Not bad at all, the soup was hot and the bread fresh."},
]


def _sentibench(root: pathlib.Path) -> pathlib.Path:
  task = root / "sc" / "sst2"
  task.mkdir(parents=True)
  (task / "train.json").write_text(json.dumps([{"sentence": "fine .", "label": "positive"}]))
  (task / "test.json").write_text(json.dumps([{"sentence": s, "label": "negative"}
                                              for s in TEST_SENTENCES]))
  return root


def _config(name, workdir, **generate_overrides):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(workdir)
  c.generate.update(generate_overrides)
  return c


def test_missing_or_empty_leak_dirs_stop_every_teacher_job(tmp_path, caplog):
  """Before: a missing dir turned the check off with a warning, and the job ran unchecked."""
  for job in ("generate_knowdist", "generate_icl", "generate_topk"):
    config = _config(job, tmp_path / job, leak_check_dirs=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"generate.leak_check_dirs='.*nowhere': not "
                                                r"found: .*nowhere.*generate.leak_check=off"):
      generate.start_job(config)
  config = _config("generate_knowdist", tmp_path / "e", leak_check_dirs="")
  with pytest.raises(FileNotFoundError, match="leak_check_dirs='': empty"):
    generate.run(config)
  (tmp_path / "no-test" / "sc" / "x").mkdir(parents=True)
  (tmp_path / "no-test" / "sc" / "x" / "train.json").write_text('[{"sentence": "a", "label": "b"}]')
  with pytest.raises(FileNotFoundError, match="no task with a test split"):
    leaks.from_task_dirs(str(tmp_path / "no-test"))
  caplog.set_level(logging.WARNING, logger="sentijax")
  config = _config("generate_knowdist", tmp_path / "off", leak_check="off",
                   leak_check_dirs=str(tmp_path / "nowhere"))
  assert generate.start_job(config)[2] is None
  assert "generate.leak_check=off: inputs and responses are NOT checked" in caplog.text
  with pytest.raises(ValueError, match="generate.leak_check='no'"):
    generate.start_job(_config("generate_knowdist", tmp_path / "bad", leak_check="no"))


def test_generate_icl_builds_no_prompt_without_sentibench(tmp_path):
  """The ICL prompts of generate_icl keep SentiBench test sentences out (eval.data_dir), so a
  missing dir fails there too; generate.leak_check=off switches both checks off."""
  config = _config("generate_icl", tmp_path, leak_check_dirs=str(_sentibench(tmp_path / "sb")))
  config.eval.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"eval.data_dir='.*nowhere'.*icl.leak_check=off"):
    icl_job.build_items(config, None, SamplingSettings())
  config.generate.leak_check = "off"
  assert config.icl.leak_check == "off"
  items, _ = icl_job.build_items(config, None, SamplingSettings())
  assert len(items) >= 32


def test_checker_finds_variants_of_test_sentences(tmp_path):
  checker = leaks.from_task_dirs(str(_sentibench(tmp_path)))
  assert len(checker) == 3 and checker.task_of[TEST_SENTENCES[0]] == "sc/sst2"
  assert checker.hits(TEXTS[0]["text"]) == [TEST_SENTENCES[0]]
  assert checker.hits(TEXTS[1]["text"]) == [TEST_SENTENCES[1]]
  assert checker.hits("Summary: the customer says \u201cNOT BAD\u201d.") == [TEST_SENTENCES[2]]
  for t in TEXTS[3:]:
    assert checker.hits(t["text"]) == [], t


@pytest.mark.parametrize("on_leak", ["drop", "flag"])
def test_knowdist_inputs_and_responses_are_checked(tmp_path, on_leak):
  """generate_knowdist against a scripted server: texts a-c hold test sentences."""
  texts = tmp_path / "texts.jsonl"
  texts.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
  quote = 'The review repeats: "I can\'t recommend the lasagna enough -- it\'s perfect."'

  def script(n, body):
    del n
    if "Parking" in body["prompt"] or "bread fresh" in body["prompt"]:
      return 200, {}, json.dumps({"choices": [{"text": quote, "finish_reason": "stop"}],
                                  "usage": {"completion_tokens": 9}})
    return None
  server = fx.ScriptedServer(script)
  try:
    config = _config("generate_knowdist", tmp_path / "job", perspectives="polarity",
                     progress=False, leak_check_dirs=str(_sentibench(tmp_path / "sb")))
    config.teacher.update(backend="openai", base_url=server.url, model="tiny",
                          endpoint="completions", concurrency=1)
    config.inputs.update(path=str(texts), on_leak=on_leak)
    summary = generate.run(config)
  finally:
    server.stop()
  stats = summary["inputs"]
  assert stats["leaks"] == 3 and stats["on_leak"] == on_leak
  assert [x["id"] for x in stats["leak_ids"]] == ["a", "b", "c"]
  corpus = [json.loads(x) for x in (tmp_path / "job" / "corpus.jsonl").read_text().splitlines()]
  sources = [r["meta"]["source_id"] for r in corpus]
  assert sources == (["d", "e"] if on_leak == "drop" else ["a", "b", "c", "d", "e"])
  # The response quoting a test sentence (asked about text e, and b when kept) is listed.
  flagged = {x["id"] for x in summary["leaks"]["ids"]}
  assert {r["id"] for r in corpus if r["response"] == quote} == flagged
  assert summary["leaks"]["records"] == (1 if on_leak == "drop" else 2)


def test_knowdist_input_with_a_test_sentence_can_fail_the_job(tmp_path):
  path = tmp_path / "texts.jsonl"
  path.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
  checker = leaks.from_task_dirs(str(_sentibench(tmp_path / "sb")))
  spec = inputs.InputSpec(path=str(path), on_leak="fail")
  with pytest.raises(inputs.InputError, match=r"texts.jsonl, line 1: text 'a' holds a SentiBench "
                                              r"test sentence.*inputs.on_leak=drop"):
    inputs.load_texts(spec, checker)
  with pytest.raises(inputs.InputError, match="inputs.on_leak='keep'"):
    inputs.InputSpec(on_leak="keep")
