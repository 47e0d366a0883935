"""One Flax decoder for every model family (families.py: Llama-3.x, Qwen2/2.5, Mistral).

All are pre-norm decoders with RMSNorm, rotary position embeddings, grouped-query attention and a
SwiGLU MLP. They differ only in the knobs of `ModelConfig`: Qwen2 adds biases to q/k/v and uses a
large plain rope_theta; Llama 3.1/3.2 rescale the rotary frequencies ("llama3" rope) and 3.2-1B/3B
tie the output projection to the input embedding; a family with a final-logit soft-cap sets
`logit_softcap`, applied in the one LM head `project_logits`.

Layers are stacked with `nn.scan` (one compiled layer body, fast compiles for 80-layer models); every
parameter carries logical axis names (`sentijax.sharding` maps them to mesh axes). Parameters are
plain pytrees: `{"embed": ..., "layers": ..., "final_norm": ..., ["lm_head": ...]}`.

Attention masking is uniform for training, scoring and decoding (`attention.attention_mask`): a
query attends to a key slot when the key is at or before it, both carry the same non-zero segment
id. Packed rows use segment ids 1..k, padding is 0, a plain batch uses `attention_mask` as
segment ids. Cached prefill and decode steps: `kv_cache.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sentijax.models import attention, families

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style frequency scaling (`rope_type == "llama3"`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder. Hashable: jit treats it as static."""
  architecture: str  # a families.FAMILIES key: "llama" | "qwen2" | "mistral"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma-2 style); 0 = none
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False
  attention_chunk: int = 1024  # query block size for long sequences (0 = whole sequence)

  def __post_init__(self):
    families.get(self.architecture)  # ValueError naming the supported families
    if self.logit_softcap < 0:
      raise ValueError(f"logit_softcap={self.logit_softcap} must be >= 0 (0 = no soft-cap)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    e, f, l, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
    attn = e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * e * f + 2 * e
    return v * e * (1 if self.tie_embeddings else 2) + l * per_layer + e

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of a causal row of `seq_len` (forward + backward = 3x forward).

    Forward: 2 FLOPs per multiply-add of every weight matrix (q/k/v/o, gate/up/down, the output
    projection; the input embedding is a lookup, biases and norms are elementwise and not
    counted), plus QK^T and AV: 2 * 2 * heads * head_dim per attended key, a query attending
    seq_len / 2 keys on average under the causal mask.
    """
    e, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    weights = l * (e * d * (2 * h + 2 * k) + 3 * e * f) + e * self.vocab_size
    attn = l * (2 * 2 * h * d) * seq_len // 2  # = 2 * l * h * d * seq_len, exact
    return float(3 * (2 * weights + attn))


# --------------------------------------------------------------------------------------------
# Rotary position embeddings.


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] in float32, incl. llama3 scaling (as transformers)."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  inv_freq = inv_freq.astype(np.float32)
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxD: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
  freqs_BxTxH = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb_BxTxD = jnp.concatenate([freqs_BxTxH, freqs_BxTxH], axis=-1)
  cos, sin = jnp.cos(emb_BxTxD)[:, :, None, :], jnp.sin(emb_BxTxD)[:, :, None, :]
  x = x_BxTxNxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxNxD.dtype)


# --------------------------------------------------------------------------------------------
# Modules.


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _act(x: Array, *axes: str) -> Array:
  """Activation sharding by logical axes: a no-op outside `sharding.logical_context`."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                   self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, cache_kv, cache_index):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nn.initializers.normal(0.02)

    q_kernel = _param(self, "q_kernel", init, (e, h, d), ("embed", "heads", "head_dim"), pdt)
    k_kernel = _param(self, "k_kernel", init, (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
    v_kernel = _param(self, "v_kernel", init, (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
    o_kernel = _param(self, "o_kernel", init, (h, d, e), ("heads", "head_dim", "embed"), pdt)
    x = x_BxTxE.astype(dt)
    q_BxTxHxD = jnp.einsum("bte,ehd->bthd", x, q_kernel.astype(dt))
    k_BxTxKxD = jnp.einsum("bte,ekd->btkd", x, k_kernel.astype(dt))
    v_BxTxKxD = jnp.einsum("bte,ekd->btkd", x, v_kernel.astype(dt))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxHxD += _param(self, "q_bias", zeros, (h, d), ("heads", "head_dim"), pdt).astype(dt)
      k_BxTxKxD += _param(self, "k_bias", zeros, (k, d), ("kv_heads", "head_dim"), pdt).astype(dt)
      v_BxTxKxD += _param(self, "v_bias", zeros, (k, d), ("kv_heads", "head_dim"), pdt).astype(dt)
    inv_freq = rope_inv_freq(cfg)
    q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, inv_freq)
    k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, inv_freq)
    q_BxTxHxD = _act(q_BxTxHxD, "batch", "length", "heads", "head_dim")
    k_BxTxKxD = _act(k_BxTxKxD, "batch", "length", "kv_heads", "head_dim")
    v_BxTxKxD = _act(v_BxTxKxD, "batch", "length", "kv_heads", "head_dim")

    new_cache_kv = None
    if cache_kv is not None:  # write this chunk into the cache, attend over all slots
      cache_k, cache_v = cache_kv
      start = (0, cache_index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k_BxTxKxD.astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v_BxTxKxD.astype(cache_v.dtype), start)
      new_cache_kv = (cache_k, cache_v)
      k_BxSxKxD, v_BxSxKxD = cache_k.astype(dt), cache_v.astype(dt)
    else:
      k_BxSxKxD, v_BxSxKxD = k_BxTxKxD, v_BxTxKxD

    b, t = q_BxTxHxD.shape[:2]
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k, h // k, d)
    chunk = cfg.attention_chunk
    block = min(attention.CAUSAL_BLOCK, chunk) if chunk else attention.CAUSAL_BLOCK
    if t > block:
      # Query blocks, each over the keys it can see; past `attention_chunk` each block is
      # recomputed in the backward pass (peak score memory [B, H, block, S], not [B, H, T, S]).
      out_BxTxKxGxD = attention.attend_causal(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS,
                                              dt, block, remat=bool(chunk) and t > chunk)
    elif t == 1 and jax.default_backend() == "cpu":
      out_BxTxKxGxD = attention.attend_one(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, dt)
    else:
      out_BxTxKxGxD = attention.attend(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, dt)
    out_BxTxE = jnp.einsum("bthd,hde->bte", out_BxTxKxGxD.reshape(b, t, h, d),
                           o_kernel.astype(dt))
    return out_BxTxE, new_cache_kv


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, f = cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(0.02)
    gate = _param(self, "gate_kernel", init, (e, f), ("embed", "mlp"), pdt).astype(dt)
    up = _param(self, "up_kernel", init, (e, f), ("embed", "mlp"), pdt).astype(dt)
    down = _param(self, "down_kernel", init, (f, e), ("mlp", "embed"), pdt).astype(dt)
    x = x_BxTxE.astype(dt)
    h_BxTxF = _act(jax.nn.silu(x @ gate) * (x @ up), "batch", "length", "mlp")
    return h_BxTxF @ down


class Block(nn.Module):
  """One decoder layer; the scan body (carry = hidden states, scanned = this layer's cache)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, cache_index, cache_kv):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, pdt, name="input_norm")(x_BxTxE)
    attn_out, new_cache_kv = Attention(cfg, name="attn")(h, positions_BxT, mask_BxTxS, cache_kv,
                                                          cache_index)
    x_BxTxE = x_BxTxE + attn_out
    h = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attn_norm")(x_BxTxE)
    x_BxTxE = x_BxTxE + MLP(cfg, name="mlp")(h)
    return _act(x_BxTxE, "batch", "length", "embed"), new_cache_kv


class Decoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, mask_BxTxS, cache_index=0, cache_kv=None,
               last_only=False, return_hidden=False):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embedding_VxE = _param(self, "embedding", nn.initializers.normal(0.02),
                           (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
    x_BxTxE = embed_tokens(embedding_VxE, tokens_BxT, dt)

    block = Block
    if cfg.remat:
      block = nn.remat(Block, prevent_cse=False,
                       policy=jax.checkpoint_policies.nothing_saveable)
    layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    x_BxTxE, new_cache_kv = layers(x_BxTxE, positions_BxT, mask_BxTxS, cache_index, cache_kv)

    if last_only:  # scoring/prefill need only the last position: skip the [B, T, V] logits
      x_BxTxE = x_BxTxE[:, -1:]
    x_BxTxE = RMSNorm(cfg.rms_norm_eps, pdt, name="final_norm")(x_BxTxE)
    if return_hidden:  # the caller applies output_kernel() itself (chunked loss)
      return x_BxTxE, new_cache_kv
    if cfg.tie_embeddings:
      out_ExV = embedding_VxE.T
    else:
      out_ExV = _param(self, "lm_head", nn.initializers.normal(0.02),
                       (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)
    return project_logits(x_BxTxE, out_ExV, dt, cfg.logit_softcap), new_cache_kv


def embed_tokens(embedding_VxE: Array, tokens_BxT: Array, dt) -> Array:
  """The input embeddings [B, T, E] in the compute dtype (batch-sharded activations)."""
  return _act(jnp.take(embedding_VxE, tokens_BxT, axis=0).astype(dt), "batch", "length", "embed")


def project_logits(x_BxTxE: Array, out_ExV: Array, dt, softcap: float = 0.0) -> Array:
  """Float32 logits [B, T, V] of final-normed hidden states: THE LM head (the decoder, the
  cached forward, the chunked losses and the top-k teacher all project through it; `dt` = the
  compute dtype; `softcap` = the model's `logit_softcap`, > 0: cap * tanh(logits / cap))."""
  logits_BxTxV = jnp.einsum("bte,ev->btv", x_BxTxE, out_ExV.astype(dt),
                            preferred_element_type=jnp.float32)
  if softcap > 0:
    logits_BxTxV = softcap * jnp.tanh(logits_BxTxV / softcap)
  return logits_BxTxV


# --------------------------------------------------------------------------------------------
# Functional API over plain param pytrees.


def default_positions(segment_ids_BxT: Array) -> Array:
  """Position of each token within its (contiguous) segment; padding gets 0.

  Left padding starts the text at position 0; packed rows restart at 0 per segment.
  """
  t = segment_ids_BxT.shape[1]
  idx_BxT = jnp.broadcast_to(jnp.arange(t), segment_ids_BxT.shape)
  prev_BxT = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start_BxT = jax.lax.cummax(jnp.where(segment_ids_BxT != prev_BxT, idx_BxT, 0), axis=1)
  return jnp.where(segment_ids_BxT != 0, idx_BxT - start_BxT, 0).astype(jnp.int32)


def init_params(cfg: ModelConfig, rng: Array) -> PyTree:
  """Random params (plain arrays, param_dtype)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Decoder(cfg).init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool))
  return nn.meta.unbox(variables["params"])


def logical_axes(cfg: ModelConfig) -> PyTree:
  """Pytree of logical PartitionSpecs with the structure of the params."""
  def init():
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init(jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool))
  abstract = jax.eval_shape(init)
  return nn.get_partition_spec(abstract)["params"]


def param_shapes(cfg: ModelConfig) -> PyTree:
  return jax.eval_shape(lambda rng: init_params(cfg, rng), jax.random.key(0))


def forward(cfg: ModelConfig, params: PyTree, tokens_BxT: Array, *,
            segment_ids_BxT: Array | None = None, positions_BxT: Array | None = None,
            last_only: bool = False) -> Array:
  """Float32 logits [B, T, V] (or [B, 1, V] with last_only) for a batch without cache."""
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones_like(tokens_BxT, dtype=jnp.int32)
  if positions_BxT is None:
    positions_BxT = default_positions(segment_ids_BxT)
  mask_BxTxS = attention.attention_mask(segment_ids_BxT)
  logits, _ = Decoder(cfg).apply({"params": params}, tokens_BxT, positions_BxT, mask_BxTxS,
                                 last_only=last_only)
  return logits


def forward_hidden(cfg: ModelConfig, params: PyTree, tokens_BxT: Array, *,
                   segment_ids_BxT: Array, positions_BxT: Array) -> Array:
  """Final-normed hidden states [B, T, E] (compute dtype): logits = hidden @ output_kernel."""
  mask_BxTxS = attention.attention_mask(segment_ids_BxT)
  hidden, _ = Decoder(cfg).apply({"params": params}, tokens_BxT, positions_BxT, mask_BxTxS,
                                 return_hidden=True)
  return hidden


def output_kernel(cfg: ModelConfig, params: PyTree) -> Array:
  """The [E, V] output projection (the embedding table, transposed, when tied)."""
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
