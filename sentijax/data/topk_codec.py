"""Byte encodings of the top-k store (topk_store.py): bit-packed ids, the version-2 quantised
log-probabilities (read for version-2 stores; version 3 codes entries in topk_entries.py) and the
shard container.

Ids: `id_bits(vocab)` = the narrowest width that holds every id (16 bits for SmolLM2's 49152,
17 for Llama-3's 128256), packed little-endian bit by bit (`pack_bits` / `unpack_bits`).

Version-2 log-probabilities (one position's top-k, descending): code_i = round((lp_1 - lp_i) /
step) in [0, 254] (relative to the position's top-1, clipped 254 steps below it), 255 = no entry;
stored as the first code and then the differences of successive codes, with the tail mass per
position as float16 log(tail). Decoding gives
  p_i = (1 - tail) * exp(-code_i * step) / sum_j exp(-code_j * step).

Shard container: MAGIC, an 8-byte little-endian header length, a JSON header listing each array
(name, dtype, shape, offset, size, bits, and "codec": "none" for an array stored as it is), then
the arrays, each compressed on its own with the store's codec (so a reader decompresses only
what it asks for).
"""
from __future__ import annotations

import json
import lzma
import struct
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

MAGIC = b"SJTOPK2\n"
MISSING = 255  # logprob code of "no entry"
MAX_CODE = 254
CODECS = ("lzma", "zlib", "none")  # zstd (PyPI zstandard) measured: no smaller than lzma
_CHUNK = 1 << 16  # values bit-packed at a time (bounds the temporary bit arrays: 32 B each)


class CodecError(ValueError):
  """Bytes that do not decode as a shard of this format."""


def id_bits(vocab_size: int) -> int:
  """The narrowest bit width holding ids 0 .. vocab_size - 1."""
  return max(1, int(vocab_size - 1).bit_length())


# --------------------------------------------------------------------------- bit packing


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned ints < 2**bits -> uint8 bytes, `bits` bits each, little-endian bit order."""
  flat = np.ascontiguousarray(values, dtype=np.uint32).reshape(-1)
  if flat.size and int(flat.max()) >> bits:
    raise ValueError(f"pack_bits: value {int(flat.max())} needs more than {bits} bits")
  if bits in (8, 16, 32):
    return flat.astype(f"<u{bits // 8}").view(np.uint8)
  out = []
  for start in range(0, flat.size, _CHUNK):  # chunks of a multiple of 8 values: whole bytes
    bits_NxB = np.unpackbits(flat[start:start + _CHUNK].astype("<u4").view(np.uint8).reshape(
        -1, 4), axis=1, bitorder="little")[:, :bits]
    out.append(np.packbits(bits_NxB.reshape(-1), bitorder="little"))
  return np.concatenate(out) if out else np.zeros(0, np.uint8)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of `pack_bits`: `count` values as uint32."""
  data = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
  if bits in (8, 16, 32):
    return data[:count * bits // 8].view(f"<u{bits // 8}").astype(np.uint32)
  out = np.empty(count, np.uint32)
  step = _CHUNK * bits // 8
  weights = (1 << np.arange(bits, dtype=np.uint32))
  for i, start in enumerate(range(0, count, _CHUNK)):
    n = min(_CHUNK, count - start)
    bits_NxB = np.unpackbits(data[i * step:i * step + (n * bits + 7) // 8], bitorder="little",
                             count=n * bits).reshape(n, bits)
    out[start:start + n] = bits_NxB.astype(np.uint32) @ weights
  return out


# --------------------------------------------------------------------------- log-probabilities


def quantise(logprobs_MxK: np.ndarray, step: float) -> np.ndarray:
  """uint8 codes [M, K] of descending log-probs relative to each row's first; -inf -> MISSING."""
  lp = np.asarray(logprobs_MxK, np.float64)
  if lp.size and (np.diff(np.where(np.isfinite(lp), lp, -1e30), axis=1) > 1e-6).any():
    raise ValueError("quantise: log-probabilities must be descending along each row")
  rel = (lp[:, :1] - lp) / step
  codes = np.clip(np.rint(np.where(np.isfinite(rel), rel, 0.0)), 0, MAX_CODE).astype(np.uint8)
  return np.where(np.isfinite(lp), codes, MISSING).astype(np.uint8)


def dequantise(codes_MxK: np.ndarray, log_tail_M: np.ndarray, step: float) -> np.ndarray:
  """float32 probabilities [M, K] (0 where MISSING) summing to 1 - exp(log_tail) per row."""
  table = np.exp(-np.arange(256, dtype=np.float64) * step).astype(np.float32)
  table[MISSING] = 0.0
  w = table[codes_MxK]  # the one [M, K] array made here (a shard's worth: no float64 copies)
  total = w.sum(-1, dtype=np.float64)
  listed = np.clip(-np.expm1(np.asarray(log_tail_M, np.float64)), 0.0, 1.0)  # 1 - tail
  w *= (listed / np.where(total > 0, total, 1.0)).astype(np.float32)[:, None]
  return w


def log_tail(logprobs_MxK: np.ndarray) -> np.ndarray:
  """log(1 - sum exp(logprobs)) per row, float64 (-inf when the listed mass reaches 1)."""
  listed = np.exp(np.asarray(logprobs_MxK, np.float64)).sum(-1)
  with np.errstate(divide="ignore"):
    return np.log(np.clip(1.0 - listed, 0.0, 1.0))


def v2_arrays(ids_MxK: np.ndarray, logprobs_MxK: np.ndarray, log_tail_M: np.ndarray,
              step: float) -> dict[str, np.ndarray]:
  """A version-2 shard's top-k arrays (stores are written as version 4 now: this makes v2
  stores for the converter's tests and bench_store.py's comparison)."""
  return {"topk_ids": np.asarray(ids_MxK), "logprob_deltas": codes_to_deltas(quantise(
      logprobs_MxK, step)), "log_tail": np.asarray(log_tail_M).astype(np.float16)}


def codes_to_deltas(codes_MxK: np.ndarray) -> np.ndarray:
  """First code, then successive differences (codes are non-decreasing along a row)."""
  return np.diff(codes_MxK, axis=1, prepend=np.zeros((len(codes_MxK), 1), np.uint8)).astype(
      np.uint8)


def deltas_to_codes(deltas_MxK: np.ndarray) -> np.ndarray:
  return np.cumsum(deltas_MxK, axis=1, dtype=np.uint8)  # codes <= 255: no wrap-around


# --------------------------------------------------------------------------- container


def compress(data: bytes, codec: str) -> bytes:
  if codec == "lzma":
    return lzma.compress(data, preset=6)
  if codec == "zlib":
    return zlib.compress(data, 9)
  if codec == "none":
    return bytes(data)
  raise ValueError(f"codec {codec!r}: expected one of {CODECS}")


def decompress(data: bytes, codec: str) -> bytes:
  if codec == "lzma":
    return lzma.decompress(data)
  if codec == "zlib":
    return zlib.decompress(data)
  if codec == "none":
    return bytes(data)
  raise ValueError(f"codec {codec!r}: expected one of {CODECS}")


def encode_shard(arrays: Mapping[str, np.ndarray], codec: str,
                 bits: Mapping[str, int] | None = None, stored: Sequence[str] = ()) -> bytes:
  """The shard bytes: arrays in the given order, `bits[name]`-bit packed where named, those in
  `stored` (already entropy-coded) with codec "none"."""
  bits = dict(bits or {})
  entries, blobs, offset = [], [], 0
  for name, array in arrays.items():
    array = np.ascontiguousarray(array)
    if name in bits:
      raw = pack_bits(array, bits[name]).tobytes()
    elif array.dtype.kind == "U":
      raw = json.dumps(array.tolist()).encode("utf-8")
    else:
      raw = array.tobytes()
    blob = compress(raw, "none" if name in stored else codec)
    entries.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                    "offset": offset, "size": len(blob), "bits": bits.get(name, 0)}
                   | ({"codec": "none"} if name in stored else {}))
    blobs.append(blob)
    offset += len(blob)
  header = json.dumps({"codec": codec, "arrays": entries}, sort_keys=True).encode("utf-8")
  return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs)


def read_header(data: bytes | memoryview) -> tuple[dict, int]:
  """(header, offset of the first array) of shard bytes; CodecError if they are not a shard."""
  if bytes(data[:len(MAGIC)]) != MAGIC:
    raise CodecError(f"not a top-k store shard (magic {bytes(data[:len(MAGIC)])!r})")
  (size,) = struct.unpack("<Q", bytes(data[len(MAGIC):len(MAGIC) + 8]))
  start = len(MAGIC) + 8
  try:
    header = json.loads(bytes(data[start:start + size]).decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CodecError(f"unreadable shard header ({e})") from None
  return header, start + size


def decode_arrays(data: bytes | memoryview, names: Sequence[str]) -> dict[str, np.ndarray]:
  """The named arrays of shard bytes (only those are decompressed)."""
  header, base = read_header(data)
  entries = {e["name"]: e for e in header["arrays"]}
  missing = [n for n in names if n not in entries]
  if missing:
    raise CodecError(f"shard has no array(s) {missing}")
  out = {}
  for name in names:
    e = entries[name]
    try:
      raw = decompress(data[base + e["offset"]:base + e["offset"] + e["size"]],
                       e.get("codec", header["codec"]))
    except (lzma.LZMAError, zlib.error, ValueError) as err:
      raise CodecError(f"array {name!r}: {type(err).__name__}: {err}") from None
    dtype, shape = np.dtype(e["dtype"]), tuple(e["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if e["bits"]:
      array = unpack_bits(np.frombuffer(raw, np.uint8), e["bits"], count).astype(dtype,
                                                                                copy=False)
    elif dtype.kind == "U":
      array = np.array(json.loads(raw.decode("utf-8")), dtype=str)
    else:
      array = np.frombuffer(raw, dtype)  # read-only view of the decompressed bytes
    if array.size != count:
      raise CodecError(f"array {name!r}: {array.size} values, header says shape {shape}")
    out[name] = array.reshape(shape)
  return out
