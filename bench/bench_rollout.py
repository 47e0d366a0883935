"""On-policy rollout throughput: `sampling.decode` (the jitted KV-cache sampler the on-policy
rollouts run) vs transformers `generate` (torch) on the same weights and prompts.

Both sample at temperature 1 (no top-k / top-p: the student's own distribution, what on-policy
reverse KL is of) exactly `--new` tokens per row (no stop token), from the same random
[B, T] prompts, float32, in this process: median of `--iters` timed runs after `--warmup`,
alternating the two. Prints new tokens/s and the sentijax/torch ratio.

  python bench/bench_rollout.py            # 40M-param Llama, 8 prompts x 64 + 64 new: ~1 min on 2 cores
  python bench/bench_rollout.py --preset llama-3.2-1b --batch 32 --seq 512 --new 256   # a GPU box

The samples differ (two random number generators); the bench times decoding only (prompt
prefill included on both sides, as a rollout runs it).
"""
# torch / transformers are imported inside functions: JAX-only code paths never load them.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np

try:  # python -m bench.bench_rollout (repo root on sys.path)
  from bench import bench_forward as common
except ImportError:  # python bench/bench_rollout.py
  import bench_forward as common  # type: ignore[no-redef]

from sentijax import models, sampling


def torch_runner(path: Path, ids_BxT: np.ndarray, new: int, device: str):
  """(run, sync): transformers `generate`, sampling `new` tokens per row at temperature 1."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               attn_implementation="sdpa").to(device).eval()
  ids = torch.as_tensor(ids_BxT, device=device)
  mask = torch.ones_like(ids)

  def run():
    with torch.no_grad():
      return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                            top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                            pad_token_id=0)
  return run, common.torch_sync(device)


def jax_runner(path: Path, ids_BxT: np.ndarray, new: int):
  """(run, sync): `sampling.decode` at temperature 1, `new` tokens per row, no stop token."""
  cfg, params = models.load_hf(path, dtype="float32")
  ids, mask = ids_BxT.astype(np.int32), np.ones(ids_BxT.shape, np.int32)
  settings = sampling.SamplingSettings(temperature=1.0, max_tokens=new)
  stops = sampling.Stops(stop_ids=[], pad_id=0)
  keys_B = sampling.keys_from_seeds(list(range(len(ids))))

  def run():
    return sampling.decode(cfg, params, ids, mask, settings, stops, keys_B=keys_B)

  def sync(out):
    jax.block_until_ready(out.tokens_BxN)
    assert int(np.min(out.lengths_B)) == new, "every row must sample exactly --new tokens"
  return run, sync


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(parser, batch=8, seq=64)
  parser.add_argument("--new", type=int, default=64, help="tokens sampled per row")
  args = parser.parse_args(argv)
  cfg = common.model_config(args)
  device = common.setup_devices(args)
  print(common.header(cfg, args, device) + f", {args.new} new tokens per row", flush=True)
  ids_BxT = common.random_ids(cfg, args.batch, args.seq, args.seed)
  with tempfile.TemporaryDirectory(prefix="sentijax_bench_") as tmp:
    common.build_hf_model(cfg, Path(tmp), args.seed)
    runners = {"torch": torch_runner(Path(tmp), ids_BxT, args.new, device),
               "sentijax": jax_runner(Path(tmp), ids_BxT, args.new)}
    seconds = common.time_interleaved(runners, args.warmup, args.iters)
  new_tokens = args.batch * args.new
  rows = [{"impl": impl, "ms/rollout": f"{seconds[impl] * 1e3:.1f}",
           "new tokens/s": f"{new_tokens / seconds[impl]:,.0f}",
           "sentijax/torch": f"{seconds['torch'] / seconds[impl]:.2f}x"}
          for impl in ("torch", "sentijax")]
  print()
  common.print_table(rows, ["impl", "ms/rollout", "new tokens/s", "sentijax/torch"])
  return rows


if __name__ == "__main__":
  main()
