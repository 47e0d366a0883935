"""Multi-host start-up: `jax.distributed.initialize` from config or the cluster environment."""
import jax


def initialize(dist_cfg) -> None:
  """No-op unless `distributed.enabled`; unset fields are auto-detected (TPU pods, SLURM)."""
  if not dist_cfg.enabled:
    return
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes is not None:
    kwargs["num_processes"] = int(dist_cfg.num_processes)
  if dist_cfg.process_id is not None:
    kwargs["process_id"] = int(dist_cfg.process_id)
  jax.distributed.initialize(**kwargs)
