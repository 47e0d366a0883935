"""KnowDist end to end: learning on the real teacher sample, NaN stop, kill/resume, main job."""
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from sentijax import config as config_lib
from kill_resume import start_main
from sentijax.train import knowdist, loop
from tolerances import assert_trees_close



def _config(workdir, **overrides):
  c = config_lib.base()
  c.workdir = str(workdir)
  c.model.dtype = "float32"
  c.data.seq_len = 256
  c.train.update(dict(steps=60, batch_size=8, learning_rate=3e-3, warmup_steps=5, log_every=20,
                      eval_every=30, eval_batches=2))
  c.checkpoint.every = 30
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def test_tiny_student_learns_the_real_teacher_sample(shared_dir, tmp_path):
  corpus = shared_dir / "teacher_corpus" / "mixtral_reviews_500.jsonl"
  result = knowdist.run(_config(tmp_path, **{"data.corpus": str(corpus)}))
  first, last = result.train_losses[0][1], result.train_losses[-1][1]
  assert result.step == 60
  assert last < first - 1.2, (first, last)  # ~6.9 -> ~5.3 in 60 steps
  (_, val_first), (_, val_last) = result.val_losses[0], result.val_losses[-1]
  assert [s for s, _ in result.val_losses] == [0, 30, 60]
  assert val_last < val_first - 1.0, result.val_losses
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


class _PoisonedData:
  """Wraps a dataset; the batch of global step `bad_step` gets a NaN loss weight."""

  def __init__(self, ds, bad_step):
    self.ds, self.bad_step, self.stats = ds, bad_step, ds.stats

  def batches(self, batch_size, **kw):
    return _PoisonedIterator(self.ds.batches(batch_size, **kw), self.bad_step)

  def batch_at(self, *a, **kw):
    return self.ds.batch_at(*a, **kw)

  def __getattr__(self, name):  # seq_len, prefetch, ...
    return getattr(self.ds, name)


class _PoisonedIterator:

  def __init__(self, inner, bad_step):
    self.inner, self.bad_step = inner, bad_step
    self.get_state, self.set_state = inner.get_state, inner.set_state

  def __next__(self):
    step = self.inner.step
    batch = next(self.inner)
    if step == self.bad_step:
      batch = dict(batch, weights=batch["weights"].copy())
      batch["weights"][0, 0] = np.nan
    return batch


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real_train = loop.train

  def poisoned(config, model_cfg, init_params, train_ds, val_ds=None, **kw):
    return real_train(config, model_cfg, init_params, _PoisonedData(train_ds, 7), val_ds, **kw)

  monkeypatch.setattr(loop, "train", poisoned)
  cfg = _config(tmp_path, **{"train.steps": 20, "checkpoint.every": 5, "train.eval_every": 0})
  with pytest.raises(loop.TrainingError, match=r"non-finite loss.*step 8.*Last good checkpoint: "
                                               r"step 5"):
    knowdist.run(cfg)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
      == [5]


# ---------------------------------------------------------------------------------------------
# The README's main command in a subprocess: SIGKILL mid-run, SIGTERM (preemption), resume.

STEPS = 40


def _main(workdir, **popen_kw):
  return start_main("knowdist", workdir, f"--config.train.steps={STEPS}",
                    "--config.checkpoint.every=5", "--config.train.eval_every=20", **popen_kw)


def _steps(workdir):
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _interrupt(workdir, sig, min_step):
  proc = _main(workdir)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if _steps(workdir) and _steps(workdir)[-1] >= min_step:
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _final_params(workdir):
  return safetensors.numpy.load_file(str(Path(workdir) / "hf" / "model.safetensors"))


def test_main_killed_and_preempted_resumes_to_identical_params(tmp_path):
  ref = _main(tmp_path / "ref")
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out[-3000:]
  assert "KnowDist done at step 40" in out
  assert (tmp_path / "ref" / "hf" / "config.json").is_file()

  work = tmp_path / "interrupted"
  code, out = _interrupt(work, signal.SIGKILL, min_step=10)
  assert code == -signal.SIGKILL, out[-3000:]  # really killed mid-run, not finished
  killed_at = _steps(work)[-1]
  assert 10 <= killed_at < STEPS
  code, out = _interrupt(work, signal.SIGTERM, min_step=killed_at + 5)
  assert code == 0, out[-3000:]
  assert f"resumed from {work / 'checkpoints'} at step {killed_at}" in out
  assert "preemption signal: saved step" in out
  assert _steps(work)[-1] < STEPS
  final = _main(work)
  out, _ = final.communicate(timeout=600)
  assert final.returncode == 0, out[-3000:]
  assert "KnowDist done at step 40" in out

  want, got = _final_params(tmp_path / "ref"), _final_params(work)
  assert want.keys() == got.keys()
  # Same compiled steps on the same data: normally bit-identical. The bound (1e-5 of each tensor's
  # largest element, ~100 fp32 ulps) only admits reduction-order noise; one skipped, repeated or
  # reordered step of 40 (lr ~3e-3 against weights ~0.02..1) is >1e-3 of that scale.
  assert_trees_close(got, want)


def test_student_initialised_from_hf_dir_and_exported(tmp_path):
  """model.init = an HF directory (weights + tokenizer): training starts from those weights."""
  import hf_fixtures
  from sentijax import models
  from sentijax.data import readers, records, tokenizer
  model_dir = tmp_path / "student"
  hf_fixtures.make_llama(model_dir, vocab_size=512)
  texts = [t for r in readers.read_corpus(records.demo_corpus_path())[0] for t in (r.prompt,
                                                                               r.response)]
  tokenizer.train_tokenizer(texts, 512, model_dir)
  cfg = _config(tmp_path / "run", **{"model.init": str(model_dir), "train.steps": 4,
                                     "train.eval_every": 0, "checkpoint.every": 4,
                                     "train.learning_rate": 1e-3})
  cfg.export_hf = True
  result = knowdist.run(cfg)
  assert result.step == 4
  _, start = models.load_hf(model_dir)
  _, trained = models.load_hf(tmp_path / "run" / "hf")
  q0, q1 = start["layers"]["attn"]["q_kernel"], trained["layers"]["attn"]["q_kernel"]
  diff = float(np.abs(np.asarray(q0) - np.asarray(q1)).max())
  assert 0 < diff < 0.05  # moved by a few small steps from the imported weights, not re-initialised
  assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()


def test_sentibench_scored_during_training(sentibench_dir, tmp_path):
  cfg = _config(tmp_path, **{"train.steps": 4, "train.eval_every": 2, "checkpoint.every": 4,
                             "train.peak_tflops": 1.0})  # CPU has no known peak: MFU needs one
  cfg.eval.data_dir = str(sentibench_dir)
  cfg.eval.during_training = "sc/sst2,absa/atsa_rest16"
  cfg.eval.seeds = "42"
  cfg.eval.max_examples = 4
  cfg.eval.max_new_tokens = 8
  knowdist.run(cfg)
  import json
  for step in (2, 4):
    res = json.loads((tmp_path / "sentibench" / f"step_{step}.json").read_text())
    assert set(res["datasets"]) == {"sc/sst2", "absa/atsa_rest16"}
    assert 0.0 <= res["average"] <= 100.0
  events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").glob("events.*"))
  for tag in (b"eval/sentibench/average", b"eval/sentibench/sc/sst2", b"eval/loss",
              b"train/loss", b"train/mfu"):
    assert tag in events, tag


def test_export_job_writes_any_kept_checkpoint(tmp_path):
  import ml_collections
  from sentijax import models
  from sentijax.train import export
  cfg = _config(tmp_path, **{"train.steps": 6, "train.eval_every": 0, "checkpoint.every": 3,
                             "checkpoint.keep": 3})
  result = knowdist.run(cfg)
  assert not (tmp_path / "hf").exists()  # export_hf is off: the export job does it
  cfg.export = ml_collections.ConfigDict({"step": 0, "dir": "", "dtype": ""})
  out = export.run(cfg)
  cfg_hf, params = models.load_hf(out)
  assert cfg_hf.vocab_size == models.presets.get("tiny").vocab_size
  np.testing.assert_array_equal(np.asarray(params["embedding"]),
                                np.asarray(result.params["embedding"]))
  cfg.export.update(step=3, dir=str(tmp_path / "step3"), dtype="bfloat16")
  _, params3 = models.load_hf(export.run(cfg), dtype="bfloat16")
  assert not np.array_equal(np.asarray(params3["embedding"], np.float32),
                            np.asarray(params["embedding"]).astype(np.float32))
  cfg.workdir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="training run directory"):
    export.run(cfg)


def test_resume_refuses_changed_batch_size(tmp_path):
  knowdist.run(_config(tmp_path, **{"train.steps": 2, "train.eval_every": 0,
                                    "checkpoint.every": 2}))
  cfg = _config(tmp_path, **{"train.steps": 4, "train.eval_every": 0, "train.batch_size": 16})
  with pytest.raises(loop.TrainingError, match="batch_size=8.*16"):
    knowdist.run(cfg)
