"""Batch shapes for scoring: few distinct (rows, length) shapes for little padding.

Every distinct batch shape is one XLA compilation (~2-3 s for SmolLM2-135M's forward on a
2-core CPU, ~20 s for its decode loop on an H200) and every padded token is wasted compute.
`plan` trades the two: it chooses the length buckets (from the `grid_length` grid: multiples of
16 tokens up to 512, then ~1/8 of an octave) and the tail batches that minimise

    padded tokens + compile_cost_tokens * (number of shapes not compiled yet)

over the choice of allowed lengths (`plan`). Shapes compiled earlier in the same run
(`compiled`: another dataset, another seed) cost nothing, so datasets share shapes when that is
cheaper. `compile_cost_tokens = 0` keeps every grid bucket and pads no rows (least compute);
a large value pads everything to one shape. `compile_cost_tokens(...)` estimates the trade for a
model on a platform.

Rows per batch follow a token budget (`rows_for_length`): batch_size rows of up to 512 tokens,
fewer rows for longer prompts (IMDb's 5k-token prompts run one per batch), always a multiple of
the mesh's batch divisor.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Collection, Sequence

from sentijax import models, sampling

TOKENS_PER_ROW = 512  # token budget per batch = batch_size * TOKENS_PER_ROW
LENGTH_MULTIPLE = 16  # the scorer's grid step up to 512 tokens (sst2: 6% padding vs 23% at 64)
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
  length: int  # padded prompt length (a `grid_length` value)

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


def grid_length(n: int, multiple: int = 64) -> int:
  """Rounds a length up to a multiple of `multiple` up to 512 tokens, beyond that to
  `sampling.bucket_length`'s coarser grid (~1/8 of an octave); multiple=64 is that grid."""
  n = max(int(n), 1)
  return -(-n // multiple) * multiple if n <= TOKENS_PER_ROW else sampling.bucket_length(n)


def rows_for_length(length: int, batch_size: int, divisor: int = 1) -> int:
  """Rows per batch at padded `length` tokens: <= batch_size, within the token and attention
  budgets of `batch_size` rows of 512 tokens; divisor * a power of two (at least divisor)."""
  budget = batch_size * TOKENS_PER_ROW
  rows = min(batch_size, budget // length, budget * TOKENS_PER_ROW // (length * length))
  per_shard = max(1, rows // divisor)
  return divisor * (1 << (per_shard.bit_length() - 1))  # divisor * a power of two


def _tail_options(tail: int, full_rows: int, divisor: int) -> list[list[int]]:
  """Ways to run the last `tail` (< full_rows) prompts: lists of padded row counts.

  One batch of the full row count; one of the next power-of-two size; exact power-of-two pieces
  (13 -> 8 + 4 + 1; the smallest rounds up to the divisor); or halving while more than a quarter
  of the rows would be filler (11 -> 8 + 4).
  """
  options = [[full_rows], [min(full_rows, sampling.bucket_batch(tail, divisor))]]
  units = -(-tail // divisor)  # binary digits of the row count in units of the divisor
  options.append([divisor << b for b in reversed(range(units.bit_length())) if units >> b & 1])
  halving, left = [], tail
  while left > 0:
    rows = min(full_rows, sampling.bucket_batch(left, divisor))
    while (rows - left) * 4 > rows and rows // 2 >= divisor:
      rows //= 2
    halving.append(rows)
    left -= min(rows, left)
  options.append(halving)
  return options


class _Planner:
  """Batches for one choice of allowed lengths, and their cost (see the module docstring)."""

  def __init__(self, lengths: Sequence[int], batch_size: int, divisor: int, extra_len: int,
               cost: float, compiled: Collection[Shape], multiple: int):
    self.order = sorted(range(len(lengths)), key=lambda k: -lengths[k])  # longest first
    self.grid = [grid_length(lengths[k], multiple) for k in self.order]
    self.batch_size, self.divisor, self.extra_len = batch_size, divisor, extra_len
    self.cost, self.compiled = cost, set(compiled)

  def batches(self, allowed: Sequence[int]) -> tuple[float, list[PlannedBatch]]:
    """Consecutive prompts (longest first) fill batches; a batch is padded to the smallest
    allowed length that fits its first (longest) prompt; the last, partial batch takes the
    cheapest of `_tail_options`."""
    allowed = sorted(allowed)
    fit = lambda g: allowed[bisect.bisect_left(allowed, g)]
    out, pos, n = [], 0, len(self.order)
    while pos < n:
      length = fit(self.grid[pos])
      full_rows = rows_for_length(length + self.extra_len, self.batch_size, self.divisor)
      if n - pos >= full_rows:
        out.append(PlannedBatch(tuple(self.order[pos:pos + full_rows]), full_rows, length))
        pos += full_rows
        continue
      best = None
      for rows_list in _tail_options(n - pos, full_rows, self.divisor):
        tail, p = [], pos
        for rows in rows_list:
          if p < n:
            tail.append(PlannedBatch(tuple(self.order[p:p + rows]), rows, fit(self.grid[p])))
            p += rows
        total = self.objective(out + tail)
        if best is None or total < best[0]:
          best = (total, out + tail)
      return best
    return self.objective(out), out

  def objective(self, batches: Sequence[PlannedBatch]) -> float:
    new_shapes = {b.shape for b in batches} - self.compiled
    return (sum(b.rows * (b.length + self.extra_len) for b in batches)
            + self.cost * len(new_shapes))


EXHAUSTIVE_LENGTHS = 10  # up to this many candidate lengths every subset is tried


def plan(lengths: Sequence[int], batch_size: int, divisor: int = 1, extra_len: int = 0,
         compile_cost: float = 0.0, compiled: Collection[Shape] = (),
         multiple: int = 64) -> list[PlannedBatch]:
  """Batches (longest prompts first) covering every prompt once; see the module docstring.

  The allowed lengths are chosen among the grid lengths of the prompts and the lengths of
  `compiled` shapes: every subset when there are at most EXHAUSTIVE_LENGTHS of them, else a
  local search (add or remove one length while the cost falls) from all of them and from the
  longest alone. `extra_len`: tokens each row grows by
  while decoding (counts as compute and memory). `multiple`: the grid step (`grid_length`).
  """
  if not len(lengths):
    return []
  planner = _Planner(lengths, batch_size, divisor, extra_len, compile_cost, compiled, multiple)
  longest = planner.grid[0]
  candidates = sorted(set(planner.grid) | {l for _, l in compiled if l >= planner.grid[-1]})
  if len(candidates) <= EXHAUSTIVE_LENGTHS:
    subsets = (c for k in range(1, len(candidates) + 1)
               for c in itertools.combinations(candidates, k) if c[-1] >= longest)
    return min((planner.batches(c) for c in subsets), key=lambda r: r[0])[1]
  results = []
  for allowed in (list(candidates), [min(c for c in candidates if c >= longest)]):
    best = planner.batches(allowed)
    while True:  # one length removed (from all) or added (from the longest) at a time
      moves = ([allowed[:i] + allowed[i + 1:] for i in range(len(allowed))
                if len(allowed) > 1 and max(allowed[:i] + allowed[i + 1:]) >= longest]
               + [sorted(allowed + [c]) for c in candidates if c not in allowed])
      trial = min(((planner.batches(m), m) for m in moves), key=lambda t: t[0][0], default=None)
      if trial is None or trial[0][0] >= best[0]:
        break
      best, allowed = trial
    results.append(best)
  return min(results, key=lambda r: r[0])[1]
