"""SentiBench results: aggregation, markdown table (by category, per seed, mean, Average), chart.

    results = report.aggregate({"sc/sst2": {"42": 91.3}}, "mean")   # what Scorer.score returns
    md = report.markdown_table(results)           # results: Scorer.score(...) / results.json
    report.plot(results, "runs/x/results.png")
    report.write_report(results, "runs/x")        # results.md + results.png, returns both paths
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from sentijax import atomic
from sentijax.data import sentibench

CATEGORY_ORDER = ("basic", "multifaceted", "fine-grained")
AGGREGATIONS = ("mean", "official")
_COLORS = {"basic": "#4C72B0", "multifaceted": "#55A868", "fine-grained": "#C44E52",
           "other": "#8172B2"}


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
  """One JSON object per line, written atomically."""
  with atomic.atomic_open(path) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


write_json = atomic.write_json  # results.json: indent 1, UTF-8, trailing newline


def load_results(path: str | os.PathLike) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def aggregate(per_dataset: Mapping[str, Mapping[str, float]], aggregation: str = "mean") -> dict:
  """Results dict from {dataset: {seed: score x100}}.

  'mean': each dataset's mean over its seeds; "average" = mean over the datasets given.
  'official' (the harness's utils.save_result + parse.py): each run's F1 rounded to 4 decimals
  (x100: 2 decimals), each dataset's mean over its runs, "average" = sum over the 12 SentiBench
  datasets / 12, a dataset not scored counting as 0.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  datasets = {}
  for name, seeds in per_dataset.items():
    if not seeds:
      raise ValueError(f"dataset {name!r} has no scored seeds")
    if aggregation == "official":
      runs = {s: round(v / 100.0, 4) for s, v in seeds.items()}  # save_result: round(f1, 4)
      mean = sum(runs.values()) / len(runs) * 100  # parse.py: sum(v) / len(v) * 100
      seeds = {s: r * 100 for s, r in runs.items()}
    else:
      mean = sum(seeds.values()) / len(seeds)
    datasets[name] = {"seeds": {str(s): float(v) for s, v in seeds.items()}, "mean": float(mean)}
  if aggregation == "official":
    average = sum(datasets[n]["mean"] if n in datasets else 0.0
                  for n in sentibench.DATASETS) / len(sentibench.DATASETS)
  else:
    average = sum(d["mean"] for d in datasets.values()) / max(len(datasets), 1)
  return {"datasets": datasets, "average": float(average), "aggregation": aggregation}


def average_label(results: Mapping[str, Any]) -> str:
  """'12 datasets', '2 of 12 datasets' or 'official: 12 datasets, 10 missing as 0'."""
  names = list(results["datasets"])
  total = len(sentibench.DATASETS)
  n_bench = sum(n in sentibench.CATEGORIES for n in names)
  if results.get("aggregation") == "official":
    missing = total - n_bench
    return f"official: {total} datasets" + (f", {missing} missing as 0" if missing else "")
  if n_bench == len(names) and n_bench < total:
    return f"{n_bench} of {total} datasets"
  return f"{len(names)} datasets"


def _grouped(results: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
  """[(category, [datasets in protocol order])] for the categories present."""
  names = list(results["datasets"])
  order = {n: i for i, n in enumerate(sentibench.DATASETS)}
  groups = []
  for cat in CATEGORY_ORDER + ("other",):
    members = [n for n in names if sentibench.CATEGORIES.get(n, "other") == cat]
    if members:
      groups.append((cat, sorted(members, key=lambda n: order.get(n, len(order)))))
  return groups


def _seeds(results: Mapping[str, Any]) -> list[str]:
  seeds: dict[str, None] = {}
  for entry in results["datasets"].values():
    for s in entry["seeds"]:
      seeds.setdefault(str(s), None)
  return list(seeds)


def _fmt(x: Any) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown_table(results: Mapping[str, Any]) -> str:
  """Markdown table: one row per dataset grouped by category, category means, Average."""
  seeds = _seeds(results)
  header = ["Category", "Dataset"] + [f"seed {s}" for s in seeds] + ["Mean"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(seeds) + 1)) + "|"]
  blank = [""] * len(seeds)
  for cat, names in _grouped(results):
    for name in names:
      entry = results["datasets"][name]
      cells = [_fmt(entry["seeds"].get(s)) for s in seeds]
      lines.append("| " + " | ".join([cat, name] + cells + [_fmt(entry["mean"])]) + " |")
    if len(names) > 1:
      mean = sum(results["datasets"][n]["mean"] for n in names) / len(names)
      lines.append("| " + " | ".join(["", f"*{cat} mean*"] + blank + [f"*{_fmt(mean)}*"]) + " |")
  lines.append("| " + " | ".join([f"**Average** ({average_label(results)})", ""] + blank
                                 + [f"**{_fmt(results['average'])}**"]) + " |")
  return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: str | os.PathLike, title: str = "SentiBench") -> str:
  """Bar chart of per-dataset means (seed min-max whiskers), coloured by category, with the
  Average as a dashed line. Uses the Agg canvas directly (no pyplot, no display)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  groups = _grouped(results)
  names = [n for _, members in groups for n in members]
  cats = [cat for cat, members in groups for _ in members]
  means = [results["datasets"][n]["mean"] for n in names]
  lows, highs = [], []
  for n, m in zip(names, means):
    vals = list(results["datasets"][n]["seeds"].values()) or [m]
    lows.append(m - min(vals))
    highs.append(max(vals) - m)
  fig = Figure(figsize=(max(5.0, 0.7 * len(names) + 2.0), 4.0), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  xs = list(range(len(names)))
  ax.bar(xs, means, color=[_COLORS[c] for c in cats], yerr=[lows, highs], capsize=3)
  for x, m in zip(xs, means):
    ax.text(x, m + 1, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
  ax.axhline(results["average"], color="black", linestyle="--", linewidth=1)
  ax.set_xticks(xs)
  ax.set_xticklabels([n.split("/")[-1] for n in names], rotation=45, ha="right", fontsize=8)
  ax.set_ylim(0, 105)
  ax.set_ylabel("score (x100)")
  ax.set_title(f"{title}: Average {results['average']:.2f} ({average_label(results)})")
  handles = [Patch(color=_COLORS[c], label=c) for c, _ in groups]
  handles.append(Patch(facecolor="none", edgecolor="black", linestyle="--", label="Average"))
  ax.legend(handles=handles, fontsize=7, loc="upper right")
  fig.tight_layout()
  path = os.fspath(path)
  with atomic.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")
  return path


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[str, str]:
  """Writes results.md and results.png into `out_dir` (atomically); returns their paths."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  md_path = os.path.join(out_dir, "results.md")
  with atomic.atomic_open(md_path) as f:
    f.write("# SentiBench results\n\n" + markdown_table(results))
  return md_path, plot(results, os.path.join(out_dir, "results.png"))
