"""The training hook: what one step writes (results, predictions) and the item limits it takes
from config.eval, through its one Scorer."""
import json

import pytest

import hf_fixtures
from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.eval import hooks, scorer

torch = pytest.importorskip("torch")


def test_hook_writes_each_step_with_the_item_limits_per_task_kind(sentibench_dir, tmp_path,
                                                                  monkeypatch):
  # Extraction answers are not the point here (tests/eval/test_generation.py decodes): no
  # answers, and no decode loop to compile.
  monkeypatch.setattr(scorer.Scorer, "generate", lambda self, params, texts, desc="":
                      [""] * len(texts))
  root = tmp_path / "model"
  tok = hf_fixtures.make_sentibench_tokenizer(sentibench_dir, root)
  hf_fixtures.make_llama(root, vocab_size=512, weight_std=0.3)
  config = config_lib.base()
  config.model.init, config.workdir = str(root), str(tmp_path / "run")
  config.eval.data_dir = str(sentibench_dir)
  config.eval.templates = str(sentibench_dir / "protocol.json")
  config.eval.during_training = "sc/sst2,absa/atsa_rest16"
  config.eval.seeds = "42"
  config.eval.max_examples, config.eval.max_examples_extraction = 6, 3
  cfg, params = models.load_hf(root, dtype="float32", mesh=sharding.make_mesh(config.mesh),
                               rules=config.sharding_rules)
  hook = hooks.ScoringHook(config, cfg, tok, config.eval.during_training)
  scalars = [hook(step, params) for step in (0, 2)]
  assert scalars[0] == scalars[1]  # same params, same scores
  out = tmp_path / "run" / "sentibench"
  for step, got in zip((0, 2), scalars):
    results = json.loads((out / f"step_{step}.json").read_text())
    assert list(results["datasets"]) == ["sc/sst2", "absa/atsa_rest16"]
    assert got == {"sentibench/average": results["average"],
                   **{f"sentibench/{n}": d["mean"] for n, d in results["datasets"].items()}}
    for name, n_items in (("sc_sst2", 6), ("absa_atsa_rest16", 3)):
      rows = (out / "predictions" / f"step_{step}" / f"{name}_42.jsonl").read_text().splitlines()
      assert [json.loads(r)["index"] for r in rows] == list(range(n_items))
  assert len(hook.scorer.loaded) == 2  # each task read once across steps
