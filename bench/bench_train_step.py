"""Train-step throughput: the jitted sentijax step vs a torch AdamW step on the same model/batch.

sentijax: `train.step.train_step` (AdamW with clipping from `sentijax.config.base().train`, fp32
params, compute in `--dtypes`), jitted with the state donated. torch: forward + CE loss +
backward + clip + AdamW step on the transformers model (bfloat16 via autocast, fp32 params).
Both see the same weights and the same random [B, T] batch with every token weighted. Prints
tokens/s, the sentijax/torch ratio, achieved TFLOP/s and MFU (`cfg.flops_per_token(T)` over
`sentijax.metrics.peak_tflops_per_device`), |first loss difference| (a parity check) and peak
device memory (GPU only).

  python bench/bench_train_step.py        # 40M-param Llama, 2 x 256 tokens: ~25 s on 2 CPU cores
  python bench/bench_train_step.py --preset llama-3.2-1b --batch 8 --seq 2048   # a GPU box

Devices (`--device auto`): JAX on its default backend, torch on CUDA when available, else CPU;
`--device cpu` puts both on the CPU. MFU needs a known peak: set --peak-tflops on CPUs.
"""
# torch / transformers are imported inside functions: JAX-only code paths never load them.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import config as config_lib
from sentijax import metrics, models
from sentijax.train import state as state_lib
from sentijax.train import step as step_lib

try:  # python -m bench.bench_train_step (repo root on sys.path)
  from bench import bench_forward as common
except ImportError:  # python bench/bench_train_step.py
  import bench_forward as common  # type: ignore[no-redef]


def train_config(lr: float):
  """AdamW settings shared by both sides (constant lr, no warmup)."""
  tc = config_lib.base().train
  tc.learning_rate, tc.warmup_steps, tc.schedule = lr, 1, "constant"
  return tc


def make_batch(cfg: models.ModelConfig, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
  ids_BxT1 = common.random_ids(cfg, batch, seq + 1, seed)
  return {"inputs": ids_BxT1[:, :-1], "targets": ids_BxT1[:, 1:],
          "weights": np.ones((batch, seq), np.float32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def jax_runner(path: Path, batch: dict[str, np.ndarray], dtype: str, tc):
  """(run, sync, first loss): the jitted sentijax step, state donated; run once already."""
  cfg, params = models.load_hf(path, dtype="float32", compute_dtype=dtype)
  tx = state_lib.make_optimizer(tc)
  state = jax.jit(lambda p: state_lib.create_state(p, tx))(params)
  del params
  step_fn = jax.jit(functools.partial(step_lib.train_step, spec=step_lib.StepSpec(cfg, tx)),
                    donate_argnums=0)
  batch_jax = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32)
               for k, v in batch.items()}

  def run():
    nonlocal state
    state, m = step_fn(state, batch_jax)
    return state, m
  _, m = jax.block_until_ready(run())
  return run, jax.block_until_ready, float(m["loss"])


def torch_runner(model, batch: dict[str, np.ndarray], dtype: str, device: str, tc):
  """(run, sync, first loss): forward + CE + backward + clip + AdamW; run once already."""
  import torch
  import torch.nn.functional as F
  model.to(device=device, dtype=torch.float32).train()
  decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
  no_decay = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(tc.weight_decay)},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=float(tc.learning_rate), betas=(float(tc.b1), float(tc.b2)),
                          fused=device == "cuda")
  inputs = torch.as_tensor(batch["inputs"], device=device)
  targets = torch.as_tensor(batch["targets"], device=device)

  def run():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  sync = common.torch_sync(device)
  return run, sync, float(sync(run()).item())


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(parser, batch=2, seq=256)
  parser.set_defaults(warmup=1, iters=3)  # the first step (compile) is the warm-up
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="compute dtypes (params and optimizer state stay float32)")
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="per-device peak for MFU; 0 = look the device up")
  args = parser.parse_args(argv)
  cfg = common.model_config(args)
  device = common.setup_devices(args)
  print(common.header(cfg, args, device), flush=True)
  tc = train_config(args.lr)
  batch = make_batch(cfg, args.batch, args.seq, args.seed)
  tokens = args.batch * args.seq
  flops_per_token = cfg.flops_per_token(args.seq)
  peak = metrics.peak_tflops_per_device(args.peak_tflops)
  torch_same_device = (device == "cuda") == (jax.default_backend() == "gpu")
  rows = []
  with tempfile.TemporaryDirectory(prefix="sentijax_bench_") as tmp:
    model = common.build_hf_model(cfg, Path(tmp), args.seed)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in args.dtypes.split(","):
      model.load_state_dict(init_state)  # every run starts from the saved weights
      common.torch_reset_peak(device)
      t_run, t_sync, t_loss = torch_runner(model, batch, dtype, device, tc)
      j_run, j_sync, j_loss = jax_runner(Path(tmp), batch, dtype, tc)
      seconds = common.time_interleaved({"torch": (t_run, t_sync), "sentijax": (j_run, j_sync)},
                                        max(args.warmup - 1, 0), args.iters)
      first_loss = {"torch": t_loss, "sentijax": j_loss}
      peaks = {"torch": common.torch_peak_bytes(device), "sentijax": common.jax_peak_bytes()}
      del t_run, j_run
      for impl in ("torch", "sentijax"):
        tok_s = tokens / seconds[impl]
        has_peak = peak and (impl == "sentijax" or torch_same_device)
        rows.append({
            "impl": impl, "dtype": dtype, "ms/step": f"{seconds[impl] * 1e3:.0f}",
            "tokens/s": f"{tok_s:,.0f}",
            "sentijax/torch": f"{seconds['torch'] / seconds[impl]:.2f}x",
            "TFLOP/s": f"{tok_s * flops_per_token / 1e12:.3f}",
            "MFU": f"{metrics.mfu(tok_s, flops_per_token, 1, peak):.1%}" if has_peak else "n/a",
            "first loss": f"{first_loss[impl]:.4f}",
            "|dloss|": "" if impl == "torch" else f"{abs(j_loss - t_loss):.1e}",
            "peak mem": common.fmt_bytes(peaks[impl])})
      print(f"  {dtype}: torch {seconds['torch'] * 1e3:.0f} ms/step, sentijax "
            f"{seconds['sentijax'] * 1e3:.0f} ms/step", flush=True)
  peak_text = f"{peak:g} TFLOP/s per device" if peak else "unknown (set --peak-tflops)"
  print(f"\n{flops_per_token / 1e9:.3f} GFLOP/token (train, seq {args.seq}); peak {peak_text}")
  common.print_table(rows, ["impl", "dtype", "ms/step", "tokens/s", "sentijax/torch", "TFLOP/s",
                            "MFU", "first loss", "|dloss|", "peak mem"])
  return rows


if __name__ == "__main__":
  main()
