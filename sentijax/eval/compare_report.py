"""The comparison's outputs: compare.md (table + notes), compare.json and compare.png."""
from __future__ import annotations

import os
from typing import Any, Mapping

from sentijax import atomic

PNG_DPI = 100
PNG_HEIGHT_IN = 4.5


def _delta_cell(d: Mapping[str, Any]) -> str:
  if d["ci_low"] is None:
    return f"{d['delta']:+.2f} (no CI)"
  star = " †" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
  return f"{d['delta']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]{star}"


def _items_cell(row: Mapping[str, Any]) -> str:
  items = "–" if row["items"] is None else str(row["items"])
  return f"{items} × {len(row['seeds'])}"


def markdown(result: Mapping[str, Any]) -> str:
  """The comparison table (datasets by category, category means, Average) and its notes."""
  base = result["baseline"]
  others = [r["label"] for r in result["runs"] if r["label"] != base]
  header = (["Category", "Dataset", "Items × seeds", f"{base} (baseline)"]
            + [c for lab in others for c in (lab, f"Δ {lab} (95% CI)")])
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (
      len(header) - 3)) + "|"]
  for row in result["rows"]:
    seen = row.get("trained_on", [])

    def score(lab: str) -> str:
      return f"{row['scores'][lab]:.2f}" + (" ‡" if lab in seen else "")

    cells = [score(base)]
    for lab in others:
      cells += [score(lab), _delta_cell(row["deltas"][lab])]
    if row["kind"] == "dataset":
      head = [row["category"], row["name"], _items_cell(row)]
    elif row["kind"] == "category":
      head, cells = ["", f"*{row['name']}*", _items_cell(row)], [f"*{c}*" for c in cells]
    else:
      head = [f"**Average** ({result['average_label']})", "", _items_cell(row)]
      cells = [f"**{c}**" for c in cells]
    lines.append("| " + " | ".join(head + cells) + " |")
  b = result["bootstrap"]
  notes = [f"Δ = run − {base} (score x100). 95% CI: paired bootstrap over test items (every run "
           f"and seed scored on the same resampled items; category means and the Average "
           f"resample all their datasets), {b['resamples']} resamples, seed {b['seed']}; "
           "† = the CI excludes 0."] + list(result["notes"])
  if any(row.get("trained_on") for row in result["rows"]):
    notes.insert(1, "‡ = the run's model was trained on this dataset's train split (an ICLDist "
                 "source task; its test items stay out of training); that run's other datasets "
                 "were held out (results.json `training`).")
  return ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
          + label_counts_markdown(result))


def label_counts_markdown(result: Mapping[str, Any]) -> str:
  """Per classification dataset: gold label counts and each run's predicted counts (items x
  seeds compared), the first thing to read when a run's macro-F1 moves."""
  rows = [r for r in result["rows"] if r.get("label_counts")]
  if not rows:
    return ""
  runs = [r["label"] for r in result["runs"]]
  lines = ["", "## Predicted labels", "",
           "| Dataset | Label | gold | " + " | ".join(runs) + " |",
           "|---|---|" + "---:|" * (len(runs) + 1)]
  for row in rows:
    counts = row["label_counts"]
    labels = list(dict.fromkeys([*counts["gold"], *(k for r in runs for k in counts[r])]))
    for j, lab in enumerate(labels):
      cells = [str(counts[c].get(lab, 0)) for c in ["gold", *runs]]
      lines.append(f"| {row['name'] if j == 0 else ''} | {lab} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"



def plot(result: Mapping[str, Any], path: str | os.PathLike) -> str:
  """Deltas against the baseline with their 95% CI bars, one marker colour per run (a hollow
  marker: no CI). Size: max(6, 0.5 x rows + 2) x 4.5 inches at PNG_DPI."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  rows, base = result["rows"], result["baseline"]
  others = [r["label"] for r in result["runs"] if r["label"] != base]
  fig = Figure(figsize=(max(6.0, 0.5 * len(rows) + 2.0), PNG_HEIGHT_IN), dpi=PNG_DPI)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.7 / max(len(others), 1)
  for j, lab in enumerate(others):
    color = f"C{j}"
    xs = [k - 0.35 + width * (j + 0.5) for k in range(len(rows))]
    deltas = [r["deltas"][lab] for r in rows]
    with_ci = [(x, d) for x, d in zip(xs, deltas) if d["ci_low"] is not None]
    if with_ci:
      ax.errorbar([x for x, _ in with_ci], [d["delta"] for _, d in with_ci],
                  yerr=[[d["delta"] - d["ci_low"] for _, d in with_ci],
                        [d["ci_high"] - d["delta"] for _, d in with_ci]],
                  fmt="o", color=color, capsize=3, label=lab)
    without = [(x, d) for x, d in zip(xs, deltas) if d["ci_low"] is None]
    if without:
      ax.plot([x for x, _ in without], [d["delta"] for _, d in without], "o", mfc="none",
              color=color, label=f"{lab} (no CI)")
  ax.axhline(0.0, color="black", linewidth=0.8)
  for k, row in enumerate(rows):
    if row["kind"] != "dataset":
      ax.axvspan(k - 0.5, k + 0.5, color="0.92", zorder=0)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([r["name"].split("/")[-1] for r in rows], rotation=45, ha="right",
                     fontsize=8)
  ax.set_xlim(-0.5, len(rows) - 0.5)
  ax.set_ylabel(f"Δ vs {base} (score x100)")
  ax.set_title(f"Δ vs {base}, 95% paired bootstrap CI ({result['bootstrap']['resamples']} "
               "resamples)", fontsize=10)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  path = os.fspath(path)
  with atomic.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")
  return path


def write(result: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[str, str, str]:
  """Writes compare.md, compare.json and compare.png into `out_dir`; returns their paths."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  md_path, json_path = os.path.join(out_dir, "compare.md"), os.path.join(out_dir, "compare.json")
  with atomic.atomic_open(md_path) as f:
    f.write(f"# SentiBench: runs against {result['baseline']}\n\n" + markdown(result))
  atomic.write_json(json_path, result)
  return md_path, json_path, plot(result, os.path.join(out_dir, "compare.png"))
