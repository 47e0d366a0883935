"""Device mesh and logical-axis sharding rules.

Mesh axes are `('data', 'fsdp', 'tensor')`, sized from the config (-1 = the devices left over).
Params name their axes logically (`embed`, `mlp`, `heads`, ...); the rules in the config map each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). Batches shard their
batch axis by the `batch` rule (default `('data', 'fsdp')`). Activations use the same names
(hidden `[batch, length, embed]`, attention `[batch, length, heads, head_dim]`, MLP
`[batch, length, mlp]`); the decoder constrains them inside `logical_context(mesh, rules)`.

`mesh.fsdp = 0` (auto) picks FSDP for big models. The rule: the train state replicated on each
device takes `num_params x 12` bytes (fp32 params + two fp32 Adam moments); if that exceeds
`AUTO_FRACTION` (1/2: gradients and activations need the rest) of one device's memory
(`device.memory_stats()['bytes_limit']`, else `mesh.device_memory_gb`, else
`ASSUMED_DEVICE_MEMORY_GB` on backends that report none, e.g. CPU), params and optimizer state are
sharded over every device (`fsdp = -1`, `data = 1` unless set); otherwise `fsdp = 1`
(pure data parallelism). Without a model to size (callers that pass no `model_cfg`), auto is 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
TRAIN_BYTES_PER_PARAM = 12  # fp32 params + two fp32 Adam moments
AUTO_FRACTION = 0.5  # of a device's memory the replicated train state may take
ASSUMED_DEVICE_MEMORY_GB = 16.0  # when the device reports no bytes_limit and the config sets none

log = logging.getLogger("sentijax")


class MeshError(ValueError):
  pass


def device_memory_bytes(device: jax.Device, configured_gb: float = 0.0) -> tuple[int, str]:
  """(bytes one device holds, where the figure came from)."""
  if configured_gb:
    return int(configured_gb * 2**30), "mesh.device_memory_gb"
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory stats
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
  return int(ASSUMED_DEVICE_MEMORY_GB * 2**30), "assumed (no bytes_limit reported)"


def needs_fsdp(num_params: int, memory_bytes: int) -> bool:
  """The auto rule: the replicated train state would exceed AUTO_FRACTION of a device."""
  return num_params * TRAIN_BYTES_PER_PARAM > AUTO_FRACTION * memory_bytes


def resolve_auto(mesh_cfg: Any, model_cfg: Any = None,
                 device: jax.Device | None = None) -> dict[str, int]:
  """Mesh sizes with `fsdp = 0` (auto) decided by the rule in the module docstring."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  if sizes["fsdp"] != 0:
    return sizes
  if model_cfg is None:
    sizes["fsdp"] = 1
    return sizes
  configured = float(_get(mesh_cfg, "device_memory_gb", 0.0) or 0.0)
  memory, source = device_memory_bytes(device or jax.local_devices()[0], configured)
  n = int(model_cfg.num_params)
  if needs_fsdp(n, memory):
    sizes.update(fsdp=-1, data=1 if sizes["data"] == -1 else sizes["data"])
  else:
    sizes["fsdp"] = 1
  log.info("mesh.fsdp=0 (auto): %.2fB params x %d B = %.1f GiB train state vs %.1f GiB per "
           "device (%s) -> fsdp=%s, data=%s", n / 1e9, TRAIN_BYTES_PER_PARAM,
           n * TRAIN_BYTES_PER_PARAM / 2**30, memory / 2**30, source, sizes["fsdp"], sizes["data"])
  return sizes


def _get(cfg: Any, key: str, default: Any) -> Any:
  try:
    return cfg[key]
  except (KeyError, AttributeError):
    return default


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries; raises MeshError when the sizes do not fit the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes[1] == 0:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: fsdp=0 (auto) must be resolved first "
                    f"(sharding.resolve_auto or make_mesh)")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if num_devices % fixed:
      raise MeshError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not divide "
          f"the {num_devices} available devices; set --config.mesh.* so the product divides it")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but {num_devices} are "
        f"available; make data*fsdp*tensor equal the device count or use -1 for one axis")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None, *,
              model_cfg: Any = None) -> Mesh:
  """Mesh over `devices` (default: all) with Auto axis types (GSPMD propagates shardings).

  `model_cfg` sizes `fsdp = 0` (auto); see the module docstring.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(resolve_auto(mesh_cfg, model_cfg), len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where arrays live: a mesh (None = the default device, unsharded) and the logical sharding
  rules (None = the base config's). What travels together through the jobs, as one value."""
  mesh: Mesh | None = None
  rules: Any = None

  @classmethod
  def from_config(cls, config, model_cfg: Any = None) -> "Placement":
    """`config.mesh` (auto fsdp sized by `model_cfg`) and `config.sharding_rules`."""
    return cls(make_mesh(config.mesh, model_cfg=model_cfg), config.sharding_rules)

  def batch(self, ndim: int = 2, batch_dim: int = 0) -> NamedSharding | None:
    """The `batch` rule's sharding of an `ndim`-D array (None without a mesh)."""
    return None if self.mesh is None else batch_sharding(self.mesh, self.rules, ndim, batch_dim)

  @property
  def batch_divisor(self) -> int:
    return batch_divisor(self.mesh, self.rules)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Config rules (tuples or lists, lists for multi-axis) -> flax logical rules."""
  out = []
  for name, axes in rules:
    out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules: Any) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_from_config(rules))


def named_shardings(logical: Any, shapes: Any, mesh: Mesh, rules: Any) -> Any:
  """NamedShardings of a pytree given its logical PartitionSpecs and shapes (models/ computes
  both for its params: `models.shardings_for`); MeshError when a rule splits an axis its mesh
  axes do not divide (named: param, logical axis and size, mesh axes and sizes, what to
  change)."""
  shardings = logical_to_shardings(logical, mesh, rules)
  check_divisible(shapes, logical, shardings)
  return shardings


def check_divisible(shapes: Any, logical: Any, shardings: Any) -> None:
  """Raises MeshError for the first param dimension its sharding cannot split evenly."""
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  leaves = jax.tree_util.tree_leaves_with_path(shapes)
  for (path, shape), names, sh in zip(leaves, jax.tree.leaves(logical, is_leaf=is_spec),
                                      jax.tree.leaves(shardings)):
    spec = tuple(sh.spec) + (None,) * (len(shape.shape) - len(sh.spec))
    for size, name, axes in zip(shape.shape, tuple(names) + (None,) * len(spec), spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      parts = int(np.prod([sh.mesh.shape[a] for a in axes]))
      if size % parts == 0:
        continue
      mesh_desc = " x ".join(f"axis {a!r} of size {sh.mesh.shape[a]}" for a in axes)
      fits = [d for d in range(1, size + 1) if size % d == 0]
      raise MeshError(
          f"param {jax.tree_util.keystr(path)} {tuple(shape.shape)}: logical axis {name!r} has "
          f"size {size}, but the sharding rule ({name!r}, {axes if len(axes) > 1 else axes[0]!r}) "
          f"splits it over mesh {mesh_desc} ({parts} parts), which does not divide {size}. "
          f"Set the rule to ({name!r}, None) in sharding_rules to replicate it, or make "
          f"{' x '.join(axes)} one of {fits} (--config.mesh.*)")


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays / ShapeDtypeStructs (the largest of
  its devices' totals: with divisible shardings every device holds the same)."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    sh = leaf.sharding
    size = int(np.prod(sh.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    for d in sh.device_set:
      per_device[d] = per_device.get(d, 0) + size
  return max(per_device.values(), default=0)


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules: Any):
  """Inside: the decoder's activation constraints (`nn.with_logical_constraint`) apply on
  `mesh` under `rules`; outside they are no-ops. Trace (jit) the model inside it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_from_config(rules)):
    yield


@functools.cache
def _default_rules() -> tuple[tuple[str, Any], ...]:
  from sentijax import config  # local: the defaults live in the base config
  return rules_from_config(config.base().sharding_rules)


def batch_axes(rules: Any = None) -> str | tuple[str, ...] | None:
  """Mesh axes of the logical `batch` axis in `rules` (None: the base config's rules)."""
  rules = _default_rules() if rules is None else rules_from_config(rules)
  for name, axes in rules:
    if name == "batch":
      return axes
  raise MeshError(f"sharding_rules {rules} have no ('batch', mesh axes) rule; add one, e.g. "
                  "('batch', ('data', 'fsdp')), or ('batch', None) to replicate batches")


def batch_sharding(mesh: Mesh, rules: Any = None, ndim: int = 2, batch_dim: int = 0
                   ) -> NamedSharding:
  """Axis `batch_dim` of an `ndim`-D array sharded by the `batch` rule, the rest replicated."""
  axes = _batch_mesh_axes(mesh, rules)
  spec = [None] * ndim
  spec[batch_dim] = axes[0] if len(axes) == 1 else axes or None
  return NamedSharding(mesh, P(*spec))


def _batch_mesh_axes(mesh: Mesh, rules: Any) -> tuple[str, ...]:
  """The `batch` rule's mesh axes as a tuple, checked against `mesh`."""
  axes = batch_axes(rules)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise MeshError(f"sharding_rules: the 'batch' rule names mesh axes {unknown}; the mesh has "
                    f"{tuple(mesh.shape)}")
  return axes


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(x: Any) -> np.ndarray:
  """numpy copy of a (possibly sharded, possibly multi-host) array; all processes must call."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def process_rows(x: Any) -> tuple[np.ndarray, int]:
  """(numpy copy of the rows of axis 0 that this process's devices hold, in order; the global
  index of the first): a batch-sharded multi-process array's own rows, no cross-process
  transfer; (the whole array, 0) when this process holds all of it. Whole rows only."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return to_host(x), 0
  spans = {}
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    start, stop, _ = rows.indices(x.shape[0])
    if tuple(shard.data.shape[1:]) != tuple(x.shape[1:]):
      raise MeshError(f"an array {x.shape} sharded as {x.sharding.spec} splits more than its "
                      "rows (axis 0): process_rows takes batch-sharded arrays")
    spans.setdefault((start, stop), shard.data)
  bounds = sorted(spans)
  if any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
    raise MeshError(f"this process holds rows {bounds} of an array {x.shape}: not one contiguous "
                    "block; order the mesh's devices by process (jax.make_mesh does)")
  return np.concatenate([np.asarray(spans[b]) for b in bounds]), bounds[0][0]


def batch_divisor(mesh: Mesh | None, rules: Any = None) -> int:
  """Rows a batch must be a multiple of to shard by the `batch` rule; 1 without a mesh."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in _batch_mesh_axes(mesh, rules)]))
