"""safetensors without torch: a slice reader and streaming, atomic writers.

The reader parses each file's header once, then reads only the rows a caller asks for with plain
`readinto` calls, in blocks of at most `BLOCK_BYTES`: file pages stay in the page cache (not in
the process's resident memory, unlike a memory map), and a tensor is never materialised whole
unless a caller asks for all of it. bf16 tensors use `ml_dtypes` (numpy has no bfloat16).

The writer takes tensors one at a time (the header is planned from names, dtypes and shapes), so
an export holds one tensor in host memory, not the model.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from sentijax import atomic
from sentijax.models.hf_config import CheckpointError

ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
BLOCK_BYTES = 16 << 20  # largest read buffer: whole rows, at least one

Index = tuple[slice, ...]


def normalize(index: Sequence[slice], shape: Sequence[int]) -> Index:
  """Slices with explicit start/stop (step 1) for every axis of `shape`."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"slice {s} has step {step}; only contiguous slices are read")
    out.append(slice(start, max(start, stop)))
  return tuple(out)


class SafetensorsFiles:
  """Tensor name -> (file, dtype, shape, offset) over one file or an index.json shard set."""

  def __init__(self, directory: str | os.PathLike):
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index ({e!r})") from None
      files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").is_file():
      files = [directory / "model.safetensors"]
    else:
      raise CheckpointError(f"{directory}: no model.safetensors or "
                            f"model.safetensors.index.json found")
    self._entries: dict[str, tuple[Path, Any, tuple[int, ...], int]] = {}
    for f in files:
      for name, entry in _read_header(f).items():
        self._entries[name] = (f, *entry)
    self._open: dict[Path, Any] = {}

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    for f in self._open.values():
      f.close()
    self._open.clear()

  def names(self) -> list[str]:
    return list(self._entries)

  def file_of(self, name: str) -> Path:
    return self._entry(name)[0]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name)[2]

  def _entry(self, name: str):
    if name not in self._entries:
      raise CheckpointError(f"tensor {name!r} not found in the checkpoint "
                            f"({sorted({str(e[0]) for e in self._entries.values()})})")
    return self._entries[name]

  def get(self, name: str, dtype: Any = None) -> np.ndarray:
    """The whole tensor (in `dtype`, default the file's)."""
    return self.read_slices(name, [()], dtype)[0]

  def read_slices(self, name: str, indices: Sequence[Sequence[slice]], dtype: Any = None
                  ) -> list[np.ndarray]:
    """Copies of `tensor[index]` for each index, cast to `dtype` (default the file's dtype).

    Reads the union of the rows (first axis) the indices cover, once, one block at a time:
    host memory is the outputs plus one block, whatever the tensor's size.
    """
    path, file_dtype, shape, offset = self._entry(name)
    file_dtype = np.dtype(file_dtype)
    dtype = file_dtype if dtype is None else np.dtype(dtype)
    if not shape:  # a scalar
      value = np.frombuffer(self._read(path, offset, file_dtype.itemsize), file_dtype)
      return [value.reshape(()).astype(dtype) for _ in indices]
    indices = [normalize(ix, shape) for ix in indices]
    outs = [np.empty(tuple(s.stop - s.start for s in ix), dtype) for ix in indices]
    wanted = [ix for ix in indices if all(s.stop > s.start for s in ix)]
    if not wanted:
      return outs
    row_items = int(np.prod(shape[1:], dtype=np.int64))
    row_bytes = max(row_items * file_dtype.itemsize, 1)
    lo, hi = min(ix[0].start for ix in wanted), max(ix[0].stop for ix in wanted)
    rows_per_block = max(1, BLOCK_BYTES // row_bytes)
    for r in range(lo, hi, rows_per_block):
      n = min(rows_per_block, hi - r)
      raw = self._read(path, offset + r * row_bytes, n * row_bytes)
      block = np.frombuffer(raw, file_dtype).reshape((n, *shape[1:]))
      for ix, out in zip(indices, outs):
        a, b = max(r, ix[0].start), min(r + n, ix[0].stop)
        if a < b:
          out[a - ix[0].start:b - ix[0].start] = block[(slice(a - r, b - r), *ix[1:])]
    return outs

  def _read(self, path: Path, offset: int, nbytes: int) -> bytearray:
    f = self._open.get(path)
    if f is None:
      f = self._open[path] = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    f.seek(offset)
    while done < nbytes:
      got = f.readinto(view[done:])
      if not got:
        raise CheckpointError(f"{path}: file ended at byte {offset + done} while reading "
                              f"{nbytes} bytes at {offset} (truncated since it was opened?)")
      done += got
    return buf


def _read_header(path: Path) -> dict[str, tuple]:
  if not path.is_file():
    raise CheckpointError(f"{path}: listed in the index but missing")
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: corrupt safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8 or n > 100_000_000:
      raise CheckpointError(f"{path}: corrupt safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = ST_DTYPES[meta["dtype"]]
      shape = tuple(int(s) for s in meta["shape"])
      begin, end = (int(o) for o in meta["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{path}: tensor {name!r} has a bad header entry ({e!r})") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != nbytes or 8 + n + end > size:
      raise CheckpointError(f"{path}: tensor {name!r} data is truncated or inconsistent "
                            f"(offsets {begin}..{end}, file size {size})")
    out[name] = (dtype, shape, 8 + n + begin)
  return out


# --------------------------------------------------------------------------------------------
# Writing.

TensorSpec = tuple[str, Any, tuple[int, ...]]  # name, numpy dtype, shape


def nbytes_of(spec: TensorSpec) -> int:
  return int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize


def write_stream(path: Path, specs: Sequence[TensorSpec], arrays: Iterable[np.ndarray],
                 metadata: dict | None = None) -> None:
  """Writes one safetensors file atomically from `arrays`, consumed one at a time in `specs`
  order (each must match its spec's dtype and shape)."""
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, dtype, shape in specs:
    n = nbytes_of((name, dtype, shape))
    header[name] = {"dtype": ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with atomic.atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for (name, dtype, shape), arr in zip(specs, arrays, strict=True):
      if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, its "
                         f"header says {np.dtype(dtype)}{list(shape)}")
      f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Writes one safetensors file atomically (tmp + rename) from in-memory tensors."""
  specs = [(name, arr.dtype, tuple(arr.shape)) for name, arr in tensors.items()]
  write_stream(Path(path), specs, tensors.values(), metadata)
