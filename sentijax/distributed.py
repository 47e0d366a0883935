"""Multi-host start-up: `jax.distributed.initialize` from the `distributed` config section.

  spec = DistributedSpec.from_config(config.distributed)   # checked once, clear errors
  initialize(spec)                                          # no-op unless spec.enabled

Unset fields (None / "") are auto-detected by JAX: the TPU metadata server on Cloud TPU slices,
SLURM's environment on SLURM clusters, `JAX_LOCAL_DEVICE_IDS` for the local devices. The call
also starts JAX's preemption service, whose SIGTERM notifier the training loop polls on
multi-process runs (see sentijax/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax


class DistributedConfigError(ValueError):
  pass


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def _int_list(text: str) -> tuple[int, ...]:
  """'0,1,2' -> (0, 1, 2); raises ValueError on anything else."""
  parts = [p.strip() for p in text.split(",")]
  if not all(re.fullmatch(r"\d+", p) for p in parts):
    raise ValueError(text)
  return tuple(int(p) for p in parts)


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """What `jax.distributed.initialize` is given (defaults = `sentijax.config.base()`)."""
  enabled: bool = False
  coordinator_address: str | None = None  # "host:port" of process 0; None = auto-detect
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 900  # seconds every process waits for all others to connect
  local_device_ids: tuple[int, ...] | None = None  # this process's devices; None = auto

  @classmethod
  def from_config(cls, dist_cfg: Any) -> "DistributedSpec":
    """Reads and checks `config.distributed`; errors name the key and what to pass."""
    def err(key: str, value: Any, why: str) -> DistributedConfigError:
      return DistributedConfigError(f"config.distributed.{key}={value!r}: {why}")

    enabled = bool(dist_cfg.enabled)
    address = dist_cfg.coordinator_address or None
    nproc, pid = dist_cfg.num_processes, dist_cfg.process_id
    timeout = dist_cfg.initialization_timeout
    ids_text = str(dist_cfg.local_device_ids or "").strip()

    if not enabled:
      given = {k: v for k, v in (("coordinator_address", address), ("num_processes", nproc),
                                 ("process_id", pid), ("local_device_ids", ids_text or None))
               if v is not None}
      if given:
        key, value = next(iter(given.items()))
        raise err(key, value, "is set but distributed.enabled is False; pass "
                  "--config.distributed.enabled=True (or drop the setting)")
    if address is not None and not _ADDRESS.match(address):
      raise err("coordinator_address", address, "expected HOST:PORT of process 0, e.g. "
                "10.0.0.2:1234 or [::1]:1234 (leave unset to auto-detect on TPU / SLURM)")
    if nproc is not None and int(nproc) < 1:
      raise err("num_processes", nproc, "must be >= 1")
    if pid is not None:
      if int(pid) < 0:
        raise err("process_id", pid, "must be >= 0")
      if nproc is not None and int(pid) >= int(nproc):
        raise err("process_id", pid, f"must be < distributed.num_processes={nproc}")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
      raise err("initialization_timeout", timeout, "must be a positive number of seconds "
                "(large slices can need 900+ while every host boots and connects)")
    ids = None
    if ids_text:
      try:
        ids = _int_list(ids_text)
      except ValueError:
        raise err("local_device_ids", ids_text, "expected a comma list of device numbers, e.g. "
                  "0,1,2,3 (empty = all devices of this host / JAX_LOCAL_DEVICE_IDS)") from None
      if len(set(ids)) != len(ids):
        raise err("local_device_ids", ids_text, "lists a device twice")
    return cls(enabled=enabled, coordinator_address=address,
               num_processes=None if nproc is None else int(nproc),
               process_id=None if pid is None else int(pid),
               initialization_timeout=int(timeout), local_device_ids=ids)

  def initialize_kwargs(self) -> dict:
    """The keyword arguments for `jax.distributed.initialize` (unset ones left out)."""
    kwargs = {"initialization_timeout": self.initialization_timeout}
    for key in ("coordinator_address", "num_processes", "process_id"):
      if getattr(self, key) is not None:
        kwargs[key] = getattr(self, key)
    if self.local_device_ids is not None:
      kwargs["local_device_ids"] = list(self.local_device_ids)
    return kwargs


def initialize(dist_cfg: Any) -> DistributedSpec:
  """Checks `config.distributed` (or a `DistributedSpec`) and, when enabled, joins the job."""
  spec = dist_cfg if isinstance(dist_cfg, DistributedSpec) else DistributedSpec.from_config(
      dist_cfg)
  if spec.enabled:
    jax.distributed.initialize(**spec.initialize_kwargs())
  return spec



def process_index_and_count() -> tuple[int, int]:
  """(this process's index, number of processes): (0, 1) without jax.distributed."""
  return jax.process_index(), jax.process_count()


def _client():
  """The jax.distributed coordination client (None when not initialised)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client


_calls: dict[str, int] = {}


def _unique(name: str) -> str:
  """`name` made unique per call (every process makes the same calls in the same order)."""
  _calls[name] = _calls.get(name, 0) + 1
  return f"sentijax/{name}/{_calls[name]}"


def barrier(name: str, timeout_s: float = 7 * 24 * 3600.0) -> None:
  """Every process waits here until all have arrived (no-op on one process).

  Through the coordination service, not a device collective: a process may wait hours for a
  slower one (CPU collectives time out far sooner), and a process that died fails the wait once
  the service has noticed (its heartbeat timeout) instead of hanging.
  """
  if jax.process_count() == 1:
    return
  client = _client()
  if client is None:  # a multi-process runtime without jax.distributed: a device collective
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(_unique(name), int(timeout_s * 1000))


def check_same_on_all_processes(value: str, what: str, timeout_s: float = 600.0) -> None:
  """Raises DistributedConfigError unless every process passes the same `value` (all wait for
  all, like a barrier); `what` names it in the error."""
  if jax.process_count() == 1:
    return
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
  client = _client()
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    mine = np.frombuffer(bytes.fromhex(digest)[:8], np.uint32)
    digests = [bytes(np.asarray(x).tobytes()).hex() for x in
               np.asarray(multihost_utils.process_allgather(mine))]
  else:
    key = _unique(f"same/{what}")
    client.key_value_set(f"{key}/{jax.process_index()}", digest)
    digests = [client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000))
               for i in range(jax.process_count())]
  if len(set(digests)) > 1:
    groups: dict[str, list[int]] = {}
    for index, d in enumerate(digests):
      groups.setdefault(d, []).append(index)
    raise DistributedConfigError(
        f"processes disagree on {what}: process groups {sorted(groups.values())} see different "
        "values; give every process the same config, inputs and workdir")


def allgather(x: Any) -> Any:
  """Every process's `x` (numpy arrays of one shape and dtype on all processes), stacked on a new
  axis 0 in process order: [P, ...]; `x[None]` on one process. All processes must call."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def gather_sequences(seqs: Any) -> list[list[Any]]:
  """Every process's list of int32 sequences (lengths and counts may differ per process), in
  process order: [[process 0's], [process 1's], ...]. All processes must call (an empty list
  too); one process gets `[list(seqs)]` back, untouched."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return [list(seqs)]
  lengths = np.asarray([len(s) for s in seqs], np.int32)
  sizes_Px2 = allgather(np.asarray([len(seqs), lengths.max(initial=0)], np.int32))
  n, length = max(int(sizes_Px2[:, 0].max()), 1), max(int(sizes_Px2[:, 1].max()), 1)
  ids_NxL, lengths_N = np.zeros((n, length), np.int32), np.zeros((n,), np.int32)
  for i, s in enumerate(seqs):
    ids_NxL[i, :len(s)], lengths_N[i] = s, len(s)
  ids_PxNxL, lengths_PxN = allgather(ids_NxL), allgather(lengths_N)
  return [[ids_PxNxL[p, i, :lengths_PxN[p, i]] for i in range(int(sizes_Px2[p, 0]))]
          for p in range(len(sizes_Px2))]
