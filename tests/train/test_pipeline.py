"""Pipeline stage configs: `model.init_layers` cuts model.init for the first stage only; a later
stage starts from the previous stage's export, which already has just those layers."""
import runpy
from pathlib import Path

from sentijax.train import pipeline

REPO = Path(__file__).resolve().parents[2]


def test_init_layers_apply_to_the_first_stage_only():
  config = runpy.run_path(str(REPO / "configs" / "pipeline.py"))["get_config"]()
  config.model.init, config.model.init_layers = "/models/smollm2", "0,3,6"
  first = pipeline.stage_config(config, "knowdist", "/models/smollm2")
  assert (first.model.init, first.model.init_layers) == ("/models/smollm2", "0,3,6")
  later = pipeline.stage_config(config, "icldist", "runs/p/knowdist/hf")
  assert (later.model.init, later.model.init_layers) == ("runs/p/knowdist/hf", "")
  assert config.model.init_layers == "0,3,6"  # the shared config is untouched
