"""Batch shapes for scoring: few distinct (rows, length) shapes for little padding.

Every distinct batch shape is one XLA compilation (~2-3 s for SmolLM2-135M's forward on a
2-core CPU, ~20 s for its decode loop on an H200) and every padded token is wasted compute.
`plan` trades the two: it chooses the length buckets (from the `sampling.bucket_length` grid)
and the tail batches that minimise

    padded tokens + compile_cost_tokens * (number of shapes not compiled yet)

by dynamic programming over the grid lengths present. Shapes compiled earlier in the same run
(`compiled`: another dataset, another seed) cost nothing, so datasets share shapes when that is
cheaper. `compile_cost_tokens = 0` keeps every grid bucket and pads no rows (least compute);
a large value pads everything to one shape. `compile_cost_tokens(...)` estimates the trade for a
model on a platform.

Rows per batch follow a token budget (`rows_for_length`): batch_size rows of up to 512 tokens,
fewer rows for longer prompts (IMDb's 5k-token prompts run one per batch), always a multiple of
the mesh's batch divisor.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from sentijax import models, sampling

TOKENS_PER_ROW = 512  # token budget per batch = batch_size * TOKENS_PER_ROW
Shape = tuple[int, int]  # (rows, padded prompt length)

# Seconds to compile one shape, and FLOP/s a small model sustains, per platform and program.
# Measured: cpu forward 1.8-2.8 s and ~1e11 FLOP/s (SmolLM2-135M fp32, 2 vCPUs); gpu decode
# 19.9 s and ~3e13 FLOP/s (H200: SmolLM2-135M trained at 2.7% MFU). The rest are estimates of
# the same order: only the ratio matters, and only to within a factor of a few.
COMPILE_SECONDS = {"cpu": {"forward": 2.5, "decode": 6.0},
                   "gpu": {"forward": 8.0, "decode": 20.0},
                   "tpu": {"forward": 8.0, "decode": 20.0}}
SUSTAINED_FLOPS = {"cpu": 1e11, "gpu": 3e13, "tpu": 3e13}


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  order: tuple[int, ...]  # indices of the sequences in this batch (longest first)
  rows: int  # padded rows (>= len(order), a multiple of the divisor)
  length: int  # padded prompt length (a `sampling.bucket_length` value)

  @property
  def shape(self) -> Shape:
    return self.rows, self.length


def compile_cost_tokens(cfg: models.ModelConfig, program: str, platform: str) -> float:
  """What one compilation costs in prompt tokens of compute: seconds x FLOP/s / FLOPs per token.

  SmolLM2-135M: ~900 tokens on a CPU (forward), ~800k on a GPU (a few shapes per dataset).
  """
  seconds = COMPILE_SECONDS.get(platform, COMPILE_SECONDS["gpu"])[program]
  forward_flops_per_token = cfg.flops_per_token(TOKENS_PER_ROW) / 3
  return seconds * SUSTAINED_FLOPS.get(platform, SUSTAINED_FLOPS["gpu"]) / forward_flops_per_token


def rows_for_length(length: int, batch_size: int, divisor: int = 1) -> int:
  """Rows per batch at padded `length` tokens: <= batch_size, within the token and attention
  budgets of `batch_size` rows of 512 tokens; divisor * a power of two (at least divisor)."""
  budget = batch_size * TOKENS_PER_ROW
  rows = min(batch_size, budget // length, budget * TOKENS_PER_ROW // (length * length))
  per_shard = max(1, rows // divisor)
  return divisor * (1 << (per_shard.bit_length() - 1))  # divisor * a power of two


def _tail_options(tail: int, full_rows: int, divisor: int) -> list[list[int]]:
  """Ways to run the last `tail` (< full_rows) sequences of a bucket: lists of padded row counts.

  One batch of the full row count; one batch of the next power-of-two size; or exact
  power-of-two pieces (13 -> 8 + 4 + 1; the smallest piece rounds up to the divisor).
  """
  options = [[full_rows], [min(full_rows, sampling.bucket_batch(tail, divisor))]]
  units = -(-tail // divisor)  # binary digits of the row count in units of the divisor
  options.append([divisor << b for b in reversed(range(units.bit_length())) if units >> b & 1])
  return options


def _bucket_cost(n: int, length: int, batch_size: int, divisor: int, extra_len: int,
                 cost: float, compiled: Collection[Shape]) -> tuple[float, list[int]]:
  """(cost, padded row counts of its batches) of `n` sequences padded to `length`."""
  width = length + extra_len
  full_rows = rows_for_length(width, batch_size, divisor)
  num_full, tail = divmod(n, full_rows)
  best = (float("inf"), [])
  for tail_rows in _tail_options(tail, full_rows, divisor) if tail else [[]]:
    batches = [full_rows] * num_full + tail_rows
    new_shapes = {r for r in batches if (r, length) not in compiled}
    total = sum(batches) * width + cost * len(new_shapes)
    if total < best[0]:
      best = (total, batches)
  return best


def plan(lengths: Sequence[int], batch_size: int, divisor: int = 1, extra_len: int = 0,
         compile_cost: float = 0.0, compiled: Collection[Shape] = ()) -> list[PlannedBatch]:
  """Batches (longest bucket first) covering every sequence once; see the module docstring.

  `extra_len`: tokens each row grows by while decoding (counts as compute and memory).
  """
  if not len(lengths):
    return []
  grid_of = [sampling.bucket_length(n) for n in lengths]
  present = sorted(set(grid_of))
  candidates = sorted(set(present) | {l for _, l in compiled if l >= present[0]})
  count = {g: 0 for g in candidates}
  for g in grid_of:
    count[g] += 1
  # best[j]: cheapest way to cover every sequence with grid length <= candidates[j], its last
  # bucket at candidates[j]; choice[j] = (i, row counts): the previous bucket ends at i - 1.
  best = [0.0] * (len(candidates) + 1)
  choice: list[tuple[int, list[int]]] = [(0, [])] * (len(candidates) + 1)
  for j in range(1, len(candidates) + 1):
    best[j] = float("inf")
    n = 0
    for i in range(j, 0, -1):  # bucket covers candidates[i-1 .. j-1], padded to candidates[j-1]
      n += count[candidates[i - 1]]
      c, rows = _bucket_cost(n, candidates[j - 1], batch_size, divisor, extra_len,
                             compile_cost, compiled) if n else (0.0, [])
      if best[i - 1] + c < best[j]:
        best[j], choice[j] = best[i - 1] + c, (i - 1, rows)
  end = min((j for j in range(1, len(candidates) + 1) if candidates[j - 1] >= present[-1]),
            key=lambda j: best[j])
  order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
  buckets = []
  while end > 0:
    start, rows = choice[end]
    lo, hi = (candidates[start - 1] if start else 0), candidates[end - 1]
    members = [k for k in order if lo < grid_of[k] <= hi]
    for r in rows:
      take, members = members[:r], members[r:]
      if take:
        buckets.append(PlannedBatch(tuple(take), r, hi))
    end = start
  return buckets
