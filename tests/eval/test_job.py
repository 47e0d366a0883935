"""The `sentibench` job end to end on a tiny HF checkpoint: files, schemas, table, plot, errors."""
import importlib.util
import json
import pathlib

import pytest

import hf_fixtures
from sentijax.eval import job, report

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[2]
DATASETS = ("sc/sst2", "absa/opener")
N = 8
N_EXTRACTION = 5  # eval.max_examples_extraction: its own item count for extraction datasets


def get_config():
  spec = importlib.util.spec_from_file_location("sentibench_config",
                                                REPO / "configs" / "sentibench.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sentibench_dir):
  path = tmp_path_factory.mktemp("job_model")
  hf_fixtures.make_llama(path, vocab_size=512)
  hf_fixtures.make_sentibench_tokenizer(sentibench_dir, path)  # tokenizer files next to the weights
  return path


def test_job_end_to_end(model_dir, sentibench_dir, tmp_path, capsys):
  config = get_config()
  assert config.job == "sentibench"
  config.model.init = str(model_dir)
  config.model.dtype = "float32"
  config.eval.data_dir = str(sentibench_dir)
  config.eval.datasets = ",".join(DATASETS)
  config.eval.seeds = "42"
  config.eval.max_examples = N
  config.eval.max_examples_extraction = N_EXTRACTION
  config.eval.max_new_tokens = 20
  config.workdir = str(tmp_path / "out")
  config.eval.compilation_cache = str(tmp_path / "xla")
  results = job.run(config)
  # Compiled programs land in the persistent cache: a second process compiles nothing.
  assert any((tmp_path / "xla").iterdir())

  out = tmp_path / "out"
  on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
  assert on_disk == results
  assert set(results) == {"datasets", "average", "aggregation", "settings"}
  assert list(results["datasets"]) == list(DATASETS)
  # What sentijax.compare refuses to compare across: k, templates, decoding budget, generation.
  settings = results["settings"]
  assert settings["k_shot"] == 4 and settings["max_new_tokens"] == 20, settings
  assert len(settings["templates"]) == 16 and settings["repetition_penalty"] == 1.0
  for entry in results["datasets"].values():
    assert set(entry) == {"seeds", "mean"} and set(entry["seeds"]) == {"42"}
    assert 0.0 <= entry["mean"] <= 100.0
  means = [e["mean"] for e in results["datasets"].values()]
  assert results["average"] == pytest.approx(sum(means) / len(means))

  cls = [json.loads(l) for l in (out / "predictions" / "sc_sst2_42.jsonl").read_text().splitlines()]
  assert [r["index"] for r in cls] == list(range(N))
  for r in cls:
    assert set(r) == {"index", "gold", "prediction", "scores"}
    assert r["gold"] in ("negative", "positive") and r["prediction"] in ("negative", "positive")
    assert len(r["scores"]) == 2 and all(isinstance(x, float) for x in r["scores"])

  ext_path = out / "predictions" / "absa_opener_42.jsonl"
  ext = [json.loads(l) for l in ext_path.read_text().splitlines()]
  assert [r["index"] for r in ext] == list(range(N_EXTRACTION))
  for r in ext:
    assert set(r) == {"index", "gold", "prediction", "scores"} and r["scores"] == []
    assert r["gold"] and all(isinstance(t, list) and len(t) == 4 for t in r["gold"])
    assert isinstance(r["prediction"], list)
    assert all(isinstance(t, list) for t in r["prediction"])

  md = (out / "results.md").read_text(encoding="utf-8")
  assert "basic" in md and "fine-grained" in md and "Average" in md and "seed 42" in md
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Average" in capsys.readouterr().out
  assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_report_table_groups_categories(tmp_path):
  results = {"datasets": {
      "absa/opener": {"seeds": {"42": 10.0, "52": 20.0}, "mean": 15.0},
      "sc/sst2": {"seeds": {"42": 90.0, "52": 80.0}, "mean": 85.0},
      "sc/imdb": {"seeds": {"42": 70.0}, "mean": 70.0}}, "average": 56.6667}
  md = report.markdown_table(results)
  lines = md.splitlines()
  assert lines[0] == "| Category | Dataset | seed 42 | seed 52 | Mean |"
  body = [l for l in lines[2:]]
  assert body[0].startswith("| basic | sc/imdb | 70.00 | – | 70.00")
  assert body[1].startswith("| basic | sc/sst2 | 90.00 | 80.00 | 85.00")
  assert "*basic mean*" in body[2] and "*77.50*" in body[2]
  assert body[3].startswith("| fine-grained | absa/opener")
  assert "**Average** (3 of 12 datasets)" in body[-1] and "**56.67**" in body[-1]
  md_path, png_path = report.write_report(results, tmp_path)
  assert pathlib.Path(png_path).stat().st_size > 1000 and pathlib.Path(md_path).is_file()


def test_job_errors(sentibench_dir, tmp_path, model_dir):
  config = get_config()
  config.eval.data_dir = str(sentibench_dir)
  config.eval.datasets = "sc/sst2"
  config.workdir = str(tmp_path)
  with pytest.raises(ValueError, match="model.init"):
    job.run(config)
  config.model.init = str(model_dir)
  config.eval.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="data directory"):
    job.run(config)
  config.eval.data_dir = str(sentibench_dir)
  config.eval.datasets = "sc/sst3"
  with pytest.raises(ValueError, match="unknown SentiBench dataset"):
    job.run(config)
  config.eval.datasets = "sc/sst2"
  config.model.init = str(tmp_path / "no_model")
  with pytest.raises(FileNotFoundError, match="model.init"):
    job.run(config)


def test_load_model_honours_init_layers_and_keeps_params_in_model_dtype(model_dir):
  """The sentibench job builds its model as training does (models.factory): model.init_layers
  keeps those layers (the job used to load every layer), params in model.dtype (bf16 here, not
  the trainer's fp32 master copy), on the mesh."""
  import jax
  import numpy as np
  from sentijax import models, sharding
  config = get_config()
  config.model.init, config.model.init_layers, config.model.dtype = str(model_dir), "1", "bfloat16"
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  cfg, params, tokenizer = job.load_model(config, sharding.Placement(mesh, config.sharding_rules))
  assert (cfg.num_layers, cfg.dtype, cfg.param_dtype, cfg.remat) == (1, "bfloat16", "bfloat16",
                                                                      False)
  _, full = models.load_hf(model_dir, dtype="bfloat16")  # both layers, single device
  want = jax.tree.map(np.asarray, full)
  want["layers"] = jax.tree.map(lambda a: a[[1]], want["layers"])
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(params)):
    assert g.dtype == w.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=jax.tree_util.keystr(path))
  assert len(tokenizer) <= cfg.vocab_size


def test_training_provenance_names_the_sentibench_tasks_trained_on(tmp_path):
  assert job.training_provenance(tmp_path) is None  # a base model
  audit = {"heldout_tasks": ["sc/sst2", "atsa/laptop14"],
           "sources": {"sc/imdb": {"examples": 3000, "dropped": 2},
                       "absa/acsa_rest16": {"examples": 2000, "dropped": 2000},  # all dropped
                       "emotion/chat": {"examples": 50, "dropped": 0}}}
  (tmp_path / "heldout_audit.json").write_text(json.dumps(audit))
  got = job.training_provenance(tmp_path)
  assert (got["trained_on"], got["heldout"]) == (["sc/imdb"], ["sc/sst2"])
  (tmp_path / "heldout_audit.json").write_text(json.dumps({"sources": {}}))
  with pytest.raises(ValueError, match="heldout_audit.json: not a held-out audit"):
    job.training_provenance(tmp_path)
