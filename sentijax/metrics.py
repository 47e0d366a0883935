"""Metric logging (stdout + TensorBoard event files), training throughput and model-FLOPs
utilisation."""
from __future__ import annotations

import logging
import math
import struct
import time
from pathlib import Path
from typing import Mapping

import jax

log = logging.getLogger("sentijax")

# Dense (no sparsity) bf16 peak TFLOP/s per JAX device from the vendors' datasheets, keyed by the
# exact `jax.Device.device_kind` (the CUDA device name on NVIDIA GPUs; v4 and v5p TPUs show one
# device per chip). Matched after normalising case and whitespace, never by substring: "NVIDIA L4"
# must not match an L40S, nor an H100 PCIe the SXM part. Other devices: set train.peak_tflops.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "TPU v4": 275.0,
    "TPU v5": 459.0,  # v5p reports "TPU v5"
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
}


def _normalise(kind: str) -> str:
  return " ".join(kind.split()).lower()


_PEAK_BY_KIND = {_normalise(k): v for k, v in PEAK_TFLOPS.items()}


def peak_tflops_per_device(override: float = 0.0, device_kind: str | None = None
                           ) -> float | None:
  """`override` when > 0, else the table entry for `device_kind` (default: the first device's);
  None when the device is not in the table (MFU is then not reported)."""
  if override < 0:
    raise ValueError(f"train.peak_tflops={override} must be >= 0 (0 = look the device up)")
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  return _PEAK_BY_KIND.get(_normalise(kind))


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int,
        peak_tflops: float | None) -> float | None:
  """Fraction of peak: achieved model FLOP/s over the devices' combined peak (None if unknown)."""
  if not peak_tflops:
    return None
  return tokens_per_s * flops_per_token / (num_devices * peak_tflops * 1e12)


class Throughput:
  """Tokens per second over training time only.

  The clock runs between `resume()` and `pause()` (pause it around compilation, evaluation and
  checkpoint saves); `add(tokens)` counts tokens of steps that ran while it was running; `read()`
  returns the rate since the last read (None when nothing was timed) and starts a new window.
  """
  clock = staticmethod(time.perf_counter)

  def __init__(self):
    self.tokens, self.seconds, self._since = 0, 0.0, None

  @property
  def running(self) -> bool:
    return self._since is not None

  def resume(self) -> None:
    if self._since is None:
      self._since = self.clock()

  def pause(self) -> None:
    if self._since is not None:
      self.seconds += self.clock() - self._since
      self._since = None

  def add(self, tokens: int) -> None:
    self.tokens += int(tokens)

  def read(self) -> float | None:
    running = self.running
    self.pause()
    rate = self.tokens / self.seconds if self.tokens and self.seconds > 0 else None
    self.tokens, self.seconds = 0, 0.0
    if running:
      self.resume()
    return rate


class MetricWriter:
  """Writes scalars to TensorBoard (process 0 only) and a one-line summary to the log."""

  def __init__(self, logdir: str | Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      Path(logdir).mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(logdir), flush_secs=10)

  def write(self, step: int, scalars: Mapping[str, float | None], prefix: str = "") -> None:
    """Writes the scalars that are not None."""
    if not self.enabled:
      return
    clean = {}
    for k, v in scalars.items():
      if v is None:
        continue
      v = float(v)
      clean[k] = v
      self._tb.add_scalar(f"{prefix}{k}", v, step)
    log.info("step %d %s", step, " ".join(
        f"{prefix}{k}={_fmt(v)}" for k, v in clean.items()))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _fmt(v: float) -> str:
  if v == 0 or math.isnan(v) or math.isinf(v):
    return str(v)
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def read_scalars(logdir: str | Path, wall_time: bool = False) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalars in the TensorBoard event files in `logdir` (what
  `MetricWriter` wrote; TFRecord framing, read without TensorBoard); `wall_time`: {tag: {step:
  (value, the event's wall time in seconds)}}."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out: dict = {}
  for path in sorted(Path(logdir).glob("events.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])  # length, length crc, event, event crc
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = ((v.simple_value, event.wall_time) if wall_time
                                                 else v.simple_value)
  return out
