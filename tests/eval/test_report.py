"""Result aggregation: the 3-seed mean and the official scripts' numbers (seed-42 runs, F1
rounded to 4 decimals by save_result, parse.py's average over 12 with missing datasets as 0)."""
import pytest

from sentijax.data import sentibench
from sentijax.eval import report

# Hand-made scores x100, as Scorer.score_run returns them.
RUNS = {
    "sc/sst2": {"42": 64.6467, "52": 70.0},
    "absa/opener": {"42": 12.34567},
    "multifaced/irony18": {"42": 40.32449},
}


def test_official_aggregation():
  r = report.aggregate(RUNS, "official")
  assert r["aggregation"] == "official"
  # save_result rounds each F1 (a fraction) to 4 decimals.
  assert r["datasets"]["absa/opener"]["seeds"]["42"] == pytest.approx(12.35, abs=1e-12)
  assert r["datasets"]["multifaced/irony18"]["mean"] == pytest.approx(40.32, abs=1e-12)
  # parse.py: mean of the rounded runs x 100.
  assert r["datasets"]["sc/sst2"]["mean"] == pytest.approx((0.6465 + 0.7) / 2 * 100, abs=1e-12)
  # Average over all 12 datasets, the 9 not scored count as 0.
  want = ((0.6465 + 0.7) / 2 * 100 + 12.35 + 40.32) / 12
  assert r["average"] == pytest.approx(want, abs=1e-12)
  assert report.average_label(r) == "official: 12 datasets, 9 missing as 0"
  assert "**Average** (official: 12 datasets, 9 missing as 0)" in report.markdown_table(r)


def test_mean_aggregation_and_subset_label():
  r = report.aggregate(RUNS, "mean")
  assert r["datasets"]["sc/sst2"]["mean"] == pytest.approx(67.32335, abs=1e-9)
  assert r["datasets"]["absa/opener"]["seeds"]["42"] == 12.34567  # not rounded
  assert r["average"] == pytest.approx((67.32335 + 12.34567 + 40.32449) / 3, abs=1e-9)
  assert report.average_label(r) == "3 of 12 datasets"
  assert "**Average** (3 of 12 datasets)" in report.markdown_table(r)


def test_full_benchmark_labels():
  runs = {name: {"42": 50.0} for name in sentibench.DATASETS}
  assert report.average_label(report.aggregate(runs, "mean")) == "12 datasets"
  official = report.aggregate(runs, "official")
  assert report.average_label(official) == "official: 12 datasets"
  assert official["average"] == pytest.approx(50.0, abs=1e-12)


def test_bad_aggregation():
  with pytest.raises(ValueError, match="aggregation"):
    report.aggregate(RUNS, "median")
  with pytest.raises(ValueError, match="no scored seeds"):
    report.aggregate({"sc/sst2": {}}, "mean")
