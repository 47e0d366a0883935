"""Batch-shape planning: every prompt once, within the memory budget, at the least cost."""
import itertools

import numpy as np
import pytest

from sentijax import sampling
from sentijax.models import presets
from sentijax.eval import buckets


def _check_cover(plan, lengths, batch_size, divisor, extra_len=0):
  assert sorted(i for b in plan for i in b.order) == list(range(len(lengths)))
  for b in plan:
    assert len(b.order) <= b.rows and b.rows % divisor == 0
    assert b.length == sampling.bucket_length(b.length)
    assert all(lengths[i] <= b.length for i in b.order)
    width = b.length + extra_len
    assert b.rows <= max(divisor, buckets.rows_for_length(width, batch_size, divisor))
    assert b.rows * width <= max(divisor * width, batch_size * 512)


def _objective(plan, extra_len, cost, compiled=()):
  shapes = {b.shape for b in plan} - set(compiled)
  return sum(b.rows * (b.length + extra_len) for b in plan) + cost * len(shapes)


def _contiguous(lengths, allowed, batch_size, divisor, extra_len, tail_rows,
                grid=sampling.bucket_length):
  """Batches of consecutive prompts (longest first), each padded to the smallest allowed length
  that fits its first prompt; the last partial batch split as `tail_rows(n_left, full_rows)`."""
  order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
  out, pos = [], 0
  while pos < len(order):
    length = min(a for a in allowed if a >= grid(lengths[order[pos]]))
    full = buckets.rows_for_length(length + extra_len, batch_size, divisor)
    rows_list = [full] if len(order) - pos >= full else tail_rows(len(order) - pos, full)
    for rows in rows_list:
      if pos < len(order):
        length = min(a for a in allowed if a >= grid(lengths[order[pos]]))
        out.append(buckets.PlannedBatch(tuple(order[pos:pos + rows]), rows, length))
        pos += rows
  return out


def _previous_heuristic(lengths, batch_size, divisor, extra_len):
  """The scorer's batching before planning: every grid length, halve a tail batch while more
  than a quarter of its rows would be filler."""
  def halve(left, full):
    out = []
    while left > 0:
      rows = min(full, sampling.bucket_batch(left, divisor))
      while (rows - left) * 4 > rows and rows // 2 >= divisor:
        rows //= 2
      out.append(rows)
      left -= min(rows, left)
    return out
  grid = sorted({sampling.bucket_length(n) for n in lengths})
  return _contiguous(lengths, grid, batch_size, divisor, extra_len, halve)


def _brute_force(lengths, batch_size, divisor, extra_len, cost, compiled=(),
                 grid_of=sampling.bucket_length):
  """Minimum objective over every set of allowed lengths and every tail option."""
  grid = [grid_of(n) for n in lengths]
  candidates = sorted(set(grid) | {l for _, l in compiled if l >= min(grid)})
  best = float("inf")
  for k in range(1, len(candidates) + 1):
    for allowed in itertools.combinations(candidates, k):
      if allowed[-1] < max(grid):
        continue
      for option in range(4):
        tail = lambda left, full: buckets._tail_options(left, full, divisor)[option]
        plan = _contiguous(lengths, allowed, batch_size, divisor, extra_len, tail, grid_of)
        best = min(best, _objective(plan, extra_len, cost, compiled))
  return best


def test_rows_follow_the_memory_budget():
  assert buckets.rows_for_length(448, 16) == 16
  assert buckets.rows_for_length(5120, 16) == 1  # IMDb-length prompts: one row per batch
  assert buckets.rows_for_length(5120, 16, divisor=4) == 4
  assert buckets.rows_for_length(1024, 16, divisor=4) == 4


def test_zero_compile_cost_pads_least():
  lengths = [5000, 30, 700, 12, 300, 310, 4100]
  for divisor in (1, 2):
    plan = buckets.plan(lengths, 4, divisor)
    _check_cover(plan, lengths, 4, divisor)
    assert _objective(plan, 0, 0) == min(
        _objective(_contiguous(lengths, sorted({sampling.bucket_length(n) for n in lengths}), 4,
                               divisor, 0, lambda left, full: [full]), 0, 0),
        _objective(_previous_heuristic(lengths, 4, divisor, 0), 0, 0))
  # No filler rows at all: 13 prompts of one bucket -> 8 + 4 + 1 rows.
  for n, want in ((9, [8, 1]), (13, [8, 4, 1]), (5, [4, 1]), (16, [16])):
    plan = buckets.plan([100] * n, 16)
    assert [b.rows for b in plan] == want and sum(len(b.order) for b in plan) == n
  # On a mesh the smallest batch is the divisor: 5 rows over 4 shards -> 8 (3 filler rows).
  assert [b.rows for b in buckets.plan([10] * 5, 16, 4)] == [8]


def test_large_compile_cost_gives_one_shape():
  rng = np.random.default_rng(0)
  lengths = list(rng.integers(100, 300, size=45))  # sst2-like: grid lengths 128..320
  plan = buckets.plan(lengths, 16, compile_cost=1e9)
  _check_cover(plan, lengths, 16, 1)
  assert {b.shape for b in plan} == {(16, 320)}
  assert len(plan) == 3  # 45 prompts -> 3 batches of 16 rows (3 filler rows)


@pytest.mark.parametrize("seed", range(8))
def test_plan_is_optimal(seed):
  """The plan costs exactly the brute-force minimum, and never more than the previous
  heuristic (every grid length, halved tails) or one length for all."""
  rng = np.random.default_rng(seed)
  lengths = [int(x) for x in rng.integers(20, 700, size=int(rng.integers(5, 60)))]
  divisor = int(rng.choice([1, 2, 4]))
  extra_len = int(rng.choice([0, 150]))
  cost = float(rng.choice([0, 300, 3000, 30000]))
  compiled = {(divisor * 4, 512)} if seed % 2 else set()
  plan = buckets.plan(lengths, 16, divisor, extra_len, cost, compiled)
  _check_cover(plan, lengths, 16, divisor, extra_len)
  got = _objective(plan, extra_len, cost, compiled)
  assert got == pytest.approx(_brute_force(lengths, 16, divisor, extra_len, cost, compiled),
                              rel=1e-12)
  previous = _previous_heuristic(lengths, 16, divisor, extra_len)
  assert got <= _objective(previous, extra_len, cost, compiled)


def test_many_lengths_use_greedy_search():
  """Over EXHAUSTIVE_LENGTHS candidate lengths the search is greedy; still no worse than the
  previous heuristic and than padding everything to the longest."""
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in rng.integers(300, 2600, size=300)]  # yelp-like, ~14 grid lengths
  assert len({sampling.bucket_length(n) for n in lengths}) > buckets.EXHAUSTIVE_LENGTHS
  for cost in (0, 900, 1e6):
    plan = buckets.plan(lengths, 16, compile_cost=cost)
    _check_cover(plan, lengths, 16, 1)
    got = _objective(plan, 0, cost)
    assert got <= _objective(_previous_heuristic(lengths, 16, 1, 0), 0, cost)
    one = _contiguous(lengths, [sampling.bucket_length(max(lengths))], 16, 1, 0,
                      lambda left, full: [full])
    assert got <= _objective(one, 0, cost)


def test_compiled_shapes_are_reused():
  """A shape compiled for an earlier dataset is free: padding to it beats a new compilation."""
  lengths = [150] * 16  # grid 192
  assert {b.shape for b in buckets.plan(lengths, 16, compile_cost=5000)} == {(16, 192)}
  reuse = buckets.plan(lengths, 16, compile_cost=5000, compiled={(16, 320)})
  assert {b.shape for b in reuse} == {(16, 320)}  # 16 x 128 padded tokens < 5000
  fresh = buckets.plan(lengths, 16, compile_cost=1000, compiled={(16, 320)})
  assert {b.shape for b in fresh} == {(16, 192)}  # 2048 padded tokens > 1000


def test_compile_cost_estimate_scales_with_platform_and_model():
  cfg_small = presets.get("qwen2.5-0.5b")
  cfg_big = presets.get("llama-3.2-3b")
  cpu = buckets.compile_cost_tokens(cfg_small, "forward", "cpu")
  assert buckets.compile_cost_tokens(cfg_small, "forward", "gpu") > 100 * cpu
  assert buckets.compile_cost_tokens(cfg_small, "decode", "cpu") > cpu
  assert buckets.compile_cost_tokens(cfg_big, "forward", "cpu") < cpu / 3


def test_finer_grid_pads_less():
  """grid_length: multiples of 16 up to 512 tokens, the coarse grid beyond (64 = that grid).
  On sst2-like suffix lengths the 16-token grid the scorer uses pads less than the 64-token
  grid at the same compile cost, and its plan is still the brute-force optimum."""
  assert [buckets.grid_length(n, 16) for n in (1, 16, 17, 500, 513, 4500)] == [
      16, 16, 32, 512, 640, 5120]
  assert all(buckets.grid_length(n) == sampling.bucket_length(n) for n in range(1, 3000, 7))
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in rng.normal(152, 30, size=200).clip(86, 228)]
  for cost in (0, 900):
    fine = buckets.plan(lengths, 16, compile_cost=cost, multiple=16)
    coarse = buckets.plan(lengths, 16, compile_cost=cost)
    assert all(b.length % 16 == 0 for b in fine)
    assert _objective(fine, 0, cost) < 0.93 * _objective(coarse, 0, cost)
  small = [int(x) for x in rng.integers(20, 180, size=24)]  # <= 10 grid lengths: exhaustive
  grid = lambda n: buckets.grid_length(n, 16)
  assert len({grid(n) for n in small}) <= buckets.EXHAUSTIVE_LENGTHS
  plan = buckets.plan(small, 4, compile_cost=300, multiple=16)
  assert _objective(plan, 0, 300) == _brute_force(small, 4, 1, 0, 300, grid_of=grid)
