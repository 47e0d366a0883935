"""Import/export Hugging Face checkpoints (config.json + safetensors) without torch.

Import reads safetensors headers once, then memory-maps each file: every parameter is built with
`jax.make_array_from_callback`, so each host reads only the slices its own devices hold, straight
into their target sharding; a 70B checkpoint never sits whole in one host's memory. bf16 tensors
are read with `ml_dtypes` (numpy has no bfloat16).

Export writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads:
config.json, model.safetensors (or shards + model.safetensors.index.json) and tokenizer files.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sentijax import sharding
from sentijax.models import decoder
from sentijax.models.decoder import ModelConfig, RopeScaling


class CheckpointError(ValueError):
  """A problem with an HF checkpoint directory; the message names the file/tensor/key."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _get(hf: dict, key: str, path: Path, default: Any = KeyError) -> Any:
  if key in hf:
    return hf[key]
  if default is KeyError:
    raise CheckpointError(f"{path}: missing required key {key!r}")
  return default


def config_from_hf(hf: dict, path: Path | str = "config.json") -> ModelConfig:
  """ModelConfig from a parsed config.json (transformers 4 or 5 layout)."""
  path = Path(path)
  model_type = hf.get("model_type")
  if model_type not in _ARCHITECTURES:
    archs = hf.get("architectures")
    raise CheckpointError(
        f"{path}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
        f"sentijax supports model_type 'llama' (Llama-3.x) and 'qwen2' (Qwen2/2.5)")
  if hf.get("mlp_bias") or (model_type == "llama" and hf.get("attention_bias")):
    raise CheckpointError(f"{path}: mlp_bias / attention_bias on llama are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
  rope = dict(hf.get("rope_parameters") or {})
  legacy_scaling = hf.get("rope_scaling") or {}
  rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", legacy_scaling.get("rope_type", legacy_scaling.get("type",
                                                                                       "default")))
  scaling = None
  if rope_type == "llama3":
    src = rope if "factor" in rope else legacy_scaling
    try:
      scaling = RopeScaling(float(src["factor"]), float(src["low_freq_factor"]),
                            float(src["high_freq_factor"]),
                            int(src["original_max_position_embeddings"]))
    except KeyError as e:
      raise CheckpointError(f"{path}: llama3 rope scaling lacks key {e.args[0]!r}") from None
  elif rope_type not in ("default", None):
    raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported "
                          f"(supported: default, llama3)")
  num_heads = int(_get(hf, "num_attention_heads", path))
  hidden = int(_get(hf, "hidden_size", path))
  eos = hf.get("eos_token_id")
  return ModelConfig(
      architecture=model_type,
      vocab_size=int(_get(hf, "vocab_size", path)),
      hidden_size=hidden,
      intermediate_size=int(_get(hf, "intermediate_size", path)),
      num_layers=int(_get(hf, "num_hidden_layers", path)),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or hidden // num_heads),
      rope_theta=float(rope_theta),
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
      qkv_bias=model_type == "qwen2",
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
  )


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  hf = {
      "architectures": [_ARCHITECTURES[cfg.architecture]],
      "model_type": cfg.architecture,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope,
      "rope_theta": cfg.rope_theta,  # read by pre-5 transformers and vLLM
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos,
      "dtype": dtype,
  }
  if cfg.architecture == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  return hf


def read_config(path: str | os.PathLike) -> ModelConfig:
  cfg_path = Path(path) / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path}: not found; an HF model directory needs config.json")
  try:
    hf = json.loads(cfg_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{cfg_path}: expected a JSON object")
  return config_from_hf(hf, cfg_path)


# --------------------------------------------------------------------------------------------
# safetensors: lazy reader and plain writer.


class SafetensorsFiles:
  """Tensor name -> memory-mapped numpy view, over one file or an index.json shard set."""

  def __init__(self, directory: str | os.PathLike):
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index ({e!r})") from None
      files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").is_file():
      files = [directory / "model.safetensors"]
    else:
      raise CheckpointError(f"{directory}: no model.safetensors or "
                            f"model.safetensors.index.json found")
    self._entries: dict[str, tuple[Path, Any, tuple[int, ...], int, int]] = {}
    for f in files:
      for name, entry in self._read_header(f).items():
        self._entries[name] = (f, *entry)
    self._maps: dict[Path, np.memmap] = {}

  @staticmethod
  def _read_header(path: Path) -> dict[str, tuple]:
    if not path.is_file():
      raise CheckpointError(f"{path}: listed in the index but missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{path}: corrupt safetensors file (truncated header)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8 or n > 100_000_000:
        raise CheckpointError(f"{path}: corrupt safetensors file (header length {n})")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    out = {}
    for name, meta in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype = _ST_DTYPES[meta["dtype"]]
        shape = tuple(int(s) for s in meta["shape"])
        begin, end = (int(o) for o in meta["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {name!r} has a bad header entry ({e!r})") from None
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      if end - begin != nbytes or 8 + n + end > size:
        raise CheckpointError(f"{path}: tensor {name!r} data is truncated or inconsistent "
                              f"(offsets {begin}..{end}, file size {size})")
      out[name] = (dtype, shape, 8 + n + begin, nbytes)
    return out

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def names(self) -> list[str]:
    return list(self._entries)

  def file_of(self, name: str) -> Path:
    return self._entries[name][0]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][2]

  def get(self, name: str) -> np.ndarray:
    if name not in self._entries:
      raise CheckpointError(f"tensor {name!r} not found in the checkpoint "
                            f"({sorted({str(e[0]) for e in self._entries.values()})})")
    path, dtype, shape, offset, _ = self._entries[name]
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return self._maps[path][offset:offset + nbytes].view(dtype).reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Writes one safetensors file atomically (tmp + rename)."""
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, arr in tensors.items():
    nbytes = arr.nbytes
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Param <-> HF tensor name mapping. Each entry: our param path, HF name (with {i} per layer),
# HF shape, and the transforms between the two layouts.


def _spec(cfg: ModelConfig):
  e, h, k, d, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)
  t = lambda w: w.T  # HF linear (out, in) <-> kernel (in, out)
  specs = [
      (("embedding",), "model.embed_tokens.weight", (cfg.vocab_size, e), None, None),
      (("final_norm", "scale"), "model.norm.weight", (e,), None, None),
  ]
  if not cfg.tie_embeddings:
    specs.append((("lm_head",), "lm_head.weight", (cfg.vocab_size, e), t, t))
  L = "model.layers.{i}."
  layer = [
      (("input_norm", "scale"), L + "input_layernorm.weight", (e,), None, None),
      (("post_attn_norm", "scale"), L + "post_attention_layernorm.weight", (e,), None, None),
      (("attn", "q_kernel"), L + "self_attn.q_proj.weight", (h * d, e),
       lambda w: w.T.reshape(e, h, d), lambda p: p.reshape(e, h * d).T),
      (("attn", "k_kernel"), L + "self_attn.k_proj.weight", (k * d, e),
       lambda w: w.T.reshape(e, k, d), lambda p: p.reshape(e, k * d).T),
      (("attn", "v_kernel"), L + "self_attn.v_proj.weight", (k * d, e),
       lambda w: w.T.reshape(e, k, d), lambda p: p.reshape(e, k * d).T),
      (("attn", "o_kernel"), L + "self_attn.o_proj.weight", (e, h * d),
       lambda w: w.T.reshape(h, d, e), lambda p: p.reshape(h * d, e).T),
      (("mlp", "gate_kernel"), L + "mlp.gate_proj.weight", (f, e), t, t),
      (("mlp", "up_kernel"), L + "mlp.up_proj.weight", (f, e), t, t),
      (("mlp", "down_kernel"), L + "mlp.down_proj.weight", (e, f), t, t),
  ]
  if cfg.qkv_bias:
    layer += [
        (("attn", "q_bias"), L + "self_attn.q_proj.bias", (h * d,),
         lambda w: w.reshape(h, d), lambda p: p.reshape(h * d)),
        (("attn", "k_bias"), L + "self_attn.k_proj.bias", (k * d,),
         lambda w: w.reshape(k, d), lambda p: p.reshape(k * d)),
        (("attn", "v_bias"), L + "self_attn.v_proj.bias", (k * d,),
         lambda w: w.reshape(k, d), lambda p: p.reshape(k * d)),
    ]
  return specs, [(("layers",) + path, *rest) for path, *rest in layer]


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def load_params(cfg: ModelConfig, directory: str | os.PathLike, shardings: Any = None,
                dtype: Any = None) -> dict:
  """Builds the param pytree from safetensors, each leaf placed into its sharding.

  `shardings`: pytree of jax.sharding.Sharding matching the params (None = first device).
  `dtype`: param dtype (default cfg.param_dtype).
  """
  files = SafetensorsFiles(directory)
  dtype = np.dtype(dtype or cfg.param_dtype)
  top, per_layer = _spec(cfg)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, decoder.param_shapes(cfg))

  def checked(name: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if name not in files:
      raise CheckpointError(f"{directory}: tensor {name!r} is missing from the checkpoint "
                            f"(config says {cfg.architecture}, {cfg.num_layers} layers, "
                            f"tie_word_embeddings={cfg.tie_embeddings})")
    if files.shape(name) != hf_shape:
      raise CheckpointError(f"{files.file_of(name)}: tensor {name!r} has shape "
                            f"{files.shape(name)}, config.json implies {hf_shape}")
    return files.get(name)

  @functools.lru_cache(maxsize=4)  # devices of one host ask for the same tensor in turn
  def converted(name: str, hf_shape: tuple[int, ...], to_ours: Callable | None) -> np.ndarray:
    w = checked(name, hf_shape)
    w = to_ours(w) if to_ours else w
    return np.asarray(w, dtype=dtype)

  params: dict = {}
  for path, name, hf_shape, to_ours, _ in top:
    shape = converted(name, hf_shape, to_ours).shape
    sharding = _get_path(shardings, path)
    arr = jax.make_array_from_callback(
        shape, sharding, lambda idx, n=name, s=hf_shape, f=to_ours: converted(n, s, f)[idx])
    _set(params, path, arr)
  for path, name, hf_shape, to_ours, _ in per_layer:
    for i in range(cfg.num_layers):  # validate every layer up front: fail before any transfer
      checked(name.format(i=i), hf_shape)
    one = converted(name.format(i=0), hf_shape, to_ours)
    shape = (cfg.num_layers, *one.shape)

    def layer_slice(idx, n=name, s=hf_shape, f=to_ours):
      layers = range(cfg.num_layers)[idx[0]]
      return np.stack([converted(n.format(i=i), s, f)[idx[1:]] for i in layers])

    _set(params, path, jax.make_array_from_callback(shape, _get_path(shardings, path),
                                                    layer_slice))
  converted.cache_clear()
  return params


def save_params(cfg: ModelConfig, params: dict, directory: str | os.PathLike,
                dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> list[Path]:
  """Writes params as HF safetensors (sharded with an index.json above max_shard_bytes)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  np_dtype = np.dtype(jnp.dtype(dtype))
  top, per_layer = _spec(cfg)
  tensors: dict[str, np.ndarray] = {}
  for path, name, _, _, to_hf in top:
    w = sharding.to_host(_get_path(params, path))
    tensors[name] = np.ascontiguousarray((to_hf(w) if to_hf else w).astype(np_dtype))
  for path, name, _, _, to_hf in per_layer:
    stacked = sharding.to_host(_get_path(params, path))
    for i in range(cfg.num_layers):
      w = stacked[i]
      tensors[name.format(i=i)] = np.ascontiguousarray((to_hf(w) if to_hf else w).astype(np_dtype))
  shards: list[dict[str, np.ndarray]] = [collections.OrderedDict()]
  size = 0
  for name, arr in tensors.items():
    if size and size + arr.nbytes > max_shard_bytes:
      shards.append(collections.OrderedDict())
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  written = []
  if jax.process_index() != 0:
    return written
  index_path = directory / "model.safetensors.index.json"
  if len(shards) == 1:
    written.append(directory / "model.safetensors")
    write_safetensors(written[-1], shards[0])
    index_path.unlink(missing_ok=True)
  else:
    weight_map = {}
    for j, shard in enumerate(shards):
      fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(directory / fname, shard)
      written.append(directory / fname)
      weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)
    (directory / "model.safetensors").unlink(missing_ok=True)
  return written


def save_config(cfg: ModelConfig, directory: str | os.PathLike, dtype: str = "float32"):
  path = Path(directory) / "config.json"
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
  os.replace(tmp, path)
