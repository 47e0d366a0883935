"""Metric logging (stdout + TensorBoard event files) and model-FLOPs utilisation."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping

import jax

log = logging.getLogger("sentijax")

# Dense bf16 peak TFLOP/s per device (vendor numbers). Unknown devices: set train.peak_tflops.
PEAK_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "a10g": 125.0, "v100": 125.0,
    "tpu v6": 918.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v4": 275.0,
    "cpu": 0.0,
}


def peak_tflops_per_device(override: float = 0.0) -> float:
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind.lower()
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops
  return 0.0


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, peak_tflops: float) -> float:
  """Fraction of peak: achieved model FLOP/s over the devices' combined peak (0 if unknown)."""
  if not peak_tflops:
    return 0.0
  return tokens_per_s * flops_per_token / (num_devices * peak_tflops * 1e12)


class MetricWriter:
  """Writes scalars to TensorBoard (process 0 only) and a one-line summary to the log."""

  def __init__(self, logdir: str | Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      Path(logdir).mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(logdir), flush_secs=10)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {}
    for k, v in scalars.items():
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
