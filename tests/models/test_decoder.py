"""Decoder internals: presets, remat, bf16 compute, KV cache, masking."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentijax import models
from sentijax.models import decoder

CFG = models.presets.get("tiny")

# Parameter counts of the published checkpoints (billions, 3 decimals).
PUBLISHED = {"llama-3.2-1b": 1.236, "llama-3.2-3b": 3.213, "llama-3.1-8b": 8.030,
             "llama-3.1-70b": 70.554, "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.544,
             "qwen2.5-7b": 7.616, "qwen2.5-72b": 72.706}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_sizes(name):
  cfg = models.presets.get(name)
  assert round(cfg.num_params / 1e9, 3) == PUBLISHED[name]
  shapes = models.param_shapes(cfg)  # abstract: no memory
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == cfg.num_params


def test_unknown_preset_and_bad_config():
  with pytest.raises(KeyError, match="unknown model preset 'gpt-5'"):
    models.presets.get("gpt-5")
  with pytest.raises(ValueError, match="num_kv_heads"):
    CFG.replace(num_kv_heads=3)


def _loss(cfg, params, ids):
  logits = models.forward(cfg, params, ids)
  return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))


def test_remat_gives_identical_loss_and_grads():
  params = models.init(CFG, 0)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)))
  g1 = jax.jit(jax.grad(lambda p: _loss(CFG, p, ids)))(params)
  g2 = jax.jit(jax.grad(lambda p: _loss(CFG.replace(remat=True), p, ids)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_bf16_compute_close_to_fp32_with_fp32_params():
  params = models.init(CFG, 0)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 24))
  l32 = np.asarray(models.apply(CFG, params, ids))
  l16 = models.apply(CFG.replace(dtype="bfloat16"), params, ids)
  assert l16.dtype == jnp.float32  # logits always come back in fp32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert np.abs(np.asarray(l16) - l32).max() < 0.05


def test_cached_decoding_equals_full_forward_with_left_padding():
  params = models.init(CFG, 3)
  ids = jnp.asarray(np.random.default_rng(2).integers(5, CFG.vocab_size, (2, 12)))
  seg = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12])
  full = models.forward(CFG, params, ids, segment_ids_BxT=seg)
  pos = models.default_positions(seg)
  cache = models.init_cache(CFG, 2, 16)
  logits, cache = models.forward_with_cache(CFG, params, ids[:, :8], pos[:, :8], seg[:, :8], cache)
  outs = [logits]
  for t in range(8, 12):  # one token at a time
    logits, cache = models.forward_with_cache(CFG, params, ids[:, t:t + 1], pos[:, t:t + 1],
                                              seg[:, t:t + 1], cache)
    outs.append(logits)
  got = jnp.concatenate(outs, axis=1)
  real = np.asarray(seg) == 1
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5)
  assert int(cache.index) == 12


def test_segments_do_not_attend_across_and_positions_restart():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(decoder.attention_mask(seg))[0]
  assert mask[1, 0] and not mask[2, 1] and mask[4, 2] and not mask[5].any()
  assert not mask[0, 1]  # causal
  np.testing.assert_array_equal(models.default_positions(seg), [[0, 1, 0, 1, 2, 0]])
  # Changing segment 1's tokens leaves segment 2's logits unchanged.
  params = models.init(CFG, 0)
  a = jnp.asarray([[7, 8, 9, 10, 11, 0]])
  b = jnp.asarray([[70, 80, 9, 10, 11, 0]])
  la = models.forward(CFG, params, a, segment_ids_BxT=seg)
  lb = models.forward(CFG, params, b, segment_ids_BxT=seg)
  np.testing.assert_allclose(la[0, 2:5], lb[0, 2:5], atol=1e-6)


def test_flops_per_token_matches_6n_rule_of_thumb():
  cfg = models.presets.get("llama-3.1-8b")
  f = cfg.flops_per_token(seq_len=1)
  assert 0.9 < f / (6 * cfg.num_params) < 1.0  # 6N minus the embedding lookup


def test_query_chunked_attention_equals_full_attention():
  params = models.init(CFG, 4)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 32)))
  seg = jnp.asarray([[0] * 5 + [1] * 27, [1] * 12 + [2] * 20])
  full_cfg, chunked_cfg = CFG.replace(attention_chunk=0), CFG.replace(attention_chunk=8)

  def loss(cfg, p):
    logits = models.forward(cfg, p, ids, segment_ids_BxT=seg)
    return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., 7])

  (l_full, g_full) = jax.value_and_grad(functools.partial(loss, full_cfg))(params)
  (l_chunk, g_chunk) = jax.value_and_grad(functools.partial(loss, chunked_cfg))(params)
  np.testing.assert_allclose(float(l_chunk), float(l_full), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_chunk, g_full)
  real = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(models.forward(chunked_cfg, params, ids,
                                                       segment_ids_BxT=seg))[real],
                             np.asarray(models.forward(full_cfg, params, ids,
                                                       segment_ids_BxT=seg))[real], atol=1e-6)
