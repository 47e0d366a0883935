"""Run-vs-run SentiBench comparison: scores, deltas and paired-bootstrap 95% CIs.

    python -m sentijax.compare runs/base runs/kd runs/both --out runs/compare --baseline 0
    python -m sentijax.compare runs/icl/sentibench/step_0.json runs/icl   # before / after training

A run is a results file (the scorer's schema) plus, when found, its predictions:
  * a sentibench job workdir: `<dir>/results.json`, predictions `<dir>/predictions/`;
  * a training workdir (`<dir>/sentibench/step_N.json`, highest N) or that sentibench/ dir;
  * one results file: `results.json` (predictions in `predictions/` beside it) or `step_N.json`
    (predictions in `predictions/step_N/` beside it, when that exists).
Prediction files are `<dataset with / -> _>_<seed>.jsonl` ({"index", "gold", "prediction"}).
A row without "gold" takes it from the SentiBench test split in `--data-dir`: `--publish DIR`
writes such gold-free copies of the runs (results + predictions), small enough to commit
without redistributing the benchmark's labels, and the comparison rebuilt from them is the same.

Each dataset is compared on the test items and seeds every run scored (intersection, with a
note). Scores are recomputed from the predictions with the scorer's metric functions
(`eval/metrics.py`; each file must reproduce its results.json score on its full item set) and
aggregated as the runs' own aggregation does (`report.aggregate`). The CI of a delta is a
paired bootstrap over test items: each resample draws the dataset's items with replacement
once and scores every run and every seed on those same items (seeds kept together); category
means and the Average resample every dataset at once. A dataset without predictions (the
training hooks write scores only) gets scores and deltas without a CI. Runs whose recorded
protocol settings differ (`aggregation`, and any key of a results file's optional "settings"
mapping, such as templates, k_shot or the generation config) are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sentijax import atomic
from sentijax.data import sentibench
from sentijax.eval import metrics, report, scorer

MIN_RESAMPLES = 1000
CONFIDENCE = 0.95
PNG_DPI = 100
PNG_HEIGHT_IN = 4.5
_STEP = re.compile(r"^step_(\d+)\.json$")
_OFFICIAL_TOL = 0.005 + 1e-6  # official aggregation stores each seed's F1 rounded to 2 dp (x100)


@dataclasses.dataclass
class Run:
  """One run to compare: its results file, results dict and predictions directory (or None)."""
  label: str
  results_path: str
  results: dict
  predictions_dir: str | None
  looked_for: str  # where predictions were looked for (for notes)

  @property
  def aggregation(self) -> str:
    return str(self.results.get("aggregation", "mean"))


# --------------------------------------------------------------------------- loading runs


def _last_step(directory: str) -> str | None:
  steps = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _STEP.match(n))]
  return os.path.join(directory, max(steps)[1]) if steps else None


def resolve(path: str | os.PathLike) -> tuple[str, str]:
  """(results file, its predictions directory) of a run dir, sentibench/ dir or results file.

  The predictions directory is where predictions would be; it may not exist.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "results.json")):
      path = os.path.join(path, "results.json")
    else:
      step = None
      if os.path.isdir(os.path.join(path, "sentibench")):
        step = _last_step(os.path.join(path, "sentibench"))
      step = step or _last_step(path)
      if step is None:
        raise FileNotFoundError(
            f"{path}: no results.json, sentibench/step_N.json or step_N.json in it; pass a "
            "sentibench job workdir, a training workdir or a results file")
      path = step
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such run directory or results file")
  directory, name = os.path.split(os.path.abspath(path))
  m = _STEP.match(name)
  preds = os.path.join(directory, "predictions", f"step_{m.group(1)}" if m else "")
  return path, os.path.normpath(preds)


def default_label(results_path: str) -> str:
  """'base' for base/results.json, 'icl@step_200' for icl/sentibench/step_200.json."""
  directory, name = os.path.split(os.path.abspath(results_path))
  m = _STEP.match(name)
  if m:
    owner = os.path.dirname(directory) if os.path.basename(directory) == "sentibench" else directory
    return f"{os.path.basename(owner)}@step_{m.group(1)}"
  stem, owner = os.path.splitext(name)[0], os.path.basename(directory)
  return owner if stem == "results" else f"{owner}/{stem}"


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
  """Reads a run's results file (validated) and locates its predictions."""
  results_path, preds = resolve(path)
  try:
    results = report.load_results(results_path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{results_path}: not valid JSON ({e})") from None
  datasets = results.get("datasets") if isinstance(results, dict) else None
  if not isinstance(datasets, dict) or not datasets:
    raise ValueError(f"{results_path}: no 'datasets' mapping; expected the scorer's results "
                     "schema {\"datasets\": {name: {\"seeds\": {seed: score}, ...}}, ...}")
  for name, entry in datasets.items():
    seeds = entry.get("seeds") if isinstance(entry, dict) else None
    if not isinstance(seeds, dict) or not seeds:
      raise ValueError(f"{results_path}: datasets[{name!r}] has no 'seeds' mapping of scores")
    bad = [s for s, v in seeds.items() if not str(s).lstrip("-").isdigit()
           or not isinstance(v, (int, float))]
    if bad:
      raise ValueError(f"{results_path}: datasets[{name!r}]['seeds'] needs integer seeds with "
                       f"numeric scores; got {bad[0]!r}: {seeds[bad[0]]!r}")
  return Run(label or default_label(results_path), results_path, results,
             preds if os.path.isdir(preds) else None, preds)


def read_predictions(path: str) -> dict[int, dict]:
  """{item index: row} of one predictions file; errors name the file and line."""
  rows: dict[int, dict] = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
      missing = [k for k in ("index", "prediction") if k not in row]
      if missing:
        raise ValueError(f"{path}:{line_no}: row lacks {missing}")
      if row["index"] in rows:
        raise ValueError(f"{path}:{line_no}: item index {row['index']} appears twice")
      rows[int(row["index"])] = row
  return rows


def check_settings(runs: Sequence[Run]) -> list[str]:
  """Raises ValueError naming the first protocol setting that differs; returns notes."""
  first = runs[0]
  for run in runs[1:]:
    if run.aggregation != first.aggregation:
      raise ValueError(
          f"protocol setting 'aggregation' differs: {first.label} ({first.results_path}) "
          f"{first.aggregation!r} vs {run.label} ({run.results_path}) {run.aggregation!r}; "
          "rescore one of them with the same --config.eval.aggregation")
  recorded = [r for r in runs if isinstance(r.results.get("settings"), dict)]
  for run in recorded[1:]:
    a, b = recorded[0].results["settings"], run.results["settings"]
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        raise ValueError(
            f"protocol setting {key!r} differs: {recorded[0].label} ({recorded[0].results_path}) "
            f"{a.get(key)!r} vs {run.label} ({run.results_path}) {b.get(key)!r}; runs scored "
            "under different protocol settings are not comparable")
  unrecorded = [r.label for r in runs if r not in recorded]
  if unrecorded:
    return [f"protocol settings other than aggregation (templates, k shots, generation config) "
            f"are not recorded in the results of {', '.join(unrecorded)}: not checked"]
  return []


# --------------------------------------------------------------------------- metric items


def _freeze(x: Any) -> Any:
  return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass
class _Dataset:
  """A dataset's compared items: metric-ready golds and, per run and seed, predictions."""
  name: str
  metric: str
  indices: list[int]
  seeds: list[str]
  golds: list[Any]
  preds: dict[str, dict[str, list[Any]]]  # label -> seed -> per item

  def score(self, label: str, seed: str, idx: Sequence[int] | None = None) -> float:
    golds, preds = self.golds, self.preds[label][seed]
    if idx is not None:
      golds, preds = [golds[i] for i in idx], [preds[i] for i in idx]
    return metric_fn(self.metric)(golds, preds)


def dataset_metric(runs: Sequence[Run], name: str) -> str:
  """The metric a results file records for `name` (held-out tasks outside SentiBench record
  theirs), else SentiBench's; runs that disagree are refused."""
  recorded = {r.results["datasets"][name].get("metric") for r in runs
              if name in r.results.get("datasets", {})} - {None}
  if len(recorded) > 1:
    raise ValueError(f"{name}: the runs record different metrics {sorted(recorded)}")
  return recorded.pop() if recorded else metrics.metric_of(name)


def metric_fn(metric: str) -> Callable[[Sequence[Any], Sequence[Any]], float]:
  """(metric-ready golds, preds) -> score x100 with the scorer's metric functions."""
  if metric == "macro_f1":
    return lambda g, p: 100.0 * metrics.macro_f1(g, p)
  if metric == "micro_f1":
    return lambda g, p: 100.0 * metrics.micro_f1_tuples(g, p)
  if metric == "graph_f1":
    return lambda g, p: 100.0 * metrics.graph_prf(g, p)[2]
  raise ValueError(f"unknown metric {metric!r}; known: {', '.join(metrics.METRICS)}")


class _Items:
  """Turns prediction rows into metric-ready items as `metrics.score_dataset` would."""

  def __init__(self, data_dir: str | os.PathLike | None):
    self.data_dir = data_dir
    self._tests: dict[str, list[sentibench.Example]] = {}

  def _test(self, name: str, where: str) -> list[sentibench.Example]:
    if name not in self._tests:
      if not self.data_dir or not os.path.isdir(self.data_dir):
        raise FileNotFoundError(
            f"{where}: scoring {name} needs its test sentences and gold opinions from the "
            f"SentiBench data; data dir {self.data_dir!r} not found (pass --data-dir)")
      self._tests[name] = sentibench.load_split(self.data_dir, name, "test")
    return self._tests[name]

  def fill_gold(self, name: str, row: dict, where: str) -> None:
    """A gold-free row (`publish`) gets its gold from the test split, as JSON would hold it."""
    if "gold" in row:
      return
    try:
      test = self._test(name, where)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}: its rows carry no gold labels") from None
    i = int(row["index"])
    if not 0 <= i < len(test):
      raise ValueError(f"{where}: item {i} is outside {name}'s {len(test)} test items in "
                       f"{self.data_dir}; pass the --data-dir it was scored on")
    row["gold"] = json.loads(json.dumps(test[i].gold))

  def gold(self, name: str, metric: str, row: dict, where: str) -> Any:
    if metric == "macro_f1":
      return str(row["gold"]).lower()
    if metric == "micro_f1":
      return [_freeze(t) for t in row["gold"]]
    ex = self._example(name, row, where)
    return metrics.opinions_to_graphs(ex.sentence, ex.raw.get("opinions", []))

  def pred(self, name: str, metric: str, row: dict, where: str) -> Any:
    if metric == "macro_f1":
      return row["prediction"]
    if metric == "micro_f1":
      return [_freeze(t) for t in row["prediction"]]
    sentence = self._example(name, row, where).sentence
    return metrics.opinions_to_graphs(sentence, metrics.opinions_from_strings(
        sentence, row["prediction"]))

  def _example(self, name: str, row: dict, where: str) -> sentibench.Example:
    test = self._test(name, where)
    i = int(row["index"])
    if not 0 <= i < len(test) or _freeze(test[i].gold) != _freeze(row["gold"]):
      raise ValueError(f"{where}: item {i} does not match {name} test item {i} in "
                       f"{self.data_dir} (other data?); pass the --data-dir it was scored on")
    return test[i]


def _reported(run: Run, name: str, seed: str) -> float:
  return float(run.results["datasets"][name]["seeds"][seed])


def _check_reproduces(run: Run, name: str, seed: str, metric: str, golds: list, preds: list,
                      path: str) -> None:
  """The predictions file must give its results file's score on its full item set."""
  got, want = metric_fn(metric)(golds, preds), _reported(run, name, seed)
  tol = _OFFICIAL_TOL if run.aggregation == "official" else 1e-6 * max(1.0, abs(want))
  if not abs(got - want) <= tol:
    raise ValueError(f"{path}: its {len(golds)} predictions score {got:.4f} on {name} but "
                     f"{run.results_path} records {want:.4f} for seed {seed}: the predictions "
                     "do not belong to these results (rescore the run)")


def _load_items(run: Run, name: str, seed: str, metric: str, items: _Items
                ) -> tuple[str, dict[int, tuple[Any, Any, Any]]] | None:
  """(path, {index: (raw gold, gold, pred)}) of one predictions file (None if absent)."""
  path = scorer.predictions_path(run.predictions_dir, name, int(seed))
  if not os.path.isfile(path):
    return None
  rows = read_predictions(path)
  for r in rows.values():
    items.fill_gold(name, r, path)
  out = {i: (r["gold"], items.gold(name, metric, r, path), items.pred(name, metric, r, path))
         for i, r in rows.items()}
  _check_reproduces(run, name, seed, metric, [v[1] for v in out.values()],
                    [v[2] for v in out.values()], path)
  return path, out


def _dataset(runs: Sequence[Run], name: str, seeds: list[str], items: _Items
             ) -> tuple[_Dataset | None, list[str]]:
  """A dataset's items on the intersection of every run's items (None without predictions)."""
  if any(r.predictions_dir is None for r in runs):
    return None, []  # noted once per run
  metric = dataset_metric(runs, name)
  loaded: dict[str, dict[str, tuple[str, dict]]] = {}
  for run in runs:
    for seed in seeds:
      got = _load_items(run, name, seed, metric, items)
      if got is None:
        path = scorer.predictions_path(run.predictions_dir, name, int(seed))
        return None, [f"{name}: {path} not found: scores and deltas without a CI"]
      loaded.setdefault(run.label, {})[seed] = got
  sets = [set(rows) for per in loaded.values() for _, rows in per.values()]
  common = sorted(set.intersection(*sets))
  if not common:
    raise ValueError(f"{name}: the runs share no scored test items; nothing to compare")
  notes = []
  if any(len(s) != len(common) for s in sets):
    counts = ", ".join(f"{lab}: {len(next(iter(per.values()))[1])}" for lab, per in loaded.items())
    notes.append(f"{name}: compared on the {len(common)} test items every run scored ({counts})")
  ref_path, ref_rows = next(iter(next(iter(loaded.values())).values()))
  for per in loaded.values():
    for path, rows in per.values():
      for i in common:
        if rows[i][0] != ref_rows[i][0]:
          raise ValueError(f"{name} item {i}: gold {rows[i][0]!r} in {path} but "
                           f"{ref_rows[i][0]!r} in {ref_path}: the runs were scored on "
                           "different test data")
  preds = {label: {seed: [rows[i][2] for i in common] for seed, (_, rows) in per.items()}
           for label, per in loaded.items()}
  return _Dataset(name, metric, common, seeds, [ref_rows[i][1] for i in common], preds), notes


def _collect(runs: Sequence[Run], items: _Items
             ) -> tuple[list[str], dict[str, _Dataset | None], dict[str, list[str]], list[str]]:
  """(datasets in all runs, their items, their common seeds, notes)."""
  notes = []
  names = [n for n in runs[0].results["datasets"]
           if all(n in r.results["datasets"] for r in runs)]
  for run in runs:
    extra = [n for n in run.results["datasets"] if n not in names]
    if extra:
      notes.append(f"left out (not scored in every run): {', '.join(extra)} of {run.label}")
  if not names:
    raise ValueError("the runs share no scored dataset: nothing to compare")
  for run in runs:
    if run.predictions_dir is None:
      notes.append(f"{run.label}: no predictions ({run.looked_for} not found; the training "
                   "hooks write scores only): deltas involving it have no CI")
  datasets, seeds = {}, {}
  for name in names:
    own = [list(r.results["datasets"][name]["seeds"]) for r in runs]
    seeds[name] = [s for s in own[0] if all(s in o for o in own)]
    if not seeds[name]:
      raise ValueError(f"{name}: the runs share no seed ({'; '.join(map(str, own))})")
    if any(len(o) != len(seeds[name]) for o in own):
      notes.append(f"{name}: compared on seed(s) {', '.join(seeds[name])} (scored: " + "; ".join(
          f"{r.label} {', '.join(o)}" for r, o in zip(runs, own)) + ")")
    datasets[name], more = _dataset(runs, name, seeds[name], items)
    notes.extend(more)
  return names, datasets, seeds, notes


# --------------------------------------------------------------------------- scores and CIs


def _row_specs(names: Sequence[str]) -> list[dict]:
  """Table rows: datasets grouped by category, category means (2+ datasets), the Average."""
  specs = []
  groups = report._grouped({"datasets": dict.fromkeys(names)})  # pylint: disable=protected-access
  for cat, members in groups:
    specs.extend({"kind": "dataset", "name": n, "category": cat, "datasets": [n]}
                 for n in members)
    if len(members) > 1:
      specs.append({"kind": "category", "name": f"{cat} mean", "category": cat,
                    "datasets": list(members)})
  specs.append({"kind": "average", "name": "Average", "category": None, "datasets": list(names)})
  return specs


def _row_values(per_seed: dict[str, dict[str, float]], aggregation: str,
                specs: Sequence[dict]) -> list[float]:
  """Row values of one run from its {dataset: {seed: score}} (the run's aggregation)."""
  agg = report.aggregate(per_seed, aggregation)
  means = {n: d["mean"] for n, d in agg["datasets"].items()}
  out = []
  for spec in specs:
    if spec["kind"] == "dataset":
      out.append(means[spec["name"]])
    elif spec["kind"] == "category":
      out.append(sum(means[n] for n in spec["datasets"]) / len(spec["datasets"]))
    else:
      out.append(agg["average"])
  return out


def _per_seed(runs: Sequence[Run], datasets: Mapping[str, _Dataset | None],
              seeds: Mapping[str, list[str]], idx: Mapping[str, list[int]] | None
              ) -> dict[str, dict[str, dict[str, float]]]:
  """{run: {dataset: {seed: score}}}: recomputed on (resampled) items, else as reported."""
  out: dict[str, dict[str, dict[str, float]]] = {r.label: {} for r in runs}
  for name, d in datasets.items():
    for run in runs:
      out[run.label][name] = {
          s: (_reported(run, name, s) if d is None
              else d.score(run.label, s, None if idx is None else idx[name]))
          for s in seeds[name]}
  return out


def _bootstrap(runs: Sequence[Run], base: int, datasets: Mapping[str, _Dataset | None],
               seeds: Mapping[str, list[str]], specs: Sequence[dict], resamples: int,
               seed: int) -> np.ndarray:
  """Deltas [resamples, runs, rows] (run - baseline) on paired item resamples."""
  rng = np.random.default_rng(seed)
  aggregation = runs[0].aggregation
  out_RxNxK = np.zeros((resamples, len(runs), len(specs)))
  sized = [(n, len(d.indices)) for n, d in datasets.items() if d is not None]
  for b in range(resamples):
    idx = {n: rng.integers(0, size, size).tolist() for n, size in sized}
    per = _per_seed(runs, datasets, seeds, idx)
    values_NxK = np.array([_row_values(per[r.label], aggregation, specs) for r in runs])
    out_RxNxK[b] = values_NxK - values_NxK[base]
  return out_RxNxK


def _trained_on(run: Run) -> list[str]:
  """SentiBench datasets whose train split the run's model was trained on (the sentibench job's
  `training` record of an ICLDist export); their test items were still never seen."""
  return list((run.results.get("training") or {}).get("trained_on", []))


def compare(runs: Sequence[Run], baseline: int = 0, resamples: int = MIN_RESAMPLES,
            seed: int = 0, data_dir: str | os.PathLike | None = None) -> dict:
  """The comparison of `runs` against `runs[baseline]` (the compare.json content).

  `resamples`: bootstrap resamples (seeded with `seed`); `data_dir`: SentiBench data, needed
  only for absa/opener predictions (test sentences and gold opinions).
  """
  if len(runs) < 2:
    raise ValueError(f"compare needs at least 2 runs, got {len(runs)}")
  if not 0 <= baseline < len(runs):
    raise ValueError(f"--baseline {baseline} is not a run index (0..{len(runs) - 1})")
  if resamples < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")
  labels = [r.label for r in runs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"run labels must differ, got {labels}; pass --labels")
  notes = check_settings(runs)
  names, datasets, seeds, more = _collect(runs, _Items(data_dir))
  notes.extend(more)
  specs = _row_specs(names)
  aggregation = runs[0].aggregation
  per = _per_seed(runs, datasets, seeds, None)
  values_NxK = np.array([_row_values(per[r.label], aggregation, specs) for r in runs])
  deltas_RxNxK = _bootstrap(runs, baseline, datasets, seeds, specs, resamples, seed)
  alpha = 100.0 * (1.0 - CONFIDENCE) / 2.0
  low_NxK, high_NxK = np.percentile(deltas_RxNxK, [alpha, 100.0 - alpha], axis=0)
  rows = []
  for k, spec in enumerate(specs):
    members = [datasets[n] for n in spec["datasets"]]
    has_ci = all(d is not None for d in members)
    row = dict(spec, metric=(dataset_metric(runs, spec["name"]) if spec["kind"] == "dataset"
                             and has_ci else None),
               items=sum(len(d.indices) for d in members) if has_ci else None,
               seeds=sorted({s for n in spec["datasets"] for s in seeds[n]}, key=int),
               scores={r.label: float(values_NxK[i, k]) for i, r in enumerate(runs)}, deltas={},
               trained_on=[r.label for r in runs if spec["name"] in _trained_on(r)])
    for i, run in enumerate(runs):
      if i != baseline:
        row["deltas"][run.label] = {
            "delta": float(values_NxK[i, k] - values_NxK[baseline, k]),
            "ci_low": float(low_NxK[i, k]) if has_ci else None,
            "ci_high": float(high_NxK[i, k]) if has_ci else None}
    rows.append(row)
  return {"baseline": labels[baseline],
          "runs": [{"label": r.label, "results": r.results_path, "predictions": r.predictions_dir,
                    "aggregation": r.aggregation} for r in runs],
          "average_label": report.average_label({"datasets": dict.fromkeys(names),
                                                 "aggregation": aggregation}),
          "bootstrap": {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
                        "unit": "test item, every run and seed scored on the same draw"},
          "rows": rows, "notes": notes}


# --------------------------------------------------------------------------- outputs


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
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


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


def publish(runs: Sequence[Run], dest: str | os.PathLike) -> list[str]:
  """Writes `<dest>/<label>/results.json` and `predictions/` of each run without gold labels
  (compare reads them back with `--data-dir`); returns the run dirs written."""
  out = []
  for run in runs:
    run_dir = os.path.join(os.fspath(dest), re.sub(r"[^A-Za-z0-9._+-]+", "_", run.label))
    atomic.write_json(os.path.join(run_dir, "results.json"), run.results)
    for name, entry in run.results["datasets"].items():
      for seed in entry["seeds"]:
        src = (scorer.predictions_path(run.predictions_dir, name, int(seed))
               if run.predictions_dir else "")
        if os.path.isfile(src):
          rows = [{k: v for k, v in r.items() if k != "gold"}
                  for _, r in sorted(read_predictions(src).items())]
          scorer.write_jsonl(scorer.predictions_path(os.path.join(run_dir, "predictions"), name,
                                                     int(seed)), rows)
    out.append(run_dir)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sentijax.compare RUN [RUN ...] [--out DIR] [--baseline 0]`."""
  import argparse  # pylint: disable=import-outside-toplevel
  from sentijax import config as config_lib  # pylint: disable=import-outside-toplevel

  p = argparse.ArgumentParser(prog="python -m sentijax.compare", description=(
      "Compare SentiBench runs: scores, deltas against a baseline run and paired-bootstrap 95% "
      "CIs. RUN: a sentibench job workdir, a training workdir, its sentibench/ dir or a "
      "results file (results.json, step_N.json)."))
  p.add_argument("runs", nargs="+", metavar="RUN")
  p.add_argument("--out", default="compare", help="output dir for compare.md/.json/.png")
  p.add_argument("--baseline", type=int, default=0, help="index of the baseline run")
  p.add_argument("--labels", default="", help="comma list of run labels (default: from paths)")
  p.add_argument("--resamples", type=int, default=MIN_RESAMPLES,
                 help=f"bootstrap resamples (>= {MIN_RESAMPLES})")
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  p.add_argument("--data-dir", default=config_lib.base().eval.data_dir,
                 help="SentiBench data (absa/opener predictions need its test sentences, "
                 "gold-free predictions its labels)")
  p.add_argument("--publish", default="", metavar="DIR",
                 help="also write each run's results and predictions WITHOUT gold labels to "
                 "DIR/<label>/ (to commit; compare them later with --data-dir)")
  args = p.parse_args(argv)
  if args.resamples < MIN_RESAMPLES:
    p.error(f"--resamples must be >= {MIN_RESAMPLES}, got {args.resamples}")
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else [None] * len(args.runs)
  if len(labels) != len(args.runs):
    p.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
  try:
    runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
    result = compare(runs, args.baseline, args.resamples, args.seed, args.data_dir)
    if args.publish:
      print("published (no gold labels): " + ", ".join(publish(runs, args.publish)))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths = write(result, args.out)
  print(markdown(result))
  print("wrote " + ", ".join(paths))
  return 0
