"""The shared prompt prefix: what counts as shared, and a prefixed forward equals the whole one."""
import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models, prefix, sampling
from sentijax.models import presets


def test_shared_length():
  common = list(range(100, 120))  # 20 shared tokens
  seqs = [common + [1, 2, 3], common + [4], common + [1, 5, 6, 7]]
  assert prefix.shared_length(seqs) == 20
  assert prefix.shared_length(seqs, min_tokens=21) == 0  # too short to be worth a program
  assert prefix.shared_length([common + [1]]) == 0  # one prompt: nothing to share
  # Every row keeps at least one token of its own (its last position is the one scored).
  assert prefix.shared_length([common, common + [9]], min_tokens=4) == 19
  assert prefix.shared_length([common, common], min_tokens=4) == 19
  assert prefix.slots_for(20) == 64 and prefix.slots_for(64) == 64 and prefix.slots_for(65) == 128


def test_prefixed_forward_equals_whole_prompt():
  """Last-position logits of [prefix | filler | left-padded suffix] equal those of the whole
  left-padded prompts (fp32, relative to the logits' scale)."""
  cfg = presets.get("tiny").replace(dtype="float32")
  params = models.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  shared = list(rng.integers(3, cfg.vocab_size, 21))
  seqs = [shared + list(rng.integers(3, cfg.vocab_size, n)) for n in (5, 17, 1, 9)]
  n = prefix.shared_length(seqs)
  assert n == 21
  ids, mask = sampling.left_pad(seqs, 48, 4, 0)
  whole_BxV = models.forward(cfg, params, jnp.asarray(ids), segment_ids_BxT=jnp.asarray(mask),
                             last_only=True)[:, 0]
  p = prefix.compute(cfg, params, seqs[0][:n])
  ids, mask = sampling.left_pad([s[n:] for s in seqs], 24, 4, 0)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  cache = prefix.batch_cache(cfg, p, 4, 24)
  got_BxV, _ = models.forward_with_cache(cfg, params, ids, prefix.suffix_positions(p, mask), mask,
                                         cache, last_only=True)
  scale = float(jnp.abs(whole_BxV).max())
  # ~1e-6 of the scale from other matmul shapes; a wrong position or mask moves it by > 1e-2.
  np.testing.assert_allclose(got_BxV[:, 0], whole_BxV, rtol=0, atol=1e-4 * scale)
