"""Served on-policy KD with and without `kd.rollout.overlap`: wall seconds per train step.

The teacher is served by `sentijax.serve` in a subprocess on its own CPU cores (`--serve-cpus`,
standing in for a teacher server on other hardware); the kd job (configs/kd.py, kd.mode=
on_policy, the sampled-token estimator scored by that server) runs on the others
(`--train-cpus`), twice from the same start: overlap off, then on (`--repeats` alternating
pairs). Per run: the median wall seconds between consecutive train steps (TensorBoard event
times, after the first `--skip` steps, which compile), the mean train/teacher_score_s; then the
ratio overlap / sequential (< 1: scoring hidden behind the step).

  python bench/bench_overlap.py --model /work/models/smollm2 --student-layers 0,29 --steps 14

The student is `--student-layers` of `--model` (model.init_layers), the teacher all of it,
sharing the tokenizer; the corpus is the job's embedded demo corpus.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sentijax import metrics

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def serve(args, port: int) -> subprocess.Popen:
  cmd = ["taskset", "-c", args.serve_cpus, sys.executable, "-m", "sentijax.main",
         "--config=configs/serve.py", f"--config.model.init={args.model}",
         f"--config.serve.port={port}", "--config.serve.max_batch=16"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while time.time() < deadline:
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
      return proc
    except OSError:
      if proc.poll() is not None:
        raise RuntimeError(f"the teacher server exited ({proc.returncode}): {' '.join(cmd)}")
      time.sleep(2)
  proc.kill()
  raise RuntimeError("the teacher server did not answer within 600 s")


def run_kd(args, url: str, workdir: Path, overlap: bool) -> dict[str, float]:
  """One kd job; {s_per_step, teacher_score_s, rkl_token} from its TensorBoard events."""
  m = args.model
  cmd = ["taskset", "-c", args.train_cpus, sys.executable, "-m", "sentijax.main",
         "--config=configs/kd.py", f"--config.workdir={workdir}", f"--config.model.init={m}",
         f"--config.model.init_layers={args.student_layers}", "--config.kd.mode=on_policy",
         "--config.kd.loss=reverse", "--config.kd.alpha=1.0",
         "--config.kd.rollout.estimator=token", f"--config.kd.lmbda={args.lmbda}",
         f"--config.kd.rollout.max_new_tokens={args.new}", "--config.teacher.backend=openai",
         f"--config.teacher.base_url={url}", f"--config.teacher.model={m}",
         f"--config.teacher.tokenizer={m}", f"--config.kd.rollout.overlap={overlap}",
         f"--config.data.seq_len={args.seq}", f"--config.train.batch_size={args.batch}",
         f"--config.train.steps={args.steps}", "--config.train.log_every=1",
         "--config.train.eval_every=0", f"--config.train.loss_chunk={args.loss_chunk}",
         "--config.checkpoint.every=100000", "--config.export_hf=False"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"kd job failed ({out.returncode}):\n{out.stdout[-2000:]}"
                       f"{out.stderr[-3000:]}")
  ev = metrics.read_scalars(workdir / "tensorboard", wall_time=True)
  times = [t for s, (_, t) in sorted(ev["train/loss"].items()) if s > args.skip]
  score = [v for s, (v, _) in ev["train/teacher_score_s"].items() if s > args.skip]
  return {"s_per_step": statistics.median(b - a for a, b in zip(times, times[1:])),
          "teacher_score_s": statistics.mean(score),
          "rkl_token": statistics.mean(v for v, _ in ev["train/rkl_token"].values())}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="HF dir: the teacher, and the student's layers")
  p.add_argument("--student-layers", default="0,29")
  p.add_argument("--steps", type=int, default=14)
  p.add_argument("--skip", type=int, default=3)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--lmbda", type=float, default=1.0)
  p.add_argument("--loss-chunk", type=int, default=64)
  p.add_argument("--serve-cpus", default="1")
  p.add_argument("--train-cpus", default="0")
  p.add_argument("--repeats", type=int, default=1)
  args = p.parse_args()
  port = free_port()
  server = serve(args, port)
  results: dict[bool, list[dict]] = {False: [], True: []}
  try:
    with tempfile.TemporaryDirectory() as tmp:
      for r in range(args.repeats):
        for overlap in (False, True):
          res = run_kd(args, f"http://127.0.0.1:{port}/v1", Path(tmp) / f"{r}_{overlap}",
                       overlap)
          results[overlap].append(res)
          print(f"overlap={overlap!s:5} repeat {r}: {res['s_per_step']:.3f} s/step, "
                f"teacher scoring {res['teacher_score_s']:.3f} s/step, "
                f"rkl_token {res['rkl_token']:.3f}", flush=True)
  finally:
    server.terminate()
    server.wait(timeout=120)
  seq = statistics.median(x["s_per_step"] for x in results[False])
  ovl = statistics.median(x["s_per_step"] for x in results[True])
  score = statistics.median(x["teacher_score_s"] for x in results[False])
  print(f"sequential {seq:.3f} s/step (scoring {score:.3f} of it), overlap {ovl:.3f} s/step: "
        f"ratio {ovl / seq:.3f} (the scoring time would give {(seq - score) / seq:.3f})")


if __name__ == "__main__":
  main()
