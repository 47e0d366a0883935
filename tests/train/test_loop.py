"""The training loop's bookkeeping: tokens/s timed over training steps only, MFU absent when the
peak is unknown, log_every=0, and the config's `batch` sharding rule placing the batches."""
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sentijax import checkpoint, metrics
from sentijax import config as config_lib
from sentijax.train import knowdist, loop
from sentijax.train import step as step_lib

PAUSED = 1000.0  # fake seconds spent compiling, evaluating or saving: never part of tokens/s


def _config(workdir, **train):
  c = config_lib.base()
  c.workdir = str(workdir)
  c.model.dtype = "float32"
  c.data.seq_len = 128
  c.train.update(dict(batch_size=8, learning_rate=3e-3, warmup_steps=1, eval_batches=1, **train))
  return c


@pytest.fixture
def recorded(monkeypatch):
  """Fake clock (1 s per train step, PAUSED per compile / eval batch / save) and the logged
  train scalars, the tokens of each train step and the batch shardings the step was built with."""
  rec = {"now": 0.0, "train": {}, "tokens": [], "batch_sh": []}
  monkeypatch.setattr(metrics.Throughput, "clock", staticmethod(lambda: rec["now"]))

  real_train_step, real_eval_step = step_lib.jit_train_step, step_lib.jit_eval_step

  def jit_train_step(spec, placement, state_sh, batch_sh, *a, **kw):
    fn = real_train_step(spec, placement, state_sh, batch_sh, *a, **kw)
    rec["batch_sh"].append(batch_sh)

    def run(state, batch):
      rec["now"] += PAUSED if not rec["tokens"] else 1.0  # the first call compiles
      rec["tokens"].append(int(np.count_nonzero(np.asarray(batch["segment_ids"]))))
      return fn(state, batch)
    return run

  def jit_eval_step(*a, **kw):
    fn = real_eval_step(*a, **kw)

    def run(*args):
      rec["now"] += PAUSED
      return fn(*args)
    return run

  real_save, real_write = checkpoint.Checkpointer.save, metrics.MetricWriter.write

  def save(self, *a, **kw):
    rec["now"] += PAUSED
    return real_save(self, *a, **kw)

  def write(self, step, scalars, prefix=""):
    if prefix == "train/":
      rec["train"][step] = {k: v for k, v in scalars.items() if v is not None}
    return real_write(self, step, scalars, prefix)

  monkeypatch.setattr(step_lib, "jit_train_step", jit_train_step)
  monkeypatch.setattr(step_lib, "jit_eval_step", jit_eval_step)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  monkeypatch.setattr(metrics.MetricWriter, "write", write)
  return rec


def test_tokens_per_s_log_every_and_batch_rule(tmp_path, recorded):
  rules = tuple(r for r in config_lib.base().sharding_rules if r[0] != "batch")
  cfg = _config(tmp_path, steps=8, log_every=2, eval_every=3, microbatches=2)
  cfg.mesh.update(data=2, fsdp=4)
  cfg.checkpoint.every = 4
  # Default rule: batches over data x fsdp = 8 devices, so microbatches of 4 rows cannot split.
  with pytest.raises(loop.TrainingError, match=r"multiple of 8.*\('data', 'fsdp'\)"):
    knowdist.run(cfg)
  cfg.sharding_rules = (("batch", "data"),) + rules  # over `data` (2) only: 4-row microbatches
  # Logged at 2, 4, 6, 8; eval after 3 and 6; saves after 4 and 8; step 1 compiles.
  knowdist.run(cfg)
  assert recorded["batch_sh"][-1].spec == P("data", None)
  logged = recorded["train"]
  assert sorted(logged) == [2, 4, 6, 8]
  tokens = recorded["tokens"]
  assert len(tokens) == 8 and min(tokens) > 0
  for step, scalars in logged.items():
    # A window holds 1-3 timed steps of 1 fake second each: >= min(tokens) / 3 tokens per second.
    # Counting one compile, eval or save (PAUSED s) would give <= 4 * max(tokens) / PAUSED.
    assert scalars["tokens_per_s"] >= min(tokens) / 3, (step, scalars)
    assert scalars["tokens_per_s"] <= 3 * max(tokens), (step, scalars)
    assert scalars["tflops_per_device"] > 0
    assert "mfu" not in scalars  # CPU: no peak FLOP/s known, so no MFU (not a fake 0)

  # log_every=0: the resumed run trains steps 9-10 and logs no train metrics (no division by 0).
  recorded["train"].clear()
  cfg.train.update(steps=10, log_every=0, eval_every=0)
  result = knowdist.run(cfg)
  assert [s for s, _ in result.train_losses] == [9, 10]
  assert recorded["train"] == {}
  cfg.train.log_every = -1
  with pytest.raises(loop.TrainingError, match=r"train.log_every=-1 must be >= 0"):
    knowdist.run(cfg)
