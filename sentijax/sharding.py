"""Device mesh and logical-axis sharding rules.

Mesh axes are `('data', 'fsdp', 'tensor')`, sized from the config (-1 = the devices left over).
Params name their axes logically (`embed`, `mlp`, `heads`, ...); the rules in the config map each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). Batches shard their
batch axis by the `batch` rule (default `('data', 'fsdp')`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
  pass


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries; raises MeshError when the sizes do not fit the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
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


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all) with Auto axis types (GSPMD propagates shardings)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Config rules (tuples or lists, lists for multi-axis) -> flax logical rules."""
  out = []
  for name, axes in rules:
    out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules: Any) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_from_config(rules))


def param_shardings(model_cfg, mesh: Mesh, rules: Any) -> Any:
  from sentijax.models import decoder  # local: keeps this module importable without flax models
  return logical_to_shardings(decoder.logical_axes(model_cfg), mesh, rules)


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


def batch_divisor(mesh: Mesh | None, rules: Any = None) -> int:
  """Rows a batch must be a multiple of to shard by the `batch` rule; 1 without a mesh."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in _batch_mesh_axes(mesh, rules)]))
