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
from sentijax.models.decoder import ModelConfig
from sentijax.models.hf_config import (CheckpointError, config_from_hf, config_to_hf,  # noqa: F401
                                        read_config, save_config)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


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


def _check_no_unused(files: SafetensorsFiles, cfg: ModelConfig, expected: list[str]):
  """Raises on checkpoint tensors the config gives no place to (they would be silently lost)."""
  unused = sorted(set(files.names()) - set(expected))
  if not unused:
    return
  name = unused[0]
  if name == "lm_head.weight" and cfg.tie_embeddings:
    why = ("config.json says tie_word_embeddings=true, so the output projection is the input "
           "embedding; set tie_word_embeddings=false to use this tensor")
  else:
    why = (f"no {cfg.architecture} parameter with {cfg.num_layers} layers, "
           f"tie_word_embeddings={cfg.tie_embeddings}, qkv_bias={cfg.qkv_bias} takes it")
  more = f" (and {len(unused) - 1} more: {unused[1:4]})" if len(unused) > 1 else ""
  raise CheckpointError(f"{files.file_of(name)}: tensor {name!r} would be unused: {why}{more}")


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

  _check_no_unused(files, cfg, [name for _, name, *_ in top] + [
      name.format(i=i) for _, name, *_ in per_layer for i in range(cfg.num_layers)])
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
