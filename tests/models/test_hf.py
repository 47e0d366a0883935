"""HF import/export: logit parity with transformers PyTorch, round trips, and clear errors."""
import json
import struct

import jax
import numpy as np
import pytest

import hf_fixtures
from sentijax import models

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  model = hf_fixtures.make_llama(path)
  return path, model


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen2")
  model = hf_fixtures.make_qwen2(path)
  return path, model


@pytest.mark.parametrize("which", ["llama", "qwen"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logit_parity_with_transformers(which, side, llama_dir, qwen_dir):
  path, model = llama_dir if which == "llama" else qwen_dir
  cfg, params = models.load_hf(path, dtype="float32")
  if which == "llama":
    assert cfg.rope_scaling is not None and cfg.tie_embeddings and not cfg.qkv_bias
    assert "lm_head" not in params
  else:
    assert cfg.qkv_bias and not cfg.tie_embeddings and "lm_head" in params
  rng = np.random.default_rng(0)
  ids, mask = hf_fixtures.padded_batch(rng, cfg.vocab_size, [37, 12, 25, 37], side)
  ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
  ref = hf_fixtures.torch_logits(model, ids, mask)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  real = mask.astype(bool)
  assert np.abs(ours[real] - ref[real]).max() <= 1e-4


def test_long_positions_exercise_llama3_scaling(llama_dir):
  # Positions past original_max_position_embeddings (64) hit every llama3 frequency band.
  path, model = llama_dir
  cfg, params = models.load_hf(path)
  ids = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(1, 200))
  mask = np.ones_like(ids)
  ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
  assert np.abs(ours - hf_fixtures.torch_logits(model, ids, mask)).max() <= 1e-4


def test_export_reload_in_transformers_and_bit_identical_roundtrip(llama_dir, qwen_dir, tmp_path):
  from transformers import AutoModelForCausalLM
  for i, (path, _) in enumerate([llama_dir, qwen_dir]):
    cfg, params = models.load_hf(path)
    out = tmp_path / f"export{i}"
    models.save_hf(cfg, params, out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = hf_fixtures.padded_batch(np.random.default_rng(2), cfg.vocab_size, [9, 16], "left")
    ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
    ref = hf_fixtures.torch_logits(reloaded, ids, mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    cfg2, params2 = models.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params2)


def test_sharded_export_with_index_and_bf16(llama_dir, tmp_path):
  path, _ = llama_dir
  cfg, params = models.load_hf(path)
  out = tmp_path / "sharded"
  written = models.save_hf(cfg, params, out, dtype="bfloat16", max_shard_bytes=20_000)
  assert (out / "model.safetensors.index.json").is_file()
  shards = sorted(out.glob("model-*.safetensors"))
  assert len(shards) > 2 and written == out
  cfg2, params2 = models.load_hf(out, dtype="bfloat16")
  assert cfg2.param_dtype == "bfloat16"
  want = jax.tree.map(lambda a: np.asarray(a).astype(jax.numpy.bfloat16), params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params2, want)
  # The safetensors library reads our files (bf16 included).
  from safetensors import safe_open
  with safe_open(str(shards[0]), framework="flax") as f:
    assert len(list(f.keys())) >= 1


def test_tokenizer_saved_and_vocab_checked(tmp_path):
  from sentijax.data import tokenizer as tok_lib
  hf_fixtures.make_llama(tmp_path / "model", vocab_size=300)
  cfg, params = models.load_hf(tmp_path / "model")
  texts = ["the food was great", "terrible service, never again", "okay I guess"] * 20
  tok = tok_lib.train_tokenizer(texts, vocab_size=cfg.vocab_size, out_dir=tmp_path / "tok")
  out = models.save_hf(cfg, params, tmp_path / "with_tok", tokenizer=tok)
  assert len(tok_lib.load_tokenizer(out)) == len(tok)
  big = tok_lib.train_tokenizer(texts + [f"word{i}" for i in range(400)],
                                vocab_size=cfg.vocab_size + 200, out_dir=tmp_path / "big")
  assert len(big) > cfg.vocab_size
  with pytest.raises(models.CheckpointError, match="vocab_size"):
    models.check_tokenizer(cfg, big)
  with pytest.raises(models.CheckpointError, match="vocab_size"):
    models.save_hf(cfg, params, tmp_path / "bad", tokenizer=big)


# ---------------------------------------------------------------------------------------------
# Errors name the file, tensor or key.


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def test_missing_and_corrupt_config(llama_dir, tmp_path):
  path, _ = llama_dir
  with pytest.raises(models.CheckpointError, match="not found"):
    models.load_hf(tmp_path / "nope")
  d = _copy(path, tmp_path / "noconfig")
  (d / "config.json").unlink()
  with pytest.raises(models.CheckpointError, match=r"config\.json: not found"):
    models.load_hf(d)
  d = _copy(path, tmp_path / "badjson")
  (d / "config.json").write_text("{not json")
  with pytest.raises(models.CheckpointError, match=r"config\.json: corrupt JSON"):
    models.load_hf(d)
  d = _copy(path, tmp_path / "nokey")
  c = json.loads((d / "config.json").read_text())
  del c["hidden_size"]
  (d / "config.json").write_text(json.dumps(c))
  with pytest.raises(models.CheckpointError, match="'hidden_size'"):
    models.load_hf(d)


def test_unsupported_architecture(llama_dir, tmp_path):
  d = _copy(llama_dir[0], tmp_path / "gpt2")
  c = json.loads((d / "config.json").read_text())
  c["model_type"], c["architectures"] = "gpt2", ["GPT2LMHeadModel"]
  (d / "config.json").write_text(json.dumps(c))
  with pytest.raises(models.CheckpointError, match="unsupported architecture.*gpt2"):
    models.load_hf(d)


def test_missing_and_corrupt_safetensors(llama_dir, tmp_path):
  path, _ = llama_dir
  d = _copy(path, tmp_path / "nosafe")
  (d / "model.safetensors").unlink()
  with pytest.raises(models.CheckpointError, match="no model.safetensors"):
    models.load_hf(d)
  d = _copy(path, tmp_path / "trunc")
  raw = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(models.CheckpointError, match=r"model\.safetensors.*truncated"):
    models.load_hf(d)
  d = _copy(path, tmp_path / "garbage")
  (d / "model.safetensors").write_bytes(struct.pack("<Q", 50) + b"x" * 60)
  with pytest.raises(models.CheckpointError, match=r"model\.safetensors: corrupt"):
    models.load_hf(d)


def test_shape_mismatch_and_missing_tensor(llama_dir, tmp_path):
  path, _ = llama_dir
  d = _copy(path, tmp_path / "shape")
  c = json.loads((d / "config.json").read_text())
  c["intermediate_size"] = 96
  (d / "config.json").write_text(json.dumps(c))
  with pytest.raises(models.CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                                    r"has shape"):
    models.load_hf(d)
  d = _copy(path, tmp_path / "untied")
  c = json.loads((d / "config.json").read_text())
  c["tie_word_embeddings"] = False
  (d / "config.json").write_text(json.dumps(c))
  with pytest.raises(models.CheckpointError, match=r"'lm_head\.weight' is missing"):
    models.load_hf(d)
