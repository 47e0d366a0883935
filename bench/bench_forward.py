"""Forward throughput: the jitted sentijax decoder vs transformers (torch) on the same weights.

A random transformers model is saved with `save_pretrained`, loaded with `models.load_hf`, and
both forwards run on the same [B, T] batch in this process (float32, then bfloat16): median of
`--iters` timed runs after `--warmup` runs. Prints tokens/s, the sentijax/torch ratio, max |logit
difference| (float32: a parity check) and peak device memory (GPU only).

  python bench/bench_forward.py              # 40M-param Llama, 4 x 256 tokens: ~20 s on 2 CPU cores
  python bench/bench_forward.py --preset llama-3.2-1b --batch 8 --seq 2048    # a GPU box

Devices (`--device auto`): JAX uses its default backend (GPU/TPU when installed, else CPU); torch
uses CUDA when available, else CPU. On a TPU host torch runs on the CPU, so the ratio is not
like-for-like there. `--device cpu` puts both on the CPU.
"""
# torch / transformers are imported inside functions: JAX-only code paths never load them.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models
from sentijax.models import hf as hf_lib

DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------------------------
# Shared by both benchmarks (bench_train_step imports these).


def add_model_flags(parser: argparse.ArgumentParser, batch: int, seq: int) -> None:
  parser.add_argument(
      "--device", choices=("auto", "cpu"), default="auto",
      help="auto: JAX on its default backend (GPU/TPU when installed, else CPU), torch on CUDA "
           "when available, else CPU; cpu: both on the CPU")
  g = parser.add_argument_group("model (ignored with --preset)")
  g.add_argument("--preset", default="", help="a sentijax preset, e.g. llama-3.2-1b, qwen2.5-0.5b")
  g.add_argument("--vocab", type=int, default=32000)
  g.add_argument("--hidden", type=int, default=512)
  g.add_argument("--intermediate", type=int, default=1408)
  g.add_argument("--layers", type=int, default=8)
  g.add_argument("--heads", type=int, default=8)
  g.add_argument("--kv-heads", type=int, default=4)
  g.add_argument("--head-dim", type=int, default=64)
  g.add_argument("--untied", action="store_true", help="separate lm_head (default: tied)")
  g = parser.add_argument_group("run")
  g.add_argument("--batch", type=int, default=batch)
  g.add_argument("--seq", type=int, default=seq)
  g.add_argument("--warmup", type=int, default=2)
  g.add_argument("--iters", type=int, default=5)
  g.add_argument("--seed", type=int, default=0)


def model_config(args: argparse.Namespace) -> models.ModelConfig:
  """The benchmarked shape: a preset, or a Llama built from the flags."""
  if args.preset:
    return models.presets.get(args.preset)
  return models.ModelConfig(
      architecture="llama", vocab_size=args.vocab, hidden_size=args.hidden,
      intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
      num_kv_heads=args.kv_heads, head_dim=args.head_dim, rope_theta=500000.0,
      tie_embeddings=not args.untied, max_position_embeddings=max(8192, args.seq),
      bos_token_id=1, eos_token_id=2)


def setup_devices(args: argparse.Namespace) -> str:
  """Applies --device before JAX starts its backend; returns the torch device."""
  import torch
  if args.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
    return "cpu"
  return "cuda" if torch.cuda.is_available() else "cpu"


def build_hf_model(cfg: models.ModelConfig, path: Path, seed: int):
  """A random transformers model of shape `cfg`, saved to `path` (float32 safetensors)."""
  import torch
  import transformers
  from transformers import AutoConfig, AutoModelForCausalLM
  transformers.utils.logging.disable_progress_bar()
  hf_cfg = dict(hf_lib.config_to_hf(cfg))
  hf_cfg.pop("architectures")
  config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  model.save_pretrained(path)
  return model


def random_ids(cfg: models.ModelConfig, batch: int, seq: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, seq)).astype(np.int64)


def time_interleaved(runners: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
                     warmup: int, iters: int) -> dict[str, float]:
  """Median seconds per call of each `(fn, sync)` runner; `sync` waits for fn's result.

  After `warmup` calls each, the runners alternate call by call, so load from other processes
  on a shared machine hits all of them alike.
  """
  for fn, sync in runners.values():
    for _ in range(warmup):
      sync(fn())
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(iters):
    for name, (fn, sync) in runners.items():
      t0 = time.perf_counter()
      sync(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def jax_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def torch_sync(device: str) -> Callable[[Any], Any]:
  import torch

  def sync(out):
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  return sync


def torch_reset_peak(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes(device: str) -> int | None:
  import torch
  return torch.cuda.max_memory_allocated() if device == "cuda" else None


def fmt_bytes(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def header(cfg: models.ModelConfig, args: argparse.Namespace, device: str) -> str:
  import torch
  dev = jax.devices()[0]
  name = args.preset or (f"llama h{cfg.hidden_size} f{cfg.intermediate_size} "
                         f"L{cfg.num_layers} v{cfg.vocab_size}")
  return (f"model {name}: {cfg.num_params / 1e6:.1f}M params; batch {args.batch} x "
          f"{args.seq} tokens; median of {args.iters} after {args.warmup} warm-up\n"
          f"jax {jax.__version__} on {jax.default_backend()} ({dev.device_kind}, "
          f"{jax.device_count()} device(s)); torch {torch.__version__} on {device} "
          f"({torch.get_num_threads()} threads); host: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")


def print_table(rows: list[dict], columns: list[str]) -> None:
  widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


# --------------------------------------------------------------------------------------------
# The forward benchmark.


def torch_runner(path: Path, ids_BxT: np.ndarray, dtype: str, device: str):
  """(run, sync): the transformers forward of the checkpoint at `path` in `dtype`, no_grad."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                               attn_implementation="sdpa").to(device).eval()
  ids = torch.as_tensor(ids_BxT, device=device)

  def run():
    with torch.no_grad():
      return model(input_ids=ids).logits
  return run, torch_sync(device)


def jax_runner(path: Path, ids_BxT: np.ndarray, dtype: str):
  """(run, sync): the jitted sentijax forward of the checkpoint at `path` in `dtype`."""
  cfg, params = models.load_hf(path, dtype=dtype)
  fwd = jax.jit(models.forward, static_argnums=0)
  ids = jnp.asarray(ids_BxT, jnp.int32)
  return (lambda: fwd(cfg, params, ids)), jax.block_until_ready


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_model_flags(parser, batch=4, seq=256)
  parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float32,bfloat16")
  args = parser.parse_args(argv)
  cfg = model_config(args)
  device = setup_devices(args)
  print(header(cfg, args, device), flush=True)
  tokens = args.batch * args.seq
  ids_BxT = random_ids(cfg, args.batch, args.seq, args.seed)
  rows = []
  with tempfile.TemporaryDirectory(prefix="sentijax_bench_") as tmp:
    build_hf_model(cfg, Path(tmp), args.seed)  # saved, then dropped: each dtype loads a copy
    for dtype in args.dtypes.split(","):
      runners = {"torch": torch_runner(Path(tmp), ids_BxT, dtype, device),
                 "sentijax": jax_runner(Path(tmp), ids_BxT, dtype)}
      torch_reset_peak(device)
      seconds = time_interleaved(runners, args.warmup, args.iters)
      peaks = {"torch": torch_peak_bytes(device), "sentijax": jax_peak_bytes()}
      diff = "n/a"
      if dtype == "float32":
        ref_logits = runners["torch"][0]().float().cpu().numpy()
        diff = f"{float(np.max(np.abs(np.asarray(runners['sentijax'][0]()) - ref_logits))):.2e}"
      del runners
      for impl in ("torch", "sentijax"):
        rows.append({"impl": impl, "dtype": dtype, "ms/iter": f"{seconds[impl] * 1e3:.1f}",
                     "tokens/s": f"{tokens / seconds[impl]:,.0f}",
                     "sentijax/torch": (f"{seconds['torch'] / seconds[impl]:.2f}x"),
                     "max|dlogit|": diff if impl == "sentijax" else "",
                     "peak mem": fmt_bytes(peaks[impl])})
      print(f"  {dtype}: torch {seconds['torch'] * 1e3:.1f} ms, sentijax "
            f"{seconds['sentijax'] * 1e3:.1f} ms", flush=True)
  print()
  print_table(rows, ["impl", "dtype", "ms/iter", "tokens/s", "sentijax/torch", "max|dlogit|",
                     "peak mem"])
  return rows


if __name__ == "__main__":
  main()
