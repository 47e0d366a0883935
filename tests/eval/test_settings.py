"""Scoring settings read from config.eval: datasets, seeds, data check, item limits, the spec."""
import pytest

from sentijax import config as config_lib
from sentijax.data import sentibench
from sentijax.eval import settings


def test_parse_config_values(sentibench_dir, tmp_path):
  assert settings.parse_seeds("42, 52,62") == [42, 52, 62]
  assert settings.parse_seeds(7) == [7] and settings.parse_seeds((1, 2)) == [1, 2]
  assert settings.parse_datasets("all") == list(sentibench.DATASETS)
  assert settings.parse_datasets("sc/sst2, absa/opener") == ["sc/sst2", "absa/opener"]
  with pytest.raises(ValueError, match="unknown SentiBench dataset"):
    settings.parse_datasets("sc/nope")
  with pytest.raises(ValueError, match="seeds"):
    settings.parse_seeds("a,b")
  with pytest.raises(FileNotFoundError, match="data directory"):
    settings.check_data(tmp_path / "missing", ["sc/sst2"])
  with pytest.raises(FileNotFoundError, match="sc/sst2"):
    settings.check_data(tmp_path, ["sc/sst2"])
  settings.check_data(sentibench_dir, list(sentibench.DATASETS))


def test_example_limits_per_task_kind():
  assert settings.example_limits(100, 50) == {"classification": 100, "extraction": 50}
  assert settings.example_limits(100) == {"classification": 100, "extraction": 100}
  assert settings.example_limits(0, 0) == {"classification": 0, "extraction": 0}
  with pytest.raises(ValueError, match="eval.max_examples_extraction"):
    settings.example_limits(100, -2)


def test_scoring_spec_reads_config_eval_once():
  ev = config_lib.base().eval
  ev.seeds, ev.max_examples, ev.max_examples_extraction = "42, 52", 100, 50
  ev.batch_size, ev.max_new_tokens, ev.aggregation = 8, 20, "official"
  spec = settings.ScoringSpec.from_config(ev, progress=True)
  assert spec == settings.ScoringSpec(ev.data_dir, (42, 52), 100, 50, 8, 20, "official", True)
  assert spec.limits == {"classification": 100, "extraction": 50}
  ev.max_examples_extraction = -1  # the default: extraction follows max_examples
  assert settings.ScoringSpec.from_config(ev).limits["extraction"] == 100
  for key, value, match in (("batch_size", 0, "eval.batch_size"),
                            ("aggregation", "median", "eval.aggregation"),
                            ("max_examples", -1, "eval.max_examples")):
    bad = config_lib.base().eval
    bad[key] = value
    with pytest.raises(ValueError, match=match):
      settings.ScoringSpec.from_config(bad)
