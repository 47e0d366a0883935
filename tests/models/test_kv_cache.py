"""KV-cache forward: prefill + one token at a time equals the full forward (scan or per layer)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentijax import models
from tolerances import assert_close

CFG = models.presets.get("tiny")


@pytest.mark.parametrize("per_layer", [False, True], ids=["scan", "per-layer"])
def test_cached_decoding_equals_full_forward_with_left_padding(per_layer):
  """Prefill then one token at a time (the T=1 attention), with the layers as a scan over
  stacked weights and cache, or as a loop over per-layer ones (the decode loop's mode)."""
  params = models.init(CFG, 3)
  ids = jnp.asarray(np.random.default_rng(2).integers(5, CFG.vocab_size, (2, 12)))
  seg = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12])
  full = models.forward(CFG, params, ids, segment_ids_BxT=seg)
  pos = models.default_positions(seg)
  cache = models.init_cache(CFG, 2, 16)
  layers = None
  if per_layer:
    cache, layers = models.unstack_cache(cache), models.unstack_layers(params)
    assert len(layers) == len(cache.k) == CFG.num_layers
  step = jax.jit(functools.partial(models.forward_with_cache, CFG, layers=layers))
  logits, cache = step(params, ids[:, :8], pos[:, :8], seg[:, :8], cache)
  outs = [logits]
  for t in range(8, 12):  # one token at a time
    logits, cache = step(params, ids[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache)
    outs.append(logits)
  got = jnp.concatenate(outs, axis=1)
  real = np.asarray(seg) == 1
  # Same math over 16 cache slots instead of 12 keys: fp32 summation order only.
  assert_close(np.asarray(got)[real], np.asarray(full)[real], 1e-5, "cached logits")
  assert int(cache.index) == 12
  if per_layer:
    with pytest.raises(ValueError, match="unstack_layers"):
      models.forward_with_cache(CFG, params, ids[:, :1], pos[:, :1], seg[:, :1], cache,
                                layers=layers[:-1])
