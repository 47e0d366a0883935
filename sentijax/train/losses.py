"""Token-level losses: next-token cross-entropy and logit distillation divergences.

All functions return per-token values [B, L] in float32 (or wider); callers weight and normalise
them, so the loss is a mean over completion tokens across microbatches and devices.

Divergences (P = teacher, Q = student, both over the same support; `divergence` is the one core):

  forward  KL(P || Q) = sum P (log P - log Q)     mass-covering
  reverse  KL(Q || P) = sum Q (log Q - log P)     mode-seeking
  jsd      JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

`jsd` follows TRL's `GKDTrainer.generalized_jsd_loss` (GKD, Agarwal et al. 2024, Eq. 1): the ends
are special-cased, beta = 0 IS forward KL and beta = 1 IS reverse KL. (The mixture formula itself
vanishes at both ends, JSD_beta ~ beta KL(P || Q) as beta -> 0 and ~ (1 - beta) KL(Q || P) as
beta -> 1, so the special cases are its rescaled limits.) beta = 0.5 is the symmetric
Jensen-Shannon divergence.

Supports: the full vocabulary (`kl_divergence`), the teacher's top-k tokens (`kl_divergence` with
`top_k`: both renormalised there) and a listed support (`soft_divergence`: ids and teacher
probabilities per position, e.g. verbalizers or an offline top-k store). Both sides are tempered
(logits / T; listed probabilities p^(1/T), renormalised) and the result is scaled by T^2 (Hinton
et al.). `chunked_loss_sums` computes CE and any of these from hidden states, chunk by chunk.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
KINDS = ("forward", "reverse", "jsd")
_NEG = -1e30  # a finite "minus infinity": masked entries get zero probability, no NaN gradients


@dataclasses.dataclass(frozen=True)
class Distill:
  """A distillation term (static under jit): loss = (1 - alpha) CE + alpha divergence.

  `top_k` (online teacher): 0 = full vocabulary, k = the teacher's k most likely tokens.
  `vocab`: logits of both models are cut to the first `vocab` ids (the shared tokenizer's length;
  extra embedding rows are padding); 0 = no cut. `weighted`: a listed-support term counts where
  the batch `weights` are (KD on response tokens); False = wherever a soft target is (ICLDist).
  """
  kind: str = "forward"
  alpha: float = 0.5
  beta: float = 0.5
  temperature: float = 1.0
  top_k: int = 0
  vocab: int = 0
  weighted: bool = True

  def __post_init__(self):
    checks = (("kind", self.kind in KINDS, f"expected one of {KINDS}"),
              ("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]"),
              ("beta", 0.0 <= self.beta <= 1.0, "must be in [0, 1]"),
              ("temperature", self.temperature > 0, "must be > 0"),
              ("top_k", self.top_k >= 0, "must be >= 0"),
              ("vocab", self.vocab >= 0, "must be >= 0"))
    for key, ok, why in checks:
      if not ok:
        raise ValueError(f"distillation {key}={getattr(self, key)!r}: {why}")


def cross_entropy(logits_BxLxV: Array, targets_BxL: Array) -> Array:
  """-log p(target) per token, computed in float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL


# --------------------------------------------------------------------------- divergences


def divergence(log_p_BxLxK: Array, log_q_BxLxK: Array, kind: str = "forward", beta: float = 0.5,
               mask_BxLxK: Array | None = None) -> Array:
  """Per-position divergence of teacher log-probs `log_p` and student log-probs `log_q`.

  Both are normalised over the last axis (entries outside `mask`, if given, are ignored and
  should hold a very negative log-prob). See the module docstring for the kinds and `beta`.
  """
  def kl(log_a, log_b):
    terms = jnp.exp(log_a) * (log_a - log_b)
    if mask_BxLxK is not None:
      terms = jnp.where(mask_BxLxK, terms, 0.0)
    return jnp.sum(terms, axis=-1)

  if kind == "jsd" and beta in (0.0, 1.0):  # TRL's convention: the KL forms at the ends
    kind = "forward" if beta == 0.0 else "reverse"
  if kind == "forward":
    return kl(log_p_BxLxK, log_q_BxLxK)
  if kind == "reverse":
    return kl(log_q_BxLxK, log_p_BxLxK)
  if kind == "jsd":
    log_m = jnp.logaddexp(log_p_BxLxK + jnp.log(beta), log_q_BxLxK + jnp.log1p(-beta))
    return beta * kl(log_p_BxLxK, log_m) + (1.0 - beta) * kl(log_q_BxLxK, log_m)
  raise ValueError(f"unknown divergence {kind!r}: use forward | reverse | jsd")


def kl_divergence(student_logits_BxLxV: Array, teacher_logits_BxLxV: Array, *,
                  kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                  top_k: int = 0) -> Array:
  """Per-token divergence of the next-token distributions over the full vocabulary, or with
  `top_k` over the teacher's k most likely tokens (both renormalised there). Tempered, x T^2."""
  s = student_logits_BxLxV.astype(jnp.float32) / temperature
  t = teacher_logits_BxLxV.astype(jnp.float32) / temperature
  if top_k:
    t, ids_BxLxK = jax.lax.top_k(t, top_k)
    s = jnp.take_along_axis(s, ids_BxLxK, axis=-1)
  return divergence(jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1), kind,
                    beta) * temperature**2


def soft_divergence(logits_BxLxV: Array, soft_ids_BxLxK: Array, soft_probs_BxLxK: Array, *,
                    kind: str = "forward", beta: float = 0.5, temperature: float = 1.0) -> Array:
  """Per-position divergence over a listed support (verbalizers, an offline top-k store).

  At each position the teacher gives probabilities `soft_probs` for tokens `soft_ids` (entries
  with probability 0 are padding; all zero = no soft target, divergence 0; they may sum to < 1).
  Both distributions are restricted to the listed tokens and renormalised there: the teacher
  tempered as p^(1/T), the student as softmax(logits[soft_ids] / T). Scaled by T^2.
  """
  dtype = jnp.promote_types(logits_BxLxV.dtype, jnp.float32)  # at least float32
  logits_BxLxK = jnp.take_along_axis(logits_BxLxV.astype(dtype), soft_ids_BxLxK, axis=-1)
  probs = soft_probs_BxLxK.astype(dtype)
  mask = probs > 0
  log_t = jnp.where(mask, jnp.log(jnp.where(mask, probs, 1.0)) / temperature, _NEG)
  log_t = log_t - jax.nn.logsumexp(log_t, axis=-1, keepdims=True)
  log_s = jax.nn.log_softmax(jnp.where(mask, logits_BxLxK / temperature, _NEG), axis=-1)
  div_BxL = divergence(log_t, log_s, kind, beta, mask)
  return jnp.where(mask.any(-1), div_BxL, 0.0) * temperature**2


def verbalizer_kl(logits_BxLxV: Array, soft_ids_BxLxK: Array, soft_probs_BxLxK: Array,
                  temperature: float = 1.0) -> Array:
  """KL(teacher || student) over a few listed tokens: `soft_divergence` of kind forward."""
  return soft_divergence(logits_BxLxV, soft_ids_BxLxK, soft_probs_BxLxK, temperature=temperature)


def distill_terms(student_logits_BxLxV: Array, distill: Distill, teacher_logits_BxLxV=None,
                  soft_ids_BxLxK=None, soft_probs_BxLxK=None) -> Array:
  """Per-position divergence of `distill` against an online teacher's logits or soft targets
  (exactly one given), logits cut to `distill.vocab` ids. Not yet weighted."""
  v = distill.vocab or None
  student = student_logits_BxLxV[..., :v]
  if teacher_logits_BxLxV is not None:
    if v is None and teacher_logits_BxLxV.shape[-1] != student.shape[-1]:
      raise ValueError(f"teacher logits have {teacher_logits_BxLxV.shape[-1]} ids, the student's "
                       f"{student.shape[-1]}: set Distill.vocab to the shared tokenizer's length")
    return kl_divergence(student, jax.lax.stop_gradient(teacher_logits_BxLxV[..., :v]),
                         kind=distill.kind, beta=distill.beta,
                         temperature=distill.temperature, top_k=distill.top_k)
  return soft_divergence(student, soft_ids_BxLxK, soft_probs_BxLxK, kind=distill.kind,
                         beta=distill.beta, temperature=distill.temperature)


# --------------------------------------------------------------------------- chunked


def chunked_cross_entropy_sum(hidden_BxTxE: Array, out_ExV: Array, targets_BxT: Array,
                              weights_BxT: Array, chunk: int) -> Array:
  """sum(weights * -log p(target)) without materialising the [B, T, V] logits.

  Scans over chunks of `chunk` positions (B stays sharded); each chunk's logits are recomputed
  in the backward pass (jax.checkpoint), so peak memory is [B, chunk, V] instead of [B, T, V]:
  8 x 256 x 128k fp32 = 1 GiB rather than 8.6 GiB at T = 2048 for a Llama-3 vocabulary.
  """
  return chunked_loss_sums(hidden_BxTxE, out_ExV, targets_BxT, weights_BxT, chunk)[0]


def chunked_loss_sums(hidden_BxTxE: Array, out_ExV: Array, targets_BxT: Array,
                      weights_BxT: Array, chunk: int, soft_ids_BxTxK: Array | None = None,
                      soft_probs_BxTxK: Array | None = None, temperature: float = 1.0, *,
                      distill: Distill | None = None, teacher_hidden_BxTxF: Array | None = None,
                      teacher_out_FxW: Array | None = None) -> tuple[Array, Array]:
  """(sum of weighted CE, sum of the distillation term) in chunks of positions (see above).

  The distillation term: with `teacher_hidden` / `teacher_out` (an online teacher, under
  stop_gradient) `distill` against the teacher's chunk logits, weighted; else with soft targets
  `distill` over the listed support (default: `verbalizer_kl` at `temperature`, unweighted);
  else 0. Student and teacher logits exist one [B, chunk, V] chunk at a time, both recomputed
  in the backward pass.
  """
  b, t, e = hidden_BxTxE.shape
  online = teacher_hidden_BxTxF is not None
  soft = soft_ids_BxTxK is not None and not online
  if soft and distill is None:
    distill = Distill(alpha=0.0, temperature=temperature, weighted=False)
  xs = {"h": hidden_BxTxE, "tgt": targets_BxT, "w": weights_BxT.astype(jnp.float32)}
  if online:
    xs["th"] = jax.lax.stop_gradient(teacher_hidden_BxTxF)
  elif soft:
    xs["sid"], xs["sp"] = soft_ids_BxTxK, soft_probs_BxTxK.astype(jnp.float32)
  pad = -t % chunk
  n = (t + pad) // chunk

  def to_chunks(x):  # [B, T, ...] -> [N, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  xs = {k: to_chunks(v) for k, v in xs.items()}
  out = out_ExV.astype(hidden_BxTxE.dtype)
  t_out = (jax.lax.stop_gradient(teacher_out_FxW).astype(teacher_hidden_BxTxF.dtype) if online
           else None)

  @jax.checkpoint
  def chunk_sum(totals, c):
    logits_BxCxV = jnp.einsum("bce,ev->bcv", c["h"], out, preferred_element_type=jnp.float32)
    nll = jnp.sum(cross_entropy(logits_BxCxV, c["tgt"]) * c["w"])
    if online:
      t_logits_BxCxW = jnp.einsum("bcf,fw->bcw", c["th"], t_out,
                                  preferred_element_type=jnp.float32)
      kd = jnp.sum(distill_terms(logits_BxCxV, distill, t_logits_BxCxW) * c["w"])
    elif soft:
      kd_BxC = distill_terms(logits_BxCxV, distill, soft_ids_BxLxK=c["sid"],
                             soft_probs_BxLxK=c["sp"])
      kd = jnp.sum(kd_BxC * c["w"] if distill.weighted else kd_BxC)
    else:
      kd = jnp.zeros((), jnp.float32)
    return (totals[0] + nll, totals[1] + kd), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, kd_sum), _ = jax.lax.scan(chunk_sum, (zero, zero), xs)
  return nll_sum, kd_sum
