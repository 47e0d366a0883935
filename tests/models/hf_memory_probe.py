"""Host-memory probe for HF import/export on 8 fake CPU devices (run as a subprocess).

    python tests/models/hf_memory_probe.py MODEL_DIR OUT_DIR FSDP

Prints one JSON line: resident-set figures (bytes) around `models.load_hf` and `models.save_hf`.
Peaks are the kernel's exact high-water mark (VmHWM), reset before each phase through
/proc/self/clear_refs. On CPU the devices' buffers are host memory, so the import's transient
memory is its peak minus the RSS before it minus the bytes of the placed arrays.
"""
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def main(model_dir: str, out_dir: str, fsdp: int) -> dict:
  import jax
  from sentijax import config as config_lib
  from sentijax import models, sharding
  mesh = sharding.make_mesh({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
  rules = config_lib.base().sharding_rules
  # Warm up JAX's CPU client and the compile path with a tiny model (one-off costs, not import).
  tiny = models.presets.get("tiny")
  jax.block_until_ready(models.init(tiny, 0, mesh=mesh, rules=rules))
  out: dict = {}
  _reset_peak()
  out["import_before"] = _status("VmRSS")
  _, params = models.load_hf(model_dir, mesh=mesh, rules=rules)
  jax.block_until_ready(params)
  out["import_peak"] = _status("VmHWM")
  out["import_after"] = _status("VmRSS")
  out["placed"] = sum(s.data.nbytes for leaf in jax.tree.leaves(params)
                      for s in leaf.addressable_shards)
  out["shard_shapes"] = {jax.tree_util.keystr(p): list(leaf.addressable_shards[0].data.shape)
                         for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  cfg = models.hf.read_config(model_dir)
  _reset_peak()
  out["export_before"] = _status("VmRSS")
  models.save_hf(cfg, params, out_dir, max_shard_bytes=64 << 20)
  out["export_peak"] = _status("VmHWM")
  return out


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
