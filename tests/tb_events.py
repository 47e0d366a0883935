"""Scalars from TensorBoard event files, read without TensorBoard (for the tests)."""
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the event files (TFRecord framing) in `logdir`."""
  out = {}
  for path in sorted(Path(logdir).glob("events.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])  # length, length crc, event, event crc
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out
