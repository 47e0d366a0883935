"""`python tests/onpolicy_recorder.py --config=... [flags]`: the `sentijax.main` job, recording
what every on-policy rollout hands the train step: at the end, process 0 writes each step's
global batch ("inputs", "sampled": all processes' rows, gathered) to <workdir>/rollouts.npz
(keys inputs_<i>, sampled_<i>)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's sentijax, as -m does

from absl import app  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from sentijax import main  # noqa: E402
from sentijax.train import onpolicy  # noqa: E402

_recorded: list[dict[str, np.ndarray]] = []
_rollout = onpolicy.Rollout.__call__


def _recording(self, state, batch):
  out, metrics = _rollout(self, state, batch)
  _recorded.append({k: np.asarray(multihost_utils.process_allgather(out[k], tiled=True))
                    for k in ("inputs", "sampled")})
  return out, metrics


def _main(argv):
  main.main(argv)
  import jax  # noqa: PLC0415 (initialised by the job)
  if jax.process_index() == 0:
    np.savez(Path(main._CONFIG.value.workdir) / "rollouts.npz",
             **{f"{k}_{i}": v for i, rows in enumerate(_recorded) for k, v in rows.items()})


if __name__ == "__main__":
  onpolicy.Rollout.__call__ = _recording
  app.run(_main)
