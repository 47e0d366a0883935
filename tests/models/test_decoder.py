"""Decoder internals: remat, bf16 compute, masking, chunked attention, FLOPs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models
from sentijax.models import attention
from tolerances import assert_close

CFG = models.presets.get("tiny")


def _loss(cfg, params, ids):
  logits = models.forward(cfg, params, ids)
  return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))


def test_remat_gives_identical_loss_and_grads():
  params = models.init(CFG, 0)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)))
  g1 = jax.jit(jax.grad(lambda p: _loss(CFG, p, ids)))(params)
  g2 = jax.jit(jax.grad(lambda p: _loss(CFG.replace(remat=True), p, ids)))(params)
  # The same math; XLA may fuse the recomputation differently: fp32 rounding only (~1e-7 per op).
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "remat grad"), g1, g2)


def _rms(x):
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def test_bf16_compute_close_to_fp32_with_fp32_params():
  params = models.init(CFG, 0)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 24))
  l32 = np.asarray(models.apply(CFG, params, ids))
  l16 = models.apply(CFG.replace(dtype="bfloat16"), params, ids)
  assert l16.dtype == jnp.float32  # logits always come back in fp32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  # bf16 keeps 8 significant bits: each rounding errs by up to u = 2^-8 relative. A dozen roundings
  # per layer (matmul inputs, activations) with random signs leave the logits off by ~1.3u of their
  # RMS (measured 1.2-1.3u over seeds). fp32 compute would differ by ~1e-7 (cross-CPU noise) and
  # fp16 (11 bits) by ~u/8, so above u/3 bf16 really ran; below 4u nothing worse than rounding.
  u = 2.0 ** -8
  rel = _rms(np.asarray(l16) - l32) / _rms(l32)
  assert u / 3 < rel < 4 * u, rel / u
  assert np.abs(np.asarray(l16) - l32).max() < 16 * u * _rms(l32)


def test_segments_do_not_attend_across_and_positions_restart():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(attention.attention_mask(seg))[0]
  assert mask[1, 0] and not mask[2, 1] and mask[4, 2] and not mask[5].any()
  assert not mask[0, 1]  # causal
  np.testing.assert_array_equal(models.default_positions(seg), [[0, 1, 0, 1, 2, 0]])
  # Changing segment 1's tokens leaves segment 2's logits unchanged (masked keys get weight 0
  # exactly; leakage would move logits by ~their own size).
  params = models.init(CFG, 0)
  a = jnp.asarray([[7, 8, 9, 10, 11, 0]])
  b = jnp.asarray([[70, 80, 9, 10, 11, 0]])
  la = models.forward(CFG, params, a, segment_ids_BxT=seg)
  lb = models.forward(CFG, params, b, segment_ids_BxT=seg)
  assert_close(la[0, 2:5], lb[0, 2:5], 1e-6, "segment 2 logits")
  assert np.abs(np.asarray(la[0, :2] - lb[0, :2])).max() > 1e-2  # segment 1 did change


def _hand_count_flops(e, f, l, h, k, d, v, seq_len):
  """Training FLOPs per token written out term by term (2 FLOPs per multiply-add, x3 for
  forward + backward); causal attention: a query sees (on average) seq_len / 2 keys."""
  q, kv, o = e * h * d, 2 * e * k * d, h * d * e
  mlp = 3 * e * f
  output = e * v  # tied or not, one [E, V] matmul; the input embedding is a gather
  scores_and_values = 2 * (h * d * seq_len / 2)  # QK^T and AV, multiply-adds per token per layer
  forward = 2 * (l * (q + kv + o + mlp + scores_and_values) + output)
  return 3 * forward


def test_flops_per_token_hand_count():
  llama8b = models.presets.get("llama-3.1-8b")
  want = _hand_count_flops(4096, 14336, 32, 32, 8, 128, 128256, 512)
  assert llama8b.flops_per_token(512) == want
  # The attention term alone: 3 x 2 x 2 x 32 layers x 32 heads x 128 x 512/2 per token.
  assert llama8b.flops_per_token(1024) - llama8b.flops_per_token(512) == 3 * 2 * 2 * 32 * 32 * 128 * 256
  # Tying shares the table but still costs one output matmul; untying adds no FLOPs (a lookup).
  assert llama8b.replace(tie_embeddings=True).flops_per_token(512) == want
  llama1b = models.presets.get("llama-3.2-1b")
  assert llama1b.tie_embeddings
  assert llama1b.flops_per_token(512) == _hand_count_flops(2048, 8192, 16, 32, 8, 64, 128256, 512)
  # q/k/v biases are elementwise adds, not matmul FLOPs.
  qwen = models.presets.get("qwen2.5-1.5b")
  assert qwen.qkv_bias
  assert qwen.flops_per_token(512) == _hand_count_flops(1536, 8960, 28, 12, 2, 128, 151936, 512)
  # At short rows the count approaches 6 x (params minus the input embedding and norms).
  assert 0.9 < llama8b.flops_per_token(1) / (6 * llama8b.num_params) < 1.0


def _shapes(jaxpr):
  """(shape, dtype) of every value computed in a jaxpr, nested ones (map, checkpoint) included."""
  for eqn in jaxpr.eqns:
    yield from ((tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars
                if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _shapes(sub)


def test_query_chunked_attention_equals_full_attention_for_any_length():
  t = 29  # not a multiple of the chunk: queries are padded to 32, sliced back
  params = models.init(CFG, 4)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, t)))
  seg = jnp.asarray([[0] * 5 + [1] * 24, [1] * 12 + [2] * 17])
  full_cfg, chunked_cfg = CFG.replace(attention_chunk=0), CFG.replace(attention_chunk=8)

  def loss(cfg, p):
    logits = models.forward(cfg, p, ids, segment_ids_BxT=seg)
    return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., 7])

  # Row by row the same math: fp32 rounding only (~1e-7 per op, a few hundred terms summed).
  (l_full, g_full) = jax.jit(jax.value_and_grad(functools.partial(loss, full_cfg)))(params)
  (l_chunk, g_chunk) = jax.jit(jax.value_and_grad(functools.partial(loss, chunked_cfg)))(params)
  assert_close(l_chunk, l_full, 1e-5, "loss")
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "grad"), g_chunk, g_full)
  real = np.asarray(seg) > 0
  forward = jax.jit(models.forward, static_argnums=0)
  assert_close(np.asarray(forward(chunked_cfg, params, ids, segment_ids_BxT=seg))[real],
                np.asarray(forward(full_cfg, params, ids, segment_ids_BxT=seg))[real],
                1e-5, "logits")

  # No [B, K, G, T, S] scores (nor any [.., >=T, S] block) in the forward or backward pass;
  # the unchunked model does form one (the check can fail).
  def score_sized(cfg):
    jaxpr = jax.make_jaxpr(jax.value_and_grad(functools.partial(loss, cfg)))(params).jaxpr
    return [s for s, dtype in _shapes(jaxpr)
            if jnp.issubdtype(dtype, jnp.floating) and len(s) >= 4 and s[-1] == t and s[-2] >= t]

  kv, g = CFG.num_kv_heads, CFG.num_heads // CFG.num_kv_heads
  assert (2, kv, g, t, t) in score_sized(full_cfg)
  assert score_sized(chunked_cfg) == []


def test_logit_softcap_is_applied_by_every_forward():
  """A family's final-logit soft-cap (Gemma-2 style: cap * tanh(logits / cap)) lives in the one
  LM head, so the plain forward, both cached forwards and the hidden-state path all apply it."""
  params = models.init(CFG, 0)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 10)))
  raw = np.asarray(models.forward(CFG, params, ids), np.float64)
  cap = float(np.abs(raw).max() / 2)  # small enough that the cap bends the largest logits
  want = cap * np.tanh(raw / cap)
  capped = CFG.replace(logit_softcap=cap)
  assert_close(np.asarray(models.forward(capped, params, ids)), want, 1e-5, "forward")
  seg = jnp.ones_like(ids)
  cached, _ = models.forward_with_cache(capped, params, ids, models.default_positions(seg), seg,
                                        models.init_cache(capped, 2, 16))
  assert_close(np.asarray(cached), want, 1e-5, "cached forward")
  per_layer, _ = models.forward_with_cache(
      capped, params, ids, models.default_positions(seg), seg,
      models.unstack_cache(models.init_cache(capped, 2, 16)), layers=models.unstack_layers(params))
  assert_close(np.asarray(per_layer), want, 1e-5, "cached forward, per-layer (decode loop)")
  hidden = models.forward_hidden(capped, params, ids, segment_ids_BxT=seg,
                                 positions_BxT=models.default_positions(seg))
  head = models.project_logits(hidden, models.output_kernel(capped, params), jnp.float32,
                               capped.logit_softcap)
  assert_close(np.asarray(head), want, 1e-5, "hidden @ head")
  assert np.abs(np.asarray(models.forward(capped, params, ids))).max() < cap
