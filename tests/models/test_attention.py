"""Attention kernels: causal query blocks and the one-query decode step equal one full softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentijax.models import attention
from tolerances import assert_close


def test_causal_blocks_equal_full_attention():
  """`attend_causal` (query blocks over the keys each can see) equals one full softmax on
  every query with a visible key, with and without a cache in front (S > T), including a block
  boundary inside a segment and a ragged last block."""
  rng = np.random.default_rng(0)
  b, t, k, g, d = 2, 300, 2, 2, 8
  q = jnp.asarray(rng.standard_normal((b, t, k, g, d)), jnp.float32)
  for cached in (0, 70):  # 70 cache slots in front of the queries (e.g. a shared prefix)
    s = t + cached
    keys = jnp.asarray(rng.standard_normal((b, s, k, d)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, s, k, d)), jnp.float32)
    seg_q = jnp.asarray(np.r_[[0] * 20 + [1] * 280, [1] * 130 + [2] * 170].reshape(2, t))
    seg_kv = jnp.concatenate([jnp.ones((b, cached), jnp.int32), seg_q], axis=1)
    mask = attention.attention_mask(seg_q, seg_kv, cached)
    full = jax.jit(attention.attend, static_argnums=4)(q, keys, values, mask, jnp.float32)
    blocks = jax.jit(attention.attend_causal, static_argnums=(4, 5))(q, keys, values, mask,
                                                                        jnp.float32, 64)
    seen = np.asarray(mask.any(-1))  # queries with at least one visible key
    # Masked keys weigh exactly 0 in both; only the sums' order differs (fp32, <= 370 terms).
    assert_close(np.asarray(blocks)[seen], np.asarray(full)[seen], 1e-5, f"cache {cached}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_query_attention_equals_full_attention(dtype):
  """`attend_one` (a decode step's query as multiply-and-sum) equals `attend` over a cache with
  masked slots (padding, another segment, the unfilled tail), in fp32 and with bf16 inputs."""
  rng = np.random.default_rng(1)
  b, s, k, g, d = 3, 40, 2, 3, 16
  dt = jnp.dtype(dtype)
  q = jnp.asarray(rng.standard_normal((b, 1, k, g, d)), dt)
  keys = jnp.asarray(rng.standard_normal((b, s, k, d)), dt)
  values = jnp.asarray(rng.standard_normal((b, s, k, d)), dt)
  seg_kv = np.ones((b, s), np.int32)
  seg_kv[0, :7] = 0  # left padding
  seg_kv[1, :12] = 2  # another segment
  seg_kv[:, 30:] = 0  # slots not written yet
  mask = attention.attention_mask(jnp.ones((b, 1), jnp.int32), jnp.asarray(seg_kv), 29)
  want = jax.jit(attention.attend, static_argnums=4)(q, keys, values, mask, dt)
  got = jax.jit(attention.attend_one, static_argnums=4)(q, keys, values, mask, dt)
  assert got.shape == want.shape and got.dtype == want.dtype
  # fp32: summation order only (measured 2e-7). bf16: both score in fp32 from the same bf16
  # inputs, but `attend` rounds the probabilities to bf16 and sums the values in bf16, and
  # `attend_one` does neither (measured 4.4e-3 of the largest output, ~2^-8 per rounding);
  # a mask that let every slot through would be off by ~0.8.
  assert_close(got, want, 1e-5 if dtype == "float32" else 2 ** -6, dtype)
