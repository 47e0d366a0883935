"""Bounded host memory: HF import and export of a ~245 MB checkpoint on 8 fake CPU devices.

The test writes a random fp32 Llama checkpoint (16 layers, hidden 512, mlp 2048) one tensor at a
time, then runs tests/models/hf_memory_probe.py in a subprocess (its own RSS, its own JAX with 8
devices, fsdp=8) and checks the kernel's peak RSS of each phase:

- import: peak - RSS before - bytes of the placed arrays (on CPU the device buffers are host
  memory) <= one layer's full tensor set (fp32) + 48 MiB slack (Python/XLA allocations),
  i.e. far below the checkpoint (the previous import built each stacked [layers, ...] tensor,
  ~64 MB here, in host memory before placing it);
- export: peak - RSS before <= 3 x the largest tensor (the gathered fp32 copy, its converted copy
  and the on-device slice being gathered) + the same slack, where gathering the model takes
  >= the checkpoint size.

The exported files must hold exactly the imported tensors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sentijax.models import safetensors_io

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SLACK = 48 << 20
SHAPE = dict(vocab=2048, hidden=512, mlp=2048, layers=16, heads=8, kv_heads=4)


def _write_checkpoint(directory: Path) -> tuple[int, int, int]:
  """Random Llama checkpoint; returns (checkpoint bytes, one layer's bytes, largest tensor)."""
  v, e, f, n, h, k = (SHAPE[x] for x in ("vocab", "hidden", "mlp", "layers", "heads", "kv_heads"))
  d = e // h
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": v,
            "hidden_size": e, "intermediate_size": f, "num_hidden_layers": n,
            "num_attention_heads": h, "num_key_value_heads": k, "head_dim": d,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
  (directory / "config.json").write_text(json.dumps(config))
  layer = {"input_layernorm.weight": (e,), "self_attn.q_proj.weight": (h * d, e),
           "self_attn.k_proj.weight": (k * d, e), "self_attn.v_proj.weight": (k * d, e),
           "self_attn.o_proj.weight": (e, h * d), "post_attention_layernorm.weight": (e,),
           "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e),
           "mlp.down_proj.weight": (e, f)}
  specs = [("model.embed_tokens.weight", np.float32, (v, e))]
  specs += [(f"model.layers.{i}.{name}", np.float32, shape)
            for i in range(n) for name, shape in layer.items()]
  specs += [("model.norm.weight", np.float32, (e,))]
  rng = np.random.default_rng(0)
  arrays = (rng.standard_normal(shape, dtype=np.float32) for _, _, shape in specs)
  safetensors_io.write_stream(directory / "model.safetensors", specs, arrays)
  layer_bytes = sum(int(np.prod(s)) * 4 for s in layer.values())
  largest = max(safetensors_io.nbytes_of(s) for s in specs)
  return (directory / "model.safetensors").stat().st_size, layer_bytes, largest


def test_import_and_export_host_memory_is_one_layer_not_the_model(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  src.mkdir()
  ckpt_bytes, layer_bytes, largest = _write_checkpoint(src)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(HERE / "hf_memory_probe.py"), str(src), str(out), "8"],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = json.loads(proc.stdout.strip().splitlines()[-1])
  mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
  # fsdp=8: every matrix is split 8 ways over its embed axis (norm scales are replicated).
  assert m["shard_shapes"]["['layers']['mlp']['gate_kernel']"] == [16, 64, 2048]
  assert ckpt_bytes <= m["placed"] <= ckpt_bytes * 1.01  # ~1x: one copy spread over 8 devices
  transient = m["import_peak"] - m["import_before"] - m["placed"]
  bound = layer_bytes + SLACK
  assert transient <= bound, (f"import: transient {mib(transient)} > one layer "
                              f"{mib(layer_bytes)} + slack; checkpoint {mib(ckpt_bytes)}", m)
  export = m["export_peak"] - m["export_before"]
  assert export <= 3 * largest + SLACK, (f"export: {mib(export)} > 3 x largest tensor "
                                         f"{mib(largest)} + slack; checkpoint {mib(ckpt_bytes)}", m)
  assert max(transient, export) < ckpt_bytes / 4
  # The export holds the very tensors imported (fp32 round trip is exact).
  with safetensors_io.SafetensorsFiles(src) as a, safetensors_io.SafetensorsFiles(out) as b:
    assert sorted(a.names()) == sorted(b.names())
    assert len(list(out.glob("model-*.safetensors"))) > 3
    for name in a.names():
      np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
  print(f"checkpoint {mib(ckpt_bytes)}; import transient {mib(transient)} (bound {mib(bound)}); "
        f"export peak {mib(export)} (bound {mib(3 * largest + SLACK)})")
