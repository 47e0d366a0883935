"""Import/export Hugging Face checkpoints (config.json + safetensors) without torch.

Import, with bounded host memory: for each tensor, each host reads only the rows its own devices
need (`safetensors_io.SafetensorsFiles.read_slices`, one pass over the file bytes per host),
converts just those slices to our layout and places them. Stacked layer params are filled one
layer at a time into a preallocated sharded array (a donated in-place update), so host memory
beyond the placed params stays near one layer tensor, never the stacked [layers, ...] array
(Llama-70B's stacked gate_kernel alone is ~75 GB in fp32).

Export streams too: one HF tensor at a time is gathered to the host (all processes take part in
the gather), converted, written by process 0 into its safetensors shard and freed. Each file is
written atomically (tmp + rename); a sharded export's index.json is removed first and written
last, so a crash never leaves an index over a half-replaced shard set.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sentijax import atomic, sharding
from sentijax.models import decoder
from sentijax.models.decoder import ModelConfig
from sentijax.models.hf_config import (CheckpointError, config_from_hf, config_to_hf,  # noqa: F401
                                        read_config, save_config)
from sentijax.models.safetensors_io import (Index, SafetensorsFiles, nbytes_of,  # noqa: F401
                                            normalize, write_safetensors, write_stream)


@dataclasses.dataclass(frozen=True)
class Layout:
  """ours = HF tensor, transposed if `transpose`, then axis `split` of that split into
  (n, head_dim). Maps indices of our layout to the HF rows/columns that hold them."""
  transpose: bool = False
  split: int | None = None
  head_dim: int = 0

  def ours_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    t = hf_shape[::-1] if self.transpose else hf_shape
    if self.split is None:
      return tuple(t)
    s, d = self.split, self.head_dim
    return (*t[:s], t[s] // d, d, *t[s + 1:])

  def hf_index(self, ours: Index) -> tuple[Index, slice | None]:
    """(HF index covering `ours`, the head_dim slice still to take after the split)."""
    sub = None
    if self.split is not None:
      s, d = self.split, self.head_dim
      heads, sub = ours[s], ours[s + 1]
      ours = (*ours[:s], slice(heads.start * d, heads.stop * d), *ours[s + 2:])
    return (ours[::-1] if self.transpose else ours), sub

  def to_ours(self, w: np.ndarray, sub: slice | None) -> np.ndarray:
    t = w.T if self.transpose else w
    if self.split is not None:
      s, d = self.split, self.head_dim
      t = t.reshape(*t.shape[:s], t.shape[s] // d, d, *t.shape[s + 1:])
      t = t[(slice(None),) * (s + 1) + (sub,)]
    return np.ascontiguousarray(t)

  def to_hf(self, p: np.ndarray) -> np.ndarray:
    if self.split is not None:
      s = self.split
      p = p.reshape(*p.shape[:s], p.shape[s] * p.shape[s + 1], *p.shape[s + 2:])
    return p.T if self.transpose else p


# --------------------------------------------------------------------------------------------
# Param <-> HF tensor name mapping. Each entry: our param path, HF name (with {i} per layer),
# HF shape, and the layout between the two.


def _spec(cfg: ModelConfig):
  e, h, k, d, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)
  same, t = Layout(), Layout(transpose=True)
  heads_out = Layout(transpose=True, split=1, head_dim=d)  # (n*d, e) -> (e, n, d)
  heads_in = Layout(transpose=True, split=0, head_dim=d)  # (e, n*d) -> (n, d, e)
  bias = Layout(split=0, head_dim=d)  # (n*d,) -> (n, d)
  top = [(("embedding",), "model.embed_tokens.weight", (cfg.vocab_size, e), same)]
  L = "model.layers.{i}."
  layer = [
      (("input_norm", "scale"), L + "input_layernorm.weight", (e,), same),
      (("attn", "q_kernel"), L + "self_attn.q_proj.weight", (h * d, e), heads_out),
      (("attn", "k_kernel"), L + "self_attn.k_proj.weight", (k * d, e), heads_out),
      (("attn", "v_kernel"), L + "self_attn.v_proj.weight", (k * d, e), heads_out),
      (("attn", "o_kernel"), L + "self_attn.o_proj.weight", (e, h * d), heads_in),
      (("post_attn_norm", "scale"), L + "post_attention_layernorm.weight", (e,), same),
      (("mlp", "gate_kernel"), L + "mlp.gate_proj.weight", (f, e), t),
      (("mlp", "up_kernel"), L + "mlp.up_proj.weight", (f, e), t),
      (("mlp", "down_kernel"), L + "mlp.down_proj.weight", (e, f), t),
  ]
  if cfg.qkv_bias:
    layer += [
        (("attn", "q_bias"), L + "self_attn.q_proj.bias", (h * d,), bias),
        (("attn", "k_bias"), L + "self_attn.k_proj.bias", (k * d,), bias),
        (("attn", "v_bias"), L + "self_attn.v_proj.bias", (k * d,), bias),
    ]
  tail = [(("final_norm", "scale"), "model.norm.weight", (e,), same)]
  if not cfg.tie_embeddings:
    tail.append((("lm_head",), "lm_head.weight", (cfg.vocab_size, e), t))
  return top + tail, [(("layers",) + path, *rest) for path, *rest in layer]


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


# --------------------------------------------------------------------------------------------
# Import.


def _key(index: Index) -> tuple[tuple[int, int], ...]:
  return tuple((s.start, s.stop) for s in index)


def _place(files: SafetensorsFiles, name: str, layout: Layout, shape: tuple[int, ...],
           sharding_: jax.sharding.Sharding, dtype: np.dtype) -> jax.Array:
  """One HF tensor as a jax Array in `sharding_`: reads only this host's distinct slices."""
  wanted: dict[tuple, Index] = {}
  for index in sharding_.addressable_devices_indices_map(shape).values():
    ix = normalize(index, shape)
    wanted.setdefault(_key(ix), ix)
  hf_index = [layout.hf_index(ix) for ix in wanted.values()]
  raw = files.read_slices(name, [hx for hx, _ in hf_index], dtype)
  pieces = {}
  for k, (_, sub) in zip(list(wanted), hf_index):
    pieces[k] = layout.to_ours(raw.pop(0), sub)
  return jax.make_array_from_callback(shape, sharding_,
                                      lambda index: pieces[_key(normalize(index, shape))])


def _layer_sharding(stacked: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
  """The sharding of one layer of a stacked [layers, ...] param."""
  if isinstance(stacked, NamedSharding):
    spec = tuple(stacked.spec) + (None,) * (ndim + 1 - len(stacked.spec))
    return NamedSharding(stacked.mesh, P(*spec[1:]))
  if isinstance(stacked, jax.sharding.SingleDeviceSharding):
    return stacked
  raise TypeError(f"unsupported sharding {stacked!r} for stacked layer params; "
                  f"use a NamedSharding (sentijax.models.shardings_for)")


@functools.cache
def _stack_fns(shape: tuple[int, ...], dtype: str, stacked: jax.sharding.Sharding):
  """(zeros(), set_layer(stacked, layer, i)) jitted into `stacked`; set_layer donates."""
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=stacked)
  put = jax.jit(lambda s, x, i: jax.lax.dynamic_update_index_in_dim(s, x, i, 0),
                donate_argnums=0, out_shardings=stacked)
  return zeros, put


def select_layers(cfg: ModelConfig, layers: Sequence[int], setting: str = "layers",
                  source: str | os.PathLike = "the checkpoint") -> ModelConfig:
  """`cfg` (a checkpoint's config) keeping only decoder `layers`, in order; embeddings, final
  norm and head are kept. Raises naming `setting`, its value and the checkpoint's layer count."""
  n = cfg.num_layers
  value = ",".join(str(i) for i in layers)

  def bad(why: str) -> CheckpointError:
    return CheckpointError(f"{setting}={value!r}: {why}; {source} has {n} layers (0..{n - 1})")

  if not layers:
    raise bad("selects no layers; list at least one layer index (or leave it empty for all)")
  for i in layers:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
      raise bad(f"{i!r} is not a layer index")
    if not 0 <= i < n:
      raise bad(f"layer {i} is out of range")
  if len(set(layers)) != len(layers):
    twice = next(i for i in layers if list(layers).count(i) > 1)
    raise bad(f"layer {twice} is listed twice")
  if list(layers) != sorted(layers):
    raise bad("layers must be listed in ascending order (the student runs them in the "
              "checkpoint's order)")
  return cfg.replace(num_layers=len(layers))


def _source_layers(cfg: ModelConfig, directory, layers: Sequence[int] | None
                   ) -> tuple[tuple[int, ...], int]:
  """(checkpoint layer filling each of cfg's layers, number of layers in the checkpoint)."""
  if layers is None:
    return tuple(range(cfg.num_layers)), cfg.num_layers
  source = read_config(directory)
  picked = select_layers(source, layers, source=Path(directory) / "config.json")
  if picked.num_layers != cfg.num_layers:
    raise ValueError(f"layers={list(layers)} selects {picked.num_layers} layers but the model "
                     f"config has num_layers={cfg.num_layers}; build it with select_layers")
  return tuple(int(i) for i in layers), source.num_layers


def load_params(cfg: ModelConfig, directory: str | os.PathLike, shardings: Any = None,
                dtype: Any = None, layers: Sequence[int] | None = None) -> dict:
  """Builds the param pytree from safetensors, each leaf placed into its sharding.

  `shardings`: pytree of jax.sharding.Sharding matching the params (None = first device).
  `dtype`: param dtype (default cfg.param_dtype).
  `layers`: the checkpoint layers that become cfg's layers 0, 1, ... (cfg from `select_layers`);
  None = all. Skipped layers are never read from disk.
  """
  dtype = np.dtype(dtype or cfg.param_dtype)
  top, per_layer = _spec(cfg)
  src, n_src = _source_layers(cfg, directory, layers)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, decoder.param_shapes(cfg))
  with SafetensorsFiles(directory) as files:
    _check_no_unused(files, cfg.replace(num_layers=n_src), [name for _, name, *_ in top] + [
        name.format(i=i) for _, name, *_ in per_layer for i in range(n_src)])
    for _, name, hf_shape, _ in top + per_layer:  # validate every tensor: fail before transfers
      for i in (src if "{i}" in name else (0,)):
        n = name.format(i=i)
        if n not in files:
          raise CheckpointError(f"{directory}: tensor {n!r} is missing from the checkpoint "
                                f"(config says {cfg.architecture}, {n_src} layers, "
                                f"tie_word_embeddings={cfg.tie_embeddings})")
        if files.shape(n) != hf_shape:
          raise CheckpointError(f"{files.file_of(n)}: tensor {n!r} has shape "
                                f"{files.shape(n)}, config.json implies {hf_shape}")
    params: dict = {}
    for path, name, hf_shape, layout in top:
      _set(params, path, _place(files, name, layout, layout.ours_shape(hf_shape),
                                _get_path(shardings, path), dtype))
    for path, name, hf_shape, layout in per_layer:
      shape = layout.ours_shape(hf_shape)
      stacked_sh = _get_path(shardings, path)
      layer_sh = _layer_sharding(stacked_sh, len(shape))
      zeros, put = _stack_fns((cfg.num_layers, *shape), dtype.name, stacked_sh)
      stacked = zeros()
      for i, source_layer in enumerate(src):
        layer = _place(files, name.format(i=source_layer), layout, shape, layer_sh, dtype)
        stacked = put(stacked, layer, np.int32(i))
        del layer
      _set(params, path, stacked)
  return params


# --------------------------------------------------------------------------------------------
# Export.


@jax.jit
def _take_layer(stacked: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False)


def _export_plan(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], int | None, Layout, tuple]]:
  """(HF name, our path, layer or None, layout, HF shape) in file order: embed, layers, head."""
  top, per_layer = _spec(cfg)
  embed, tail = top[:1], top[1:]
  plan = [(name, path, None, layout, shape) for path, name, shape, layout in embed]
  for i in range(cfg.num_layers):
    plan += [(name.format(i=i), path, i, layout, shape) for path, name, shape, layout in per_layer]
  plan += [(name, path, None, layout, shape) for path, name, shape, layout in tail]
  return plan


def save_params(cfg: ModelConfig, params: dict, directory: str | os.PathLike,
                dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> list[Path]:
  """Writes params as HF safetensors (sharded with an index.json above max_shard_bytes).

  Every process must call it (the per-tensor gathers are collectives); process 0 writes.
  Host memory: one tensor in fp32 plus its `dtype` copy at a time.
  """
  directory = Path(directory)
  np_dtype = np.dtype(jnp.dtype(dtype))
  plan = _export_plan(cfg)
  shards: list[list] = [[]]
  size = 0
  for entry in plan:
    n = nbytes_of((entry[0], np_dtype, entry[4]))
    if size and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += n
  writer = jax.process_index() == 0
  index_path = directory / "model.safetensors.index.json"
  if writer:
    directory.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)

  def tensors(entries):
    for _, path, layer, layout, _ in entries:
      arr = _get_path(params, path)
      if layer is not None:
        arr = _take_layer(arr, np.int32(layer))
      w = sharding.to_host(arr)
      del arr
      yield np.ascontiguousarray(layout.to_hf(w), dtype=np_dtype)
      del w

  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))])
  for fname, entries in zip(names, shards):
    if writer:
      write_stream(directory / fname, [(e[0], np_dtype, e[4]) for e in entries], tensors(entries))
    else:
      for _ in tensors(entries):  # take part in the gathers; process 0 writes
        pass
  if not writer:
    return []
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(nbytes_of((e[0], np_dtype, e[4])) for e in plan)},
             "weight_map": {e[0]: fname for fname, entries in zip(names, shards)
                            for e in entries}}
    atomic.write_json(index_path, index, indent=2)
  stale = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
  for old in directory.iterdir():  # a previous export's files this one did not rewrite
    if stale.fullmatch(old.name) and old.name not in names:
      old.unlink()
  return [directory / n for n in names]
