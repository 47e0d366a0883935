"""Run-vs-run SentiBench comparison: scores, deltas and paired-bootstrap 95% CIs.

    python -m sentijax.compare runs/base runs/kd runs/both --out runs/compare --baseline 0
    python -m sentijax.compare runs/icl/sentibench/step_0.json runs/icl   # before / after training

Runs and their predictions are read by `eval.runs` (run dirs, training step files, gold-free
published copies whose gold comes from the SentiBench test split in `data_dir`); the outputs
(compare.md/.json/.png) are written by `eval.compare_report`.

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sentijax.data import sentibench
from sentijax.eval import metrics, report, scorer
from sentijax.eval.runs import Run, read_predictions

MIN_RESAMPLES = 1000
CONFIDENCE = 0.95
_OFFICIAL_TOL = 0.005 + 1e-6  # official aggregation stores each seed's F1 rounded to 2 dp (x100)


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


  def label_counts(self) -> dict[str, dict[str, int]]:
    """Classification only: {"gold": {label: n}, <run>: {label: n predicted}}, summed over the
    seeds compared, labels in gold-then-predicted order (why a macro-F1 moved)."""
    def count(values) -> dict[str, int]:
      out: dict[str, int] = {}
      for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
      return out
    gold = count(g for _ in self.seeds for g in self.golds)
    return {"gold": gold, **{label: count(p for seed in self.seeds for p in by_seed[seed])
                             for label, by_seed in self.preds.items()}}


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
    if row["metric"] == "macro_f1":
      row["label_counts"] = members[0].label_counts()
    rows.append(row)
  return {"baseline": labels[baseline],
          "runs": [{"label": r.label, "results": r.results_path, "predictions": r.predictions_dir,
                    "aggregation": r.aggregation} for r in runs],
          "average_label": report.average_label({"datasets": dict.fromkeys(names),
                                                 "aggregation": aggregation}),
          "bootstrap": {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
                        "unit": "test item, every run and seed scored on the same draw"},
          "rows": rows, "notes": notes}
