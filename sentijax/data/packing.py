"""Tokenise -> mask -> fit -> pack: records become fixed-length training rows (in memory).

Row schema (`pack_row`; the batches of dataset.py stack rows to [B, seq_len, ...]):

  inputs       int32    [L]     token ids fed to the model (0 on padding)
  targets      int32    [L]     next-token ids: targets[t] is the token after inputs[t] (0 on
                                padding)
  weights      float32  [L]     1.0 where targets[t] is a response token (incl. the final eos /
                                end of turn) and counts in the loss; 0.0 on prompt tokens and
                                padding
  segment_ids  int32    [L]     1..k for the k sequences packed into a row, 0 on padding;
                                attention must stay within a segment (causal AND
                                segment_ids[q] == segment_ids[k])
  positions    int32    [L]     position of each token within its own sequence (restarts at 0 per
                                segment; 0 on padding), for RoPE
  soft_ids     int32    [L, K]  ONLY with soft targets (K = `SoftTargets.width` > 0): K candidate
                                ids for targets[t] ...
  soft_probs   float32  [L, K]  ... and their probabilities (a teacher's distribution, e.g. over
                                the verbalizers' first tokens). All K zero = no soft target at t.
  soft_tail    float32  [L]     ONLY when the SoftTargets name it (an offline top-k store): the
                                teacher's mass outside the K ids
  soft_logp    float32  [L, K]  ONLY when named (a sampled store): the teacher's log-probability
                                of each id at the KD temperature

Stored rows (dataset.py) keep the soft fields only where a soft field is nonzero (for a store:
the loss positions): `soft_pos` int32 [S] and each soft field [S, ...] (`compact_row`), expanded
back to the dense [L, ...] fields when read (`expand_row`).

The loss is sum(weights * CE(logits, targets)) / sum(weights); a soft-target term uses the
positions where soft_probs.sum(-1) > 0.

Sequences come from `data/sequences.py` (tokenisation, chat template, soft targets,
truncation). Packing is greedy first-fit in corpus order into rows of
seq_len; no sequence is split across rows.
"""
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from sentijax.data.records import DataError, Record
from sentijax.data.sequences import (EXTRA_SOFT_FIELDS, SOFT_FIELDS, SoftTargets,
                                     TokenizedSequence, fit_sequence, tokenize_records)
from sentijax.data.spec import DataSpec

logger = logging.getLogger("sentijax")

FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions")
_FIELD_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                 "segment_ids": np.int32, "positions": np.int32, "soft_ids": np.int32,
                 "soft_probs": np.float32, "soft_tail": np.float32, "soft_logp": np.float32,
                 "soft_pos": np.int32}


def row_spec(seq_len: int, soft_width: int = 0, extra_fields: Sequence[str] = (),
             compact: bool = False) -> dict[str, tuple[tuple[int | None, ...], Any]]:
  """name -> (shape, dtype) of one packed row; soft fields only when soft_width > 0.
  `compact`: the stored layout (soft fields at `soft_pos` only: first dimension None)."""
  spec = {name: ((seq_len,), _FIELD_DTYPES[name]) for name in FIELDS}
  if soft_width:
    length = None if compact else seq_len
    if compact:
      spec["soft_pos"] = ((None,), _FIELD_DTYPES["soft_pos"])
    for name in SOFT_FIELDS + tuple(f for f in EXTRA_SOFT_FIELDS if f in extra_fields):
      shape = (length,) if name == "soft_tail" else (length, soft_width)
      spec[name] = (shape, _FIELD_DTYPES[name])
  return spec


def empty_row(seq_len: int, soft_width: int = 0, extra_fields: Sequence[str] = ()
              ) -> dict[str, np.ndarray]:
  """An all-padding row (zeros everywhere)."""
  return {name: np.zeros(shape, dtype) for name, (shape, dtype) in
          row_spec(seq_len, soft_width, extra_fields).items()}


def _soft_names(row: dict) -> list[str]:
  return [n for n in SOFT_FIELDS + EXTRA_SOFT_FIELDS if n in row]


def compact_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The stored layout of a packed row: soft fields only at the positions where one is nonzero
  (`soft_pos`); rows without soft fields unchanged."""
  names = _soft_names(row)
  if not names:
    return row
  used = np.zeros(len(row["inputs"]), bool)
  for name in names:
    used |= row[name].reshape(len(used), -1).any(-1)
  pos = np.flatnonzero(used).astype(np.int32)
  return {k: v for k, v in row.items() if k not in names} | {"soft_pos": pos} | {
      name: row[name][pos] for name in names}


def expand_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `compact_row`: the dense [L, ...] soft fields."""
  if "soft_pos" not in row:
    return row
  seq_len, pos = len(row["inputs"]), row["soft_pos"]
  out = {k: v for k, v in row.items() if k != "soft_pos"}
  for name in _soft_names(row):
    dense = np.zeros((seq_len,) + row[name].shape[1:], _FIELD_DTYPES[name])
    dense[pos] = row[name]
    out[name] = dense
  return out

# --------------------------------------------------------------------------- packing


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Greedy first-fit bin packing in order: each item goes to the first row with room.

  A max-segment-tree over remaining row capacities makes each placement O(log n).
  """
  if any(length > capacity or length <= 0 for length in lengths):
    raise ValueError(f"Every length must be in [1, {capacity}].")
  size = 1
  while size < max(len(lengths), 1):
    size *= 2
  tree = [capacity] * (2 * size)
  rows: list[list[int]] = []
  for item, length in enumerate(lengths):
    node = 1
    while node < size:
      node = 2 * node if tree[2 * node] >= length else 2 * node + 1
    row = node - size
    tree[node] -= length
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
    if row == len(rows):
      rows.append([])
    rows[row].append(item)
  return rows


def pack_row(sequences: Sequence[TokenizedSequence], seq_len: int, soft_width: int = 0,
             extra_fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """One packed row (see the module docstring) from sequences with total n - 1 <= seq_len."""
  row = empty_row(seq_len, soft_width, extra_fields)
  offset = 0
  for segment, sequence in enumerate(sequences, start=1):
    if sequence.soft_width != soft_width:
      raise ValueError(f"A sequence has soft targets of width {sequence.soft_width}; the row "
                       f"expects width {soft_width}.")
    length = len(sequence.tokens) - 1
    end = offset + length
    if end > seq_len:
      raise ValueError(f"Sequences of total length {end} do not fit seq_len={seq_len}.")
    row["inputs"][offset:end] = sequence.tokens[:-1]
    row["targets"][offset:end] = sequence.tokens[1:]
    row["weights"][offset:end] = sequence.loss_mask[1:]
    row["segment_ids"][offset:end] = segment
    row["positions"][offset:end] = np.arange(length)
    if soft_width:  # aligned with targets: the distribution for tokens[t] sits at t - 1
      for name in _soft_names(row):
        value = getattr(sequence, name)
        if value is None:
          raise ValueError(f"A sequence has no {name}; the row expects it.")
        row[name][offset:end] = value[1:]
    offset = end
  return row


@dataclasses.dataclass
class PackedRows:
  """Fitted sequences and their first-fit assignment to rows; `iter_rows()` builds the rows.

  With soft targets, `with_soft(i)` gives fitted sequence i with its soft targets (fn runs
  then, row by row); iterating the rows adds "num_soft_targets" to `stats`.
  """
  sequences: list[TokenizedSequence]
  rows: list[list[int]]
  seq_len: int
  soft_width: int
  stats: dict
  with_soft: Callable[[int], TokenizedSequence] | None = None
  extra_fields: tuple[str, ...] = ()

  def iter_rows(self) -> Iterator[dict[str, np.ndarray]]:
    soft_positions = 0
    for row in self.rows:
      get = self.with_soft or self.sequences.__getitem__
      out = pack_row([get(i) for i in row], self.seq_len, self.soft_width, self.extra_fields)
      if self.soft_width:
        soft_positions += int((out["soft_probs"].sum(-1) > 0).sum())
      yield out
    if self.soft_width:
      self.stats["num_soft_targets"] = soft_positions


def pack_records(records: Sequence[Record], tokenizer: Any, spec: DataSpec,
                 soft_targets: SoftTargets | None = None, show_progress: bool = True
                 ) -> PackedRows:
  """Tokenise -> mask -> (soft targets) -> fit to `spec.seq_len` -> first-fit rows, with stats."""
  if not records:
    raise DataError("No records to pack.")
  raw, token_stats = tokenize_records(records, tokenizer, spec.chat_template, show_progress)
  counts = {"kept": 0, "truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0,
            "dropped_empty_response": 0}
  sequences, sources = [], []
  for i, sequence in enumerate(raw):
    fitted, outcome = fit_sequence(sequence, spec.seq_len, spec.truncation,
                                   tokenizer.bos_token_id)
    counts[outcome] += 1
    if fitted is not None:
      sequences.append(fitted)
      sources.append(i)
  if not sequences:
    raise DataError(f"All {len(records)} records were dropped ({counts}); raise data.seq_len or "
                    "use data.truncation='left_prompt'.")
  rows = first_fit([len(s.tokens) - 1 for s in sequences], spec.seq_len)
  num_tokens = sum(len(s.tokens) - 1 for s in sequences)
  stats = token_stats | counts | {
      "records_in": len(records), "records_used": len(sequences), "num_rows": len(rows),
      "num_tokens": num_tokens, "seq_len": spec.seq_len, "truncation": spec.truncation,
      "num_loss_tokens": int(sum(int(s.loss_mask[1:].sum()) for s in sequences)),
      "fill_ratio": num_tokens / (len(rows) * spec.seq_len)}
  if soft_targets is None:
    return PackedRows(sequences, rows, spec.seq_len, 0, stats)

  def with_soft(i: int) -> TokenizedSequence:  # the same fit, now with the soft targets
    j = sources[i]
    return fit_sequence(soft_targets.attach(records[j], raw[j]), spec.seq_len, spec.truncation,
                        tokenizer.bos_token_id)[0]

  stats |= {"soft_width": soft_targets.width, "soft_key": soft_targets.key,
            "soft_fields": list(SOFT_FIELDS + soft_targets.extra_fields)}
  return PackedRows(sequences, rows, spec.seq_len, soft_targets.width, stats, with_soft,
                    soft_targets.extra_fields)
