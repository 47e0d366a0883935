"""The export job reads only the params of a checkpoint, never the optimizer state."""
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.data import tokenizer as tok_lib
from sentijax.train import export
from sentijax.train import state as state_lib

GENERATION_CONFIG = '{"eos_token_id": [2, 7], "repetition_penalty": 1.3}'
JUNK = 8 << 20  # floats in the stand-in optimizer state: 32 MiB, ~100x the tiny model's params


def _read_bytes() -> int:
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _workdir(tmp_path):
  """A run directory: student spec + one checkpoint whose optimizer state is big and of a
  structure no optimizer builds (restoring the whole state into the job's target would fail)."""
  cfg = models.presets.get("tiny")
  texts = ["the food was great", "terrible service", "okay I guess"] * 20
  tok = tok_lib.train_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
  init = tmp_path / "init"  # the HF dir training started from: its generation config travels
  init.mkdir()
  (init / "generation_config.json").write_text(GENERATION_CONFIG)
  export.save_student_spec(cfg, tok, tmp_path, init)
  params = models.init(cfg, 3)
  state = state_lib.TrainState(step=np.int32(7), params=params,
                               opt_state={"junk": np.random.default_rng(0).standard_normal(
                                   JUNK, dtype=np.float32)})
  manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute(),
                                  options=ocp.CheckpointManagerOptions(
                                      enable_async_checkpointing=False))
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave({"step": 7})), force=True)
  manager.wait_until_finished()
  manager.close()
  return cfg, params


def test_export_restores_params_only(tmp_path):
  cfg, params = _workdir(tmp_path)
  config = config_lib.base()
  config.workdir = str(tmp_path)
  config.model.dtype = "float32"
  config.export = ml_collections.ConfigDict({"step": 0, "dir": "", "dtype": ""})
  (tmp_path / "heldout_audit.json").write_text('{"heldout_tasks": []}')
  out = export.run(config)  # the job works without an optimizer state it could restore
  # What travels with the weights: the init's generation config (eos ids, repetition penalty:
  # SentiBench scores with them) and the ICLDist audit.
  assert (out / "generation_config.json").read_text() == GENERATION_CONFIG
  assert (out / "heldout_audit.json").read_text() == '{"heldout_tasks": []}'
  _, exported = models.load_hf(out)
  for a, b in zip(_leaves(exported), _leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Bytes read by a (warm: imports done) params-only restore vs a whole-state restore.
  mesh = sharding.make_mesh(config.mesh, model_cfg=cfg)
  target = export.params_target(cfg, mesh, config.sharding_rules)
  before = _read_bytes()
  restored, step = export.restore_params(tmp_path / "checkpoints", target)
  read = _read_bytes() - before
  assert step == 7
  for a, b in zip(_leaves(restored), _leaves(params)):
    np.testing.assert_array_equal(a, b)
  manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  before = _read_bytes()
  whole = manager.restore(7, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  read_whole = _read_bytes() - before
  manager.close()
  assert whole["state"]["opt_state"]["junk"].size == JUNK
  # The measure sees the optimizer state when it is read (stored zstd-compressed: ~94%).
  assert read_whole >= 0.8 * JUNK * 4, read_whole
  assert read < JUNK * 4 / 8, f"params-only restore read {read} bytes, whole state {read_whole}"


def test_params_target_holds_only_params():
  cfg = models.presets.get("tiny")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  target = export.params_target(cfg, mesh, config_lib.base().sharding_rules)
  assert list(target) == ["params"]
  emb = target["params"]["embedding"]
  assert emb.shape == (cfg.vocab_size, cfg.hidden_size) and "fsdp" in str(emb.sharding.spec)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
