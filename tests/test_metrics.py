"""sentijax.metrics: the peak-FLOP/s table matches exact device kinds, MFU is absent when the peak
is unknown, the throughput clock times only what runs while it runs, None scalars are skipped."""
import jax
import pytest

from sentijax import metrics


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),  # not the SXM peak
    ("NVIDIA H200", 989.0),  # what jax 0.11 reports on an H200 (seen)
    ("NVIDIA H200 NVL", 835.0),  # not the SXM peak either
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),  # "l4" is a substring: must not give the L4's peak
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),  # what a v5p reports
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),
    ("  nvidia  h100 pcie ", 756.0),  # case and whitespace are normalised
    ("cpu", None),
    ("NVIDIA H100", None),  # no such device kind: not guessed from a prefix
    ("NVIDIA GeForce RTX 4090", None),
    ("TPU v5 lite pod", None),
])
def test_peak_table_matches_exact_device_kinds(kind, peak):
  assert metrics.peak_tflops_per_device(device_kind=kind) == peak


def test_peak_override_and_default_device():
  assert metrics.peak_tflops_per_device(123.0, device_kind="cpu") == 123.0
  with pytest.raises(ValueError, match="train.peak_tflops=-1"):
    metrics.peak_tflops_per_device(-1.0)
  assert jax.devices()[0].device_kind == "cpu"
  assert metrics.peak_tflops_per_device() is None  # these tests run on CPU


def test_mfu_is_none_without_a_peak():
  assert metrics.mfu(1000.0, 6e9, 8, None) is None
  assert metrics.mfu(1000.0, 6e9, 8, 0.0) is None
  # 1000 tok/s * 6 GFLOP/token = 6 TFLOP/s over 2 devices of 100 TFLOP/s peak = 3%.
  assert metrics.mfu(1000.0, 6e9, 2, 100.0) == pytest.approx(0.03, rel=1e-12)


def test_throughput_times_only_while_running(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(metrics.Throughput, "clock", staticmethod(lambda: now[0]))
  tp = metrics.Throughput()
  tp.add(999)  # nothing timed yet: a rate needs time
  now[0] = 50.0
  assert tp.read() is None and not tp.running
  tp.resume()
  now[0] = 52.0
  tp.add(100)
  tp.pause()
  now[0] = 1000.0  # paused: not counted
  tp.resume()
  now[0] = 1002.0
  tp.add(300)
  assert tp.read() == pytest.approx(400 / 4.0, rel=1e-12)
  assert tp.running  # a read starts the next window and keeps the clock running
  now[0] = 1003.0
  tp.add(10)
  assert tp.read() == pytest.approx(10.0, rel=1e-12)


def test_writer_skips_none_scalars(tmp_path, caplog):
  writer = metrics.MetricWriter(tmp_path, enabled=True)
  with caplog.at_level("INFO", logger="sentijax"):
    writer.write(3, {"loss": 1.5, "mfu": None}, prefix="train/")
  writer.close()
  assert "train/loss=1.5" in caplog.text and "mfu" not in caplog.text
  events = b"".join(p.read_bytes() for p in tmp_path.glob("events.*"))
  assert b"train/loss" in events and b"train/mfu" not in events
