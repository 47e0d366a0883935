"""`python -m sentijax.compare RUN [RUN ...] [--out DIR] [--baseline 0]`: SentiBench runs side by
side with deltas and paired-bootstrap 95% CIs (see sentijax/eval/compare.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sentijax import config as config_lib
from sentijax.eval import compare, compare_report
from sentijax.eval import runs as runs_lib


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sentijax.compare RUN [RUN ...] [--out DIR] [--baseline 0]`."""
  p = argparse.ArgumentParser(prog="python -m sentijax.compare", description=(
      "Compare SentiBench runs: scores, deltas against a baseline run and paired-bootstrap 95% "
      "CIs. RUN: a sentibench job workdir, a training workdir, its sentibench/ dir or a "
      "results file (results.json, step_N.json)."))
  p.add_argument("runs", nargs="+", metavar="RUN")
  p.add_argument("--out", default="compare", help="output dir for compare.md/.json/.png")
  p.add_argument("--baseline", type=int, default=0, help="index of the baseline run")
  p.add_argument("--labels", default="", help="comma list of run labels (default: from paths)")
  p.add_argument("--resamples", type=int, default=compare.MIN_RESAMPLES,
                 help=f"bootstrap resamples (>= {compare.MIN_RESAMPLES})")
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  p.add_argument("--data-dir", default=config_lib.base().eval.data_dir,
                 help="SentiBench data (absa/opener predictions need its test sentences, "
                 "gold-free predictions its labels)")
  p.add_argument("--publish", default="", metavar="DIR",
                 help="also write each run's results and predictions WITHOUT gold labels to "
                 "DIR/<label>/ (to commit; compare them later with --data-dir)")
  args = p.parse_args(argv)
  if args.resamples < compare.MIN_RESAMPLES:
    p.error(f"--resamples must be >= {compare.MIN_RESAMPLES}, got {args.resamples}")
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else [None] * len(args.runs)
  if len(labels) != len(args.runs):
    p.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
  try:
    runs = [runs_lib.load_run(path, label) for path, label in zip(args.runs, labels)]
    result = compare.compare(runs, args.baseline, args.resamples, args.seed, args.data_dir)
    if args.publish:
      print("published (no gold labels): " + ", ".join(runs_lib.publish(runs, args.publish)))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths = compare_report.write(result, args.out)
  print(compare_report.markdown(result))
  print("wrote " + ", ".join(paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
