"""Run comparison: recomputed scores, paired-bootstrap CIs, intersections, refusals, layouts, CLI.

Runs are written in the scorer's formats with its own writers (`scorer.write_jsonl`,
`scorer.predictions_path`, `report.aggregate`, `scorer.write_json`) from real SentiBench test
items; expected scores are computed independently (sklearn, hand-counted tuple matches).
"""
import json
import os
import random
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from sentijax.data import sentibench
from sentijax import compare as compare_cli
from sentijax.eval import compare, compare_report, metrics, report, scorer
from sentijax.eval import runs as runs_lib

SST2, IMDB, ATSA, OPENER = "sc/sst2", "sc/imdb", "absa/atsa_rest16", "absa/opener"


@pytest.fixture(scope="module")
def tests(sentibench_dir):
  return {n: sentibench.load_split(sentibench_dir, n, "test") for n in (SST2, IMDB, ATSA, OPENER)}


def _as_json(gold):
  return gold if isinstance(gold, str) else [list(t) for t in gold]


def make_rows(name, examples, correct):
  """Prediction rows: the gold answer where `correct[i]`, else a wrong label / no tuples."""
  rows = []
  for ex, ok in zip(examples, correct):
    if name in sentibench.CLASSIFICATION_DATASETS:
      pred = ex.gold if ok else ("negative" if ex.gold == "positive" else "positive")
    else:
      pred = _as_json(ex.gold) if ok else []
    rows.append({"index": ex.index, "gold": _as_json(ex.gold), "prediction": pred, "scores": []})
  return rows


def scorer_score(name, rows, examples):
  """What `scorer.score_run` records for these rows (its `metrics.score_dataset` call)."""
  golds = [r["gold"] if isinstance(r["gold"], str) else [tuple(t) for t in r["gold"]]
           for r in rows]
  preds = [r["prediction"] if isinstance(r["prediction"], str)
           else [tuple(t) for t in r["prediction"]] for r in rows]
  kw = {}
  if name == OPENER:
    kw = dict(sentences=[e.sentence for e in examples],
              gold_opinions=[e.raw.get("opinions", []) for e in examples])
  return metrics.score_dataset(name, golds, preds, **kw)


def write_run(root, runs, tests, aggregation="mean", results_name="results.json",
              predictions_dir=None, settings=None):
  """runs: {dataset: {seed: rows}} -> results file + predictions, as the scorer writes them."""
  per = {}
  for name, by_seed in runs.items():
    per[name] = {}
    for seed, rows in by_seed.items():
      per[name][str(seed)] = scorer_score(name, rows, [tests[name][r["index"]] for r in rows])
      if predictions_dir is not False:
        scorer.write_jsonl(scorer.predictions_path(predictions_dir or root / "predictions",
                                                   name, seed), rows)
  results = report.aggregate(per, aggregation)
  if settings is not None:
    results["settings"] = settings
  scorer.write_json(root / results_name, results)
  return root / results_name


def draw(n, acc, rng):
  return [rng.random() < acc for _ in range(n)]


def rows_of(result, kind="dataset"):
  return {r["name"]: r for r in result["rows"] if r["kind"] == kind}


def micro_f1(gold_lists, pred_lists):
  """Independent (example, tuple) micro-F1 with the official list semantics."""
  n_gold = sum(len(g) for g in gold_lists)
  n_pred = sum(len(p) for p in pred_lists)
  tp_p = sum(sum(t in g for t in p) for g, p in zip(gold_lists, pred_lists))
  tp_g = sum(sum(t in p for t in g) for g, p in zip(gold_lists, pred_lists))
  prec, rec = (tp_p / n_pred if n_pred else 1.0), (tp_g / n_gold if n_gold else 1.0)
  return 100 * 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def test_recomputed_scores_equal_results_and_independent_f1(tests, tmp_path, sentibench_dir):
  rng = random.Random(0)
  sizes = {SST2: 120, ATSA: 40, OPENER: 30}
  runs = {}
  for label, acc in (("a", 0.6), ("b", 0.8)):
    spec = {n: {s: make_rows(n, tests[n][:k], draw(k, acc, rng)) for s in (42, 52)}
            for n, k in sizes.items()}
    for rows in spec[ATSA].values():  # repeated tuples count each time (official F1Measure)
      for r in rows[::4]:
        r["prediction"] = r["prediction"] + [["zzz", "positive"]] * 2 + r["prediction"][:1]
    write_run(tmp_path / label, spec, tests)
    runs[label] = spec
  result = compare.compare([runs_lib.load_run(tmp_path / "a"), runs_lib.load_run(tmp_path / "b")],
                           resamples=10, data_dir=sentibench_dir)
  rows = rows_of(result)
  for label, spec in runs.items():
    on_disk = report.load_results(tmp_path / label / "results.json")
    for name in sizes:
      assert rows[name]["items"] == sizes[name] and rows[name]["seeds"] == ["42", "52"]
      assert rows[name]["scores"][label] == pytest.approx(on_disk["datasets"][name]["mean"],
                                                          rel=1e-12)
    sst2 = np.mean([100 * f1_score([r["gold"] for r in rs], [r["prediction"] for r in rs],
                                   average="macro") for rs in spec[SST2].values()])
    assert rows[SST2]["scores"][label] == pytest.approx(sst2, rel=1e-9)
    atsa = np.mean([micro_f1([[tuple(t) for t in r["gold"]] for r in rs],
                             [[tuple(t) for t in r["prediction"]] for r in rs])
                    for rs in spec[ATSA].values()])
    assert rows[ATSA]["scores"][label] == pytest.approx(atsa, rel=1e-9)
    assert rows_of(result, "average")["Average"]["scores"][label] == pytest.approx(
        on_disk["average"], rel=1e-12)
  delta = rows[SST2]["deltas"]["b"]
  assert delta["delta"] == pytest.approx(rows[SST2]["scores"]["b"] - rows[SST2]["scores"]["a"])


def test_predictions_that_do_not_reproduce_their_results_are_refused(tests, tmp_path):
  rows = make_rows(SST2, tests[SST2][:40], draw(40, 0.7, random.Random(1)))
  write_run(tmp_path / "a", {SST2: {42: rows}}, tests)
  write_run(tmp_path / "b", {SST2: {42: rows}}, tests)
  path = scorer.predictions_path(tmp_path / "b" / "predictions", SST2, 42)
  rows[0] = dict(rows[0], prediction="negative" if rows[0]["prediction"] == "positive"
                 else "positive")
  scorer.write_jsonl(path, rows)
  with pytest.raises(ValueError, match=r"sc_sst2_42\.jsonl.*do not belong"):
    compare.compare([runs_lib.load_run(tmp_path / "a"), runs_lib.load_run(tmp_path / "b")],
                    resamples=10)


def test_identical_runs_give_zero_deltas_and_zero_cis(tests, tmp_path, sentibench_dir):
  rng = random.Random(2)
  spec = {SST2: {42: make_rows(SST2, tests[SST2][:60], draw(60, 0.7, rng))},
          OPENER: {42: make_rows(OPENER, tests[OPENER][:20], draw(20, 0.5, rng))}}
  write_run(tmp_path / "a", spec, tests)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  result = compare.compare([runs_lib.load_run(tmp_path / "a"), runs_lib.load_run(tmp_path / "b")],
                           data_dir=sentibench_dir)
  assert result["bootstrap"]["resamples"] >= 1000
  for row in result["rows"]:
    assert row["deltas"]["b"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}, row["name"]


def _coverage_run(tmp_path, tests, n, rng, tag):
  """Two correlated runs on n random sst2 items: a item right iff u < 0.6, b iff u < 0.75."""
  examples = sorted(rng.sample(tests[SST2], n), key=lambda e: e.index)
  u = [rng.random() for _ in examples]
  for label, acc in (("a", 0.6), ("b", 0.75)):
    write_run(tmp_path / f"{tag}{label}", {SST2: {42: make_rows(SST2, examples,
                                                                 [x < acc for x in u])}}, tests)
  result = compare.compare([runs_lib.load_run(tmp_path / f"{tag}a", "a"),
                            runs_lib.load_run(tmp_path / f"{tag}b", "b")], resamples=200,
                           seed=rng.randrange(2**31))
  return rows_of(result)[SST2]["deltas"]["b"]


def test_bootstrap_ci_covers_the_true_delta_about_95_percent(tests, tmp_path, monkeypatch):
  monkeypatch.setattr(os, "fsync", lambda fd: None)  # ~200 small files; durability not tested here
  # Population macro-F1 of "right with probability acc, else the other label" on sst2's label
  # mix p: class F1 = 2 p acc / (2 p acc + 1 - acc).
  p = np.mean([e.gold == "positive" for e in tests[SST2]])
  f1 = lambda acc: 100 * np.mean([2 * c * acc / (2 * c * acc + 1 - acc) for c in (p, 1 - p)])
  true_delta = f1(0.75) - f1(0.6)
  rng = random.Random(3)
  cis = [_coverage_run(tmp_path, tests, 60, rng, f"r{i}") for i in range(50)]
  covered = np.mean([d["ci_low"] <= true_delta <= d["ci_high"] for d in cis])
  assert 0.88 <= covered <= 0.98, (covered, true_delta)
  # ... and narrows with more items (~1/sqrt(n)): 8x the items, under 0.6x the width.
  wide = np.mean([d["ci_high"] - d["ci_low"] for d in cis[:4]])
  narrow = np.mean([d["ci_high"] - d["ci_low"] for d in
                    (_coverage_run(tmp_path, tests, 480, rng, f"n{i}") for i in range(2))])
  assert narrow < 0.6 * wide, (narrow, wide)


def test_seeds_are_resampled_together(tests, tmp_path):
  # Two seeds with the same predictions: with the items drawn once for both seeds the CI is the
  # one-seed CI; seeds drawn apart would average two draws and narrow it.
  rng = random.Random(4)
  a = make_rows(SST2, tests[SST2][:80], draw(80, 0.6, rng))
  b = make_rows(SST2, tests[SST2][:80], draw(80, 0.7, rng))
  write_run(tmp_path / "a1", {SST2: {42: a}}, tests)
  write_run(tmp_path / "b1", {SST2: {42: b}}, tests)
  write_run(tmp_path / "a2", {SST2: {42: a, 52: a}}, tests)
  write_run(tmp_path / "b2", {SST2: {42: b, 52: b}}, tests)
  one, two = (rows_of(compare.compare([runs_lib.load_run(tmp_path / f"a{k}"),
                                       runs_lib.load_run(tmp_path / f"b{k}")],
                                      resamples=200))[SST2]["deltas"]["b" + str(k)]
              for k in (1, 2))
  assert (two["ci_low"], two["ci_high"]) == pytest.approx((one["ci_low"], one["ci_high"]),
                                                          rel=1e-12)


def test_different_items_and_seeds_compare_on_the_intersection(tests, tmp_path):
  rng = random.Random(5)
  a = {SST2: {s: make_rows(SST2, tests[SST2][:80], draw(80, 0.6, rng)) for s in (42, 52)},
       IMDB: {42: make_rows(IMDB, tests[IMDB][:10], draw(10, 0.6, rng))}}
  b = {SST2: {42: make_rows(SST2, tests[SST2][:50], draw(50, 0.8, rng))}}
  write_run(tmp_path / "a", a, tests)
  write_run(tmp_path / "b", b, tests)
  result = compare.compare([runs_lib.load_run(tmp_path / "a"), runs_lib.load_run(tmp_path / "b")],
                           resamples=10)
  row = rows_of(result)[SST2]
  assert row["items"] == 50 and row["seeds"] == ["42"]
  assert list(rows_of(result)) == [SST2]
  want = 100 * f1_score([r["gold"] for r in a[SST2][42][:50]],
                        [r["prediction"] for r in a[SST2][42][:50]], average="macro")
  assert row["scores"]["a"] == pytest.approx(want, rel=1e-9)
  notes = "\n".join(result["notes"])
  assert "sc/sst2: compared on the 50 test items every run scored (a: 80, b: 50)" in notes
  assert "sc/sst2: compared on seed(s) 42 (scored: a 42, 52; b 42)" in notes
  assert "left out (not scored in every run): sc/imdb of a" in notes
  assert result["average_label"] == "1 of 12 datasets"


def test_differing_protocol_settings_are_refused_by_name(tests, tmp_path):
  rows = make_rows(SST2, tests[SST2][:20], [True] * 20)
  write_run(tmp_path / "mean", {SST2: {42: rows}}, tests)
  write_run(tmp_path / "official", {SST2: {42: rows}}, tests, aggregation="official")
  with pytest.raises(ValueError, match=r"protocol setting 'aggregation' differs.*'mean'.*"
                                       r"'official'"):
    compare.compare([runs_lib.load_run(tmp_path / "mean"), runs_lib.load_run(tmp_path / "official")])
  for k, settings in (("k4", {"k_shot": 4, "templates": "protocol.json"}),
                      ("k8", {"k_shot": 8, "templates": "protocol.json"})):
    write_run(tmp_path / k, {SST2: {42: rows}}, tests, settings=settings)
  with pytest.raises(ValueError, match=r"protocol setting 'k_shot' differs.*4.*8"):
    compare.compare([runs_lib.load_run(tmp_path / "k4"), runs_lib.load_run(tmp_path / "k8")])
  # Other test data (a different gold for the same item) is refused too.
  other = [dict(r, gold="negative" if r["gold"] == "positive" else "positive",
                prediction="negative" if r["gold"] == "positive" else "positive")
           if r["index"] == 3 else r for r in rows]
  scorer.write_jsonl(scorer.predictions_path(tmp_path / "k8" / "predictions", SST2, 42), other)
  with pytest.raises(ValueError, match=r"sc/sst2 item 3: gold .*different test data"):
    compare.compare([runs_lib.load_run(tmp_path / "mean"), runs_lib.load_run(tmp_path / "k8")])


def test_training_before_after_layout(tests, tmp_path):
  # What the training hooks write: <workdir>/sentibench/step_N.json, scores only.
  wd = tmp_path / "icl"
  for step, acc in ((0, 0.5), (5, 0.6), (20, 0.9)):
    spec = {SST2: {42: make_rows(SST2, tests[SST2][:30], draw(30, acc, random.Random(step)))}}
    write_run(wd / "sentibench", spec, tests, results_name=f"step_{step}.json",
              predictions_dir=False)
  before = runs_lib.load_run(wd / "sentibench" / "step_0.json")
  for after in (runs_lib.load_run(wd), runs_lib.load_run(wd / "sentibench")):
    assert after.label == "icl@step_20" and after.results_path.endswith("step_20.json")
    result = compare.compare([before, after], resamples=10)
    assert before.label == "icl@step_0" and result["baseline"] == "icl@step_0"
    steps = [report.load_results(wd / "sentibench" / f"step_{s}.json") for s in (0, 20)]
    row = rows_of(result)[SST2]
    assert row["deltas"]["icl@step_20"] == {
        "delta": pytest.approx(steps[1]["datasets"][SST2]["mean"]
                               - steps[0]["datasets"][SST2]["mean"], rel=1e-12),
        "ci_low": None, "ci_high": None}
    assert row["items"] is None
    assert any("icl@step_0: no predictions" in n for n in result["notes"])
  # Predictions beside a step file (sentibench/predictions/step_N/) give CIs.
  for step in (0, 20):
    spec = {SST2: {42: make_rows(SST2, tests[SST2][:30], draw(30, 0.5 + step / 40,
                                                               random.Random(step)))}}
    write_run(wd / "sentibench", spec, tests, results_name=f"step_{step}.json",
              predictions_dir=wd / "sentibench" / "predictions" / f"step_{step}")
  result = compare.compare([runs_lib.load_run(wd / "sentibench" / "step_0.json"),
                            runs_lib.load_run(wd)], resamples=50)
  d = rows_of(result)[SST2]["deltas"]["icl@step_20"]
  assert d["ci_low"] <= d["delta"] <= d["ci_high"] and d["ci_low"] < d["ci_high"]


def test_cli_prints_table_and_writes_md_json_png(tests, tmp_path, capsys):
  rng = random.Random(6)
  for label, acc in (("base", 0.55), ("kd", 0.75)):
    spec = {SST2: {42: make_rows(SST2, tests[SST2][:40], draw(40, acc, rng))},
            ATSA: {42: make_rows(ATSA, tests[ATSA][:20], draw(20, acc, rng))}}
    write_run(tmp_path / label, spec, tests)
  out = tmp_path / "cmp"
  assert compare_cli.main([str(tmp_path / "base"), str(tmp_path / "kd"), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  header = "| Category | Dataset | Items × seeds | base (baseline) | kd | Δ kd (95% CI) |"
  assert header in printed
  assert "| basic | sc/sst2 | 40 × 1 |" in printed
  assert "**Average** (2 of 12 datasets)" in printed
  assert (out / "compare.md").read_text(encoding="utf-8").count("| fine-grained |") == 1
  data = json.loads((out / "compare.json").read_text(encoding="utf-8"))
  assert data["baseline"] == "base" and [r["label"] for r in data["runs"]] == ["base", "kd"]
  assert [r["name"] for r in data["rows"]] == [SST2, ATSA, "Average"]
  for row in data["rows"]:
    d = row["deltas"]["kd"]
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert row["scores"]["kd"] - row["scores"]["base"] == pytest.approx(d["delta"])
  with Image.open(out / "compare.png") as png:  # 3 rows: max(6, 0.5 * 3 + 2) x 4.5 in at 100 dpi
    assert png.format == "PNG" and png.size == (600, 450)
    assert len(set(png.convert("RGB").getdata())) > 10  # drawn, not blank
  with pytest.raises(SystemExit):
    compare_cli.main([str(tmp_path / "base"), str(tmp_path / "kd"), "--resamples", "100"])
  assert compare_cli.main([str(tmp_path / "base"), str(tmp_path / "nope")]) == 2
  assert "nope: no such run directory" in capsys.readouterr().err


def test_malformed_inputs_name_the_file(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: no results\.json, sentibench/step_N"):
    runs_lib.load_run(tmp_path / "empty")
  for name, body, match in (
      ("nodata", {"average": 1.0}, r"nodata/results\.json: no 'datasets' mapping"),
      ("badseed", {"datasets": {SST2: {"seeds": {"x": 1.0}, "mean": 1.0}}},
       r"badseed/results\.json: datasets\['sc/sst2'\]\['seeds'\] needs integer seeds")):
    scorer.write_json(tmp_path / name / "results.json", body)
    with pytest.raises(ValueError, match=match):
      runs_lib.load_run(tmp_path / name)
  (tmp_path / "rows").mkdir()
  (tmp_path / "rows" / "p.jsonl").write_text('{"index": 0, "gold": "a", "prediction": "a"}\n'
                                             '{"index": 0, "gold": "a"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"p\.jsonl:2: row lacks \['prediction'\]"):
    runs_lib.read_predictions(str(tmp_path / "rows" / "p.jsonl"))


def test_published_runs_carry_no_gold_and_compare_the_same(tests, tmp_path, sentibench_dir,
                                                            capsys):
  rng = random.Random(8)
  for label, acc in (("base", 0.5), ("kd", 0.7)):
    spec = {SST2: {42: make_rows(SST2, tests[SST2][:30], draw(30, acc, rng))},
            ATSA: {42: make_rows(ATSA, tests[ATSA][:20], draw(20, acc, rng))},
            OPENER: {42: make_rows(OPENER, tests[OPENER][:10], draw(10, acc, rng))}}
    write_run(tmp_path / label, spec, tests)
  runs = [str(tmp_path / "base"), str(tmp_path / "kd")]
  pub = tmp_path / "pub"
  assert compare_cli.main(runs + ["--out", str(tmp_path / "c1"), "--data-dir", str(sentibench_dir),
                              "--publish", str(pub)]) == 0
  files = sorted(p.relative_to(pub).as_posix() for p in pub.rglob("*") if p.is_file())
  assert files == [f"{run}/{f}" for run in ("base", "kd") for f in (
      "predictions/absa_atsa_rest16_42.jsonl", "predictions/absa_opener_42.jsonl",
      "predictions/sc_sst2_42.jsonl", "results.json")]
  for path in pub.rglob("*.jsonl"):
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]
    assert rows and all("gold" not in r and "prediction" in r for r in rows), path
  published = [str(pub / "base"), str(pub / "kd")]
  assert compare_cli.main(published + ["--out", str(tmp_path / "c2"), "--data-dir",
                                   str(sentibench_dir)]) == 0
  one, two = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("c1", "c2"))
  assert one["rows"] == two["rows"]
  capsys.readouterr()
  assert compare_cli.main(published + ["--out", str(tmp_path / "c3"), "--data-dir",
                                   str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err
  assert "pass --data-dir" in err and "no gold labels" in err


def test_datasets_a_run_trained_on_are_marked(tests, tmp_path):
  rng = random.Random(9)
  for label, acc in (("base", 0.5), ("icl", 0.7)):
    spec = {SST2: {42: make_rows(SST2, tests[SST2][:20], draw(20, acc, rng))},
            IMDB: {42: make_rows(IMDB, tests[IMDB][:20], draw(20, acc, rng))}}
    path = write_run(tmp_path / label, spec, tests)
    if label == "icl":  # what the sentibench job records for an ICLDist export
      results = json.loads(path.read_text())
      results["training"] = {"trained_on": [IMDB], "heldout": [SST2]}
      scorer.write_json(path, results)
  result = compare.compare([runs_lib.load_run(tmp_path / "base"), runs_lib.load_run(tmp_path / "icl")],
                           resamples=10)
  assert {r["name"]: r["trained_on"] for r in rows_of(result).values()} == {SST2: [], IMDB: ["icl"]}
  table = compare_report.markdown(result)
  imdb_line = next(l for l in table.splitlines() if "| sc/imdb |" in l)
  sst2_line = next(l for l in table.splitlines() if "| sc/sst2 |" in l)
  assert imdb_line.count("‡") == 1 and "‡" not in sst2_line and "‡ = the run's model" in table


def test_predicted_label_counts_show_why_a_macro_f1_moved(tests, tmp_path):
  items = tests[SST2][:30]
  gold = [ex.gold for ex in items]
  base_rows = make_rows(SST2, items, [True] * 30)  # all right
  collapsed = [dict(r, prediction="positive") for r in base_rows]  # everything "positive"
  write_run(tmp_path / "base", {SST2: {42: base_rows}, ATSA: {42: make_rows(
      ATSA, tests[ATSA][:5], [True] * 5)}}, tests)
  write_run(tmp_path / "kd", {SST2: {42: collapsed}, ATSA: {42: make_rows(
      ATSA, tests[ATSA][:5], [False] * 5)}}, tests)
  result = compare.compare([runs_lib.load_run(tmp_path / "base"),
                            runs_lib.load_run(tmp_path / "kd")], resamples=10)
  rows = rows_of(result)
  n_pos = gold.count("positive")
  assert rows[SST2]["label_counts"] == {
      "gold": {g: gold.count(g) for g in dict.fromkeys(gold)},
      "base": {g: gold.count(g) for g in dict.fromkeys(gold)}, "kd": {"positive": 30}}
  assert "label_counts" not in rows[ATSA]  # extraction: tuples, no label counts
  table = compare_report.markdown(result)
  assert "## Predicted labels" in table
  assert f"| sc/sst2 | positive | {n_pos} | {n_pos} | 30 |" in table.replace(
      "| sc/sst2 | negative", "| | negative") or f"| positive | {n_pos} | {n_pos} | 30 |" in table
  assert f"| negative | {30 - n_pos} | {30 - n_pos} | 0 |" in table
