"""generate_icl: ICL builder prompts -> local teacher answers with the exact verbalizer
distribution, a corpus ICLDist reads; rerun adds nothing."""
import ast
import importlib
import importlib.util
import json
import pathlib
import shlex

import numpy as np
import pytest

from sentijax.teacher import icl_job

torch = pytest.importorskip("torch")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(teacher_dir, workdir):
  spec = importlib.util.spec_from_file_location("cfg_gen_icl", REPO / "configs/generate_icl.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(workdir)
  c.model.init = str(teacher_dir)
  c.icl.num_prompts = 6
  c.sampling.max_tokens = 8
  c.generate.leak_check = "off"  # also icl.leak_check: no SentiBench needed
  c.generate.progress = False
  return c


def test_icl_corpus_with_exact_verbalizer_probs(teacher_dir, tmp_path):
  from transformers import LlamaForCausalLM
  from sentijax.data import icl, readers, tokenizer as tok_lib
  from sentijax.data import icl_recipe
  config = _config(teacher_dir, tmp_path)
  summary = icl_job.run(config)
  assert summary["rejected"] == 0 and summary["written"] == summary["items"] >= 4
  records, _ = readers.read_records(tmp_path / "corpus.jsonl")
  tok = tok_lib.load_tokenizer(teacher_dir)
  model = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
  tasks = {"sc/products", "sc/restaurants", "emotion/chat"}
  for r in records:
    assert r.meta["task"] in tasks and r.response.startswith(" ") and r.meta["gold"].strip()
    probs = r.meta["teacher_probs"]
    assert set(probs) <= set(r.meta["verbalizers"]) and 0 < sum(probs.values()) <= 1 + 1e-6
    ids = torch.tensor([tok(r.prompt)["input_ids"]])
    with torch.no_grad():
      ref = torch.softmax(model(ids).logits[0, -1].double(), -1).numpy()
    for v, p in probs.items():
      # fp32 logits agree to ~1e-5 of their size (~10 here): probabilities to ~1e-4 relative.
      np.testing.assert_allclose(p, ref[tok(v, add_special_tokens=False)["input_ids"][0]],
                                 rtol=2e-4)
  assert icl_job.run(config)["written"] == 0  # rerun: nothing new
  config.icl.target, config.icl.teacher_corpus = "teacher_probs", str(tmp_path / "corpus.jsonl")
  spec = icl_recipe.RecipeSpec.from_config(config)
  sources, heldout, groups = icl_recipe.resolve_tasks(spec)
  train, val, _ = icl_recipe.teacher_records(spec, sources, heldout,
                                            icl.forbidden_sentences(groups))
  assert len(train) + len(val) == len(records)


# ---------------------------------------------------------------------------------------------
# The commands of configs/generate_icl.py's docstring, run as written (in-process: main's flag
# parsing, then the job), from a directory laid out like the repo root: configs/ and ../shared.


def _docstring_commands() -> list[list[str]]:
  """Each `python -m sentijax.main ...` command of the config's docstring, as argv after main."""
  doc = ast.get_docstring(ast.parse((REPO / "configs/generate_icl.py").read_text()))
  lines = doc.replace("\\\n", " ").splitlines()
  cmds = [shlex.split(x) for x in lines if x.strip().startswith("python -m sentijax.main")]
  assert cmds and all(c[:3] == ["python", "-m", "sentijax.main"] for c in cmds)
  return [c[3:] for c in cmds]


def _run_main(argv: list[str]):
  from absl import flags
  from ml_collections import config_flags
  from sentijax import main
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=["main"] + argv)  # registers the override flags
  values(["main"] + argv)
  config = values.config
  return importlib.import_module(main.JOBS[config.job]).run(config)


@pytest.fixture
def repo_root(tmp_path, shared_dir, monkeypatch):
  """cwd = <tmp>/repo holding configs/ (the repo's), with <tmp>/shared = ../shared."""
  (tmp_path / "repo").mkdir()
  (tmp_path / "repo" / "configs").symlink_to(REPO / "configs")
  (tmp_path / "shared").symlink_to(shared_dir)
  monkeypatch.chdir(tmp_path / "repo")
  return tmp_path / "repo"


def _flag(argv: list[str], key: str) -> str:
  return [a.split("=", 1)[1] for a in argv if a.startswith(f"--config.{key}=")][-1]


# Sizes only: fewer prompts, shorter answers; 1 training step scored once (at the end) on 1
# example per held-out task.
GEN_SIZE = ["--config.icl.num_prompts=6", "--config.sampling.max_tokens=4",
            "--config.generate.progress=False"]
TRAIN_SIZE = ["--config.train.steps=1", "--config.checkpoint.every=1",
              "--config.train.eval_every=0", "--config.eval.max_examples=1"]


def test_docstring_local_commands_run_as_written(repo_root):
  """The default teacher corpus, then ICLDist with icl.target=teacher_probs on it."""
  generate, train, _ = _docstring_commands()
  summary = _run_main(generate + GEN_SIZE)
  assert summary["written"] == summary["items"] >= 4 and summary["rejected"] == 0
  corpus = repo_root / _flag(train, "icl.teacher_corpus")
  assert corpus.is_file()
  result = _run_main(train + TRAIN_SIZE)
  assert result.step == 1 and np.isfinite(result.train_losses[-1][1])
  stats = json.loads((repo_root / "runs/icldist/data_stats.json").read_text())
  assert stats["train"]["num_soft_targets"] > 0 and stats["icl"]["no_distribution"] == 0


def test_docstring_served_command_runs_as_written(repo_root, local_teacher, teacher_dir):
  """Against sentijax.serve on 127.0.0.1 (the tiny teacher); the placeholders MODEL,
  /models/MODEL and the server's address are filled in."""
  from sentijax import serve
  from sentijax.data import readers
  *_, served = _docstring_commands()
  srv = serve.Server(local_teacher, "tiny", max_batch=4, max_wait_ms=20).start()
  try:
    argv = [a.replace("http://127.0.0.1:8000/v1", srv.url).replace("/models/MODEL",
                                                                   str(teacher_dir))
            .replace("=MODEL", "=tiny") for a in served]
    assert argv != served
    summary = _run_main(argv + GEN_SIZE)
  finally:
    srv.stop()
  assert summary["written"] == summary["items"] >= 4 and summary["rejected"] == 0
  records, _ = readers.read_records(repo_root / _flag(served, "workdir") / "corpus.jsonl")
  held = set(_flag(served, "icl.heldout").split(","))
  assert len(records) == summary["written"] and not held & {r.meta["task"] for r in records}
