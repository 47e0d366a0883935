"""Entry point: `python -m sentijax.main --config=configs/<job>.py [--config.a.b=v ...]`."""
import importlib
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)

JOBS = {
    "knowdist": "sentijax.train.knowdist",
    "icldist": "sentijax.train.icldist",
    "kd": "sentijax.train.kd",
    "pipeline": "sentijax.train.pipeline",
    "sentibench": "sentijax.eval.job",
    "export": "sentijax.train.export",
    "generate_knowdist": "sentijax.teacher.generate",
    "generate_icl": "sentijax.teacher.icl_job",
    "generate_topk": "sentijax.teacher.topk",
    "serve": "sentijax.serve",
}


def main(argv):
  del argv
  config = _CONFIG.value
  absl_logging.set_verbosity(absl_logging.WARNING)  # library chatter (orbax) off
  log = logging.getLogger("sentijax")
  log.setLevel(logging.INFO)
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
  from sentijax import distributed  # noqa: PLC0415 (after flags: may initialise JAX)
  distributed.initialize(config.distributed)
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r}; known jobs: {', '.join(JOBS)}")
  importlib.import_module(JOBS[config.job]).run(config)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
