"""Device mesh and logical-axis sharding rules.

Mesh axes are `('data', 'fsdp', 'tensor')`, sized from the config (-1 = the devices left over).
Params name their axes logically (`embed`, `mlp`, `heads`, ...); the rules in the config map each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). Batches shard their
leading axis over `('data', 'fsdp')`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(x: Any) -> np.ndarray:
  """numpy copy of a (possibly sharded, possibly multi-host) array; all processes must call."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def batch_divisor(mesh: Mesh | None) -> int:
  """Rows a batch must be a multiple of to shard over ('data', 'fsdp'); 1 without a mesh."""
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
