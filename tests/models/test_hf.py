"""HF import/export: logit parity with transformers PyTorch, round trips, and clear errors."""
import json
import struct

import jax
import numpy as np
import pytest

import hf_fixtures
from sentijax import models
from sentijax.models import hf, hf_config

torch = pytest.importorskip("torch")

# fp32 logits of two implementations (XLA vs torch) differ by rounding only: measured ~4e-7 of the
# largest logit; 1e-5 leaves room for other CPUs (vector width, FMA, threads) and still fails on
# any real mapping or RoPE error (those move logits by percent).
PARITY_REL = 1e-5


def _assert_close(got, want, rel=PARITY_REL, what="logits"):
  """max |got - want| <= rel * max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x max |value| {scale:.3g}"


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


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("mistral")
  model = hf_fixtures.make_mistral(path)
  return path, model


@pytest.mark.parametrize("which", ["llama", "qwen", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logit_parity_with_transformers(which, side, llama_dir, qwen_dir, mistral_dir):
  path, model = {"llama": llama_dir, "qwen": qwen_dir, "mistral": mistral_dir}[which]
  cfg, params = models.load_hf(path, dtype="float32")
  if which == "llama":
    assert cfg.rope_scaling is not None and cfg.tie_embeddings and not cfg.qkv_bias
    assert "lm_head" not in params
  elif which == "qwen":
    assert cfg.qkv_bias and not cfg.tie_embeddings and "lm_head" in params
  else:
    assert cfg.architecture == "mistral" and cfg.rope_scaling is None and cfg.rope_theta == 1e6
    assert not cfg.qkv_bias and not cfg.tie_embeddings and "lm_head" in params
  rng = np.random.default_rng(0)
  ids, mask = hf_fixtures.padded_batch(rng, cfg.vocab_size, [37, 12, 25, 37], side)
  ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
  ref = hf_fixtures.torch_logits(model, ids, mask)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  real = mask.astype(bool)
  _assert_close(ours[real], ref[real])


def test_long_positions_exercise_llama3_scaling(llama_dir):
  # Positions past original_max_position_embeddings (64) hit every llama3 frequency band.
  path, model = llama_dir
  cfg, params = models.load_hf(path)
  ids = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(1, 200))
  mask = np.ones_like(ids)
  ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
  _assert_close(ours, hf_fixtures.torch_logits(model, ids, mask))


def _reload_logits(out, ids, mask):
  from transformers import AutoModelForCausalLM
  reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  return hf_fixtures.torch_logits(reloaded, ids, mask)


def test_export_reload_in_transformers_and_bit_identical_roundtrip(llama_dir, qwen_dir,
                                                                   mistral_dir, tmp_path):
  for i, (path, _) in enumerate([llama_dir, qwen_dir, mistral_dir]):
    cfg, params = models.load_hf(path)
    out = tmp_path / f"export{i}"
    models.save_hf(cfg, params, out)
    # 200 positions: past original_max_position_embeddings (64), every llama3 band is used.
    ids, mask = hf_fixtures.padded_batch(np.random.default_rng(2), cfg.vocab_size, [9, 200], "left")
    ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
    real = mask.astype(bool)
    _assert_close(_reload_logits(out, ids, mask)[real], ours[real])
    # A 4.x reader (and vLLM) sees only rope_theta + rope_scaling: drop transformers 5's key.
    c = json.loads((out / "config.json").read_text())
    del c["rope_parameters"], c["dtype"]
    (out / "config.json").write_text(json.dumps(c))
    _assert_close(_reload_logits(out, ids, mask)[real], ours[real], what="4.x-style config")
    cfg2, params2 = models.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params2)


# Keys transformers itself writes whose values every reader relies on.
_COMMON_KEYS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
                "bos_token_id", "eos_token_id", "attention_dropout", "initializer_range",
                "use_cache"]
_ARCH_KEYS = {"llama": ["head_dim", "attention_bias", "mlp_bias", "pretraining_tp"],
              "qwen2": ["use_sliding_window", "sliding_window", "layer_types"],
              "mistral": ["head_dim", "sliding_window"]}
_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              bos_token_id=1, eos_token_id=[2, 3])


@pytest.mark.parametrize("case", ["llama3", "plain", "qwen2", "mistral"])
def test_exported_config_json_field_by_field(case):
  from transformers import LlamaConfig, MistralConfig, Qwen2Config
  if case == "mistral":
    theirs = MistralConfig(**_SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           sliding_window=None, head_dim=32,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    legacy = {"rope_theta": 1e6, "rope_scaling": None}
  elif case == "qwen2":
    theirs = Qwen2Config(**_SHAPE, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    legacy = {"rope_theta": 1e6, "rope_scaling": None}
  elif case == "plain":
    theirs = LlamaConfig(**_SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    legacy = {"rope_theta": 5e5, "rope_scaling": None}
  else:
    theirs = LlamaConfig(**_SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters=dict(hf_fixtures.LLAMA3_ROPE), head_dim=32)
    # As in the published Llama-3.1/3.2 config.json.
    legacy = {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}
  want = theirs.to_dict()
  cfg = hf_config.config_from_hf(want)
  written = json.loads(json.dumps(hf_config.config_to_hf(cfg, dtype="bfloat16")))
  for key in _COMMON_KEYS + _ARCH_KEYS[cfg.architecture]:
    assert written[key] == want[key], (key, written[key], want[key])
  for key, value in legacy.items():
    assert written[key] == value, (key, written[key], value)
  assert written["dtype"] == written["torch_dtype"] == "bfloat16"
  assert written["architectures"] == [type(theirs).__name__.replace("Config", "ForCausalLM")]
  assert hf_config.config_from_hf(written) == cfg
  # transformers 5 reads the file (both RoPE forms present) back to the same settings.
  again = type(theirs).from_dict(written)
  assert again.rope_parameters == want["rope_parameters"]
  assert again.tie_word_embeddings == want["tie_word_embeddings"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_omitted_keys_take_transformers_defaults(arch):
  from transformers import LlamaConfig, MistralConfig, Qwen2Config
  shape = dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=32)
  if arch == "mistral":  # MistralConfig's default sliding_window (4096) is refused: see below
    shape["sliding_window"] = None
  ours = hf_config.config_from_hf(dict(shape, model_type=arch))
  theirs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**shape)
  assert ours.tie_embeddings is theirs.tie_word_embeddings is False
  assert ours.rms_norm_eps == theirs.rms_norm_eps
  assert ours.max_position_embeddings == theirs.max_position_embeddings
  assert theirs.rope_parameters["rope_type"] == "default" and ours.rope_scaling is None
  assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
  assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
  assert ours.num_kv_heads == theirs.num_key_value_heads
  assert ours.head_dim == (getattr(theirs, "head_dim", None) or 128 // 32)
  if arch == "qwen2":  # Qwen2Config's default of 32 kv heads does not fit 4 heads: refused
    with pytest.raises(models.CheckpointError, match=r"config\.json: num_heads=4 is not a multiple"):
      hf_config.config_from_hf(dict(shape, num_attention_heads=4, model_type=arch))


def test_qwen2_without_tie_key_uses_its_lm_head(qwen_dir, tmp_path):
  path, model = qwen_dir
  d = _copy(path, tmp_path / "notie")
  c = json.loads((d / "config.json").read_text())
  del c["tie_word_embeddings"]
  (d / "config.json").write_text(json.dumps(c))
  cfg, params = models.load_hf(d)
  assert not cfg.tie_embeddings and "lm_head" in params
  ids, mask = hf_fixtures.padded_batch(np.random.default_rng(4), cfg.vocab_size, [7, 11], "right")
  ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
  real = mask.astype(bool)
  _assert_close(ours[real], hf_fixtures.torch_logits(model, ids, mask)[real])


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


def _rewrite_tensors(d, edit):
  from safetensors.numpy import load_file
  tensors = load_file(str(d / "model.safetensors"))
  edit(tensors)
  hf.write_safetensors(d / "model.safetensors", tensors)


def test_unused_checkpoint_tensor_is_an_error(llama_dir, tmp_path):
  path, _ = llama_dir  # tied: no lm_head.weight
  d = _copy(path, tmp_path / "tied_with_head")
  _rewrite_tensors(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] * 2}))
  with pytest.raises(models.CheckpointError,
                     match=r"model\.safetensors: tensor 'lm_head\.weight' would be unused: "
                           r"config\.json says tie_word_embeddings=true"):
    models.load_hf(d)
  d = _copy(path, tmp_path / "extra")
  _rewrite_tensors(d, lambda t: t.update({
      "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32),
      "model.layers.2.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"]}))
  with pytest.raises(models.CheckpointError,
                     match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.bias' would be unused: "
                           r"no llama parameter with 2 layers.*1 more.*layers\.2\.mlp\.up_proj"):
    models.load_hf(d)


def test_mistral_sliding_window_is_refused_unless_it_covers_every_position(mistral_dir, tmp_path):
  """A window shorter than max_position_embeddings is sliding-window attention (not supported);
  an omitted key means MistralConfig's 4096; a window that covers every position is full."""
  for i, (change, refused) in enumerate([({"sliding_window": 128}, True),
                                         ({"sliding_window": 256}, False),
                                         ({"max_position_embeddings": 8192}, False),
                                         ({"sliding_window": "omit",
                                           "max_position_embeddings": 8192}, True),
                                         ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}}, True)]):
    d = _copy(mistral_dir[0], tmp_path / f"m{i}")
    c = json.loads((d / "config.json").read_text())
    c.update({k: v for k, v in change.items() if v != "omit"})
    for k in (k for k, v in change.items() if v == "omit"):
      del c[k]
    (d / "config.json").write_text(json.dumps(c))
    if refused:
      with pytest.raises(models.CheckpointError, match=r"config\.json: (sliding_window=(128|4096) "
                         r".*not supported.*sliding_window null|rope_type 'llama3' is not "
                         r"supported for mistral)"):
        hf_config.read_config(d)
    else:
      assert hf_config.read_config(d).architecture == "mistral"


def test_sliding_window_and_unknown_rope_are_refused(qwen_dir, tmp_path):
  for key, value, match in [("use_sliding_window", True, "sliding-window attention"),
                            ("layer_types", ["full_attention", "sliding_attention"],
                             "sliding-window attention"),
                            ("rope_scaling", {"rope_type": "yarn", "factor": 4.0},
                             "rope_type 'yarn' is not supported")]:
    d = _copy(qwen_dir[0], tmp_path / key)
    c = json.loads((d / "config.json").read_text())
    c[key] = value
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(models.CheckpointError, match=rf"config\.json: {match}"):
      models.load_hf(d)


# --------------------------------------------------------------------------------------------
# A student from a subset of the checkpoint's layers.

_DEEP = 5  # layers of the checkpoints below


@pytest.fixture(scope="module")
def deep_dirs(tmp_path_factory):
  """{arch: (dir, torch model)}: 5-layer Llama (tied) and Qwen2 (untied, q/k/v bias)."""
  out = {}
  for arch, make in [("llama", hf_fixtures.make_llama), ("qwen2", hf_fixtures.make_qwen2)]:
    path = tmp_path_factory.mktemp(f"{arch}_deep")
    out[arch] = path, make(path, seed=3, num_layers=_DEEP)
  return out


def _torch_subset(model, layers):
  """A fresh transformers model of len(layers) layers holding `model`'s weights of `layers`
  (state-dict renaming in torch: independent of sentijax's loader)."""
  config = model.config.to_dict()
  config.update(num_hidden_layers=len(layers))
  config.pop("layer_types", None)  # Qwen2 derives it from num_hidden_layers
  small = type(model)(type(model.config)(**config)).eval()
  renamed = {}
  for name, w in model.state_dict().items():
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
      if int(parts[2]) not in layers:
        continue
      parts[2] = str(layers.index(int(parts[2])))
    renamed[".".join(parts)] = w
  small.load_state_dict(renamed, strict=True)
  return small


@pytest.mark.parametrize("arch,layers", [("llama", (0, 2, 4)), ("qwen2", (1, 2, 4))])
def test_layer_subset_logits_equal_truncated_transformers(arch, layers, deep_dirs, tmp_path):
  path, model = deep_dirs[arch]
  cfg, params = models.load_hf(path, layers=layers)
  assert cfg.num_layers == len(layers)
  assert params["layers"]["mlp"]["up_kernel"].shape[0] == len(layers)
  ids, mask = hf_fixtures.padded_batch(np.random.default_rng(5), cfg.vocab_size, [23, 40], "left")
  ours = np.asarray(models.apply(cfg, params, ids, attention_mask=mask))
  real = mask.astype(bool)
  ref = hf_fixtures.torch_logits(_torch_subset(model, list(layers)), ids, mask)
  _assert_close(ours[real], ref[real], what=f"{arch} layers {layers}")
  full = hf_fixtures.torch_logits(model, ids, mask)  # the subset is not the full model
  assert np.abs(full[real] - ref[real]).max() > 100 * PARITY_REL * np.abs(ref[real]).max()
  if arch != "qwen2":  # the export check once, where config.json has per-layer keys
    return
  # Its export is a plain len(layers)-layer checkpoint for transformers.
  out = tmp_path / "student"
  models.save_hf(cfg, params, out)
  from transformers import AutoModelForCausalLM
  reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert reloaded.config.num_hidden_layers == len(layers)
  _assert_close(hf_fixtures.torch_logits(reloaded, ids, mask)[real], ours[real], what="export")


def test_layer_subset_never_reads_skipped_layers(deep_dirs, monkeypatch):
  path, _ = deep_dirs["qwen2"]
  read = []
  original = hf.SafetensorsFiles.read_slices

  def spy(self, name, *args, **kwargs):
    read.append(name)
    return original(self, name, *args, **kwargs)

  monkeypatch.setattr(hf.SafetensorsFiles, "read_slices", spy)
  models.load_hf(path, layers=(1, 3))
  layers_read = {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")}
  assert layers_read == {1, 3}
  assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(read)


@pytest.mark.parametrize("layers,why", [
    ((0, 5), r"layer 5 is out of range"),
    ((-1, 2), r"layer -1 is out of range"),
    ((0, 2, 2), r"layer 2 is listed twice"),
    ((3, 1), r"layers must be listed in ascending order"),
    ((), r"selects no layers"),
])
def test_bad_layer_subsets_are_refused(layers, why, deep_dirs):
  path, _ = deep_dirs["llama"]
  value = ",".join(map(str, layers))
  with pytest.raises(models.CheckpointError,
                     match=rf"layers='{value}': {why}.*config\.json has 5 layers \(0\.\.4\)"):
    models.load_hf(path, layers=layers)
