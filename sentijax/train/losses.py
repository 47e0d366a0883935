"""Token-level losses: next-token cross-entropy and ONE distillation term (`Distill`).

All per-token functions return [B, L] values in float32 (or wider); callers weight and normalise
them, so the loss is a mean over completion tokens across microbatches and devices.

Divergences (P = teacher, Q = student, both over the same buckets; `divergence` is the one core):

  forward  KL(P || Q) = sum P (log P - log Q)     mass-covering
  reverse  KL(Q || P) = sum Q (log Q - log P)     mode-seeking
  jsd      JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

`jsd` follows TRL's `GKDTrainer.generalized_jsd_loss` (GKD, Agarwal et al. 2024, Eq. 1): the ends
are special-cased, beta = 0 IS forward KL and beta = 1 IS reverse KL. (The mixture formula itself
vanishes at both ends, JSD_beta ~ beta KL(P || Q) as beta -> 0 and ~ (1 - beta) KL(Q || P) as
beta -> 1, so the special cases are its rescaled limits.) beta = 0.5 is the symmetric
Jensen-Shannon divergence. Every form is tempered (logits / T) and scaled by T^2 (Hinton et al.).

Supports (`Distill.support`):
  full     the whole vocabulary (an online teacher's logits): exact.
  topk     the online teacher's k most likely tokens S, plus ONE tail bucket for every other token.
  listed   ids + teacher probabilities per position (an offline top-k store, ICLDist's
           verbalizers), plus the tail bucket ("any other token / answer").
  sampled  ids drawn from the tempered teacher with weights c_i / N and the teacher's log-probs of
           them: an unbiased estimate of the full-vocabulary forward KL (`sampled_kl`).
  served   a served teacher's log-probs of the student's samples ("teacher_logp"): the sampled-
           token reverse-KL estimator (`token_reverse_kl`) there, CE on corpus tokens elsewhere;
           with the teacher's top-N in the listed fields (teacher.top_logprobs), the sampled
           tokens' term is the estimator PLUS the listed bucketed reverse KL (N + 1 buckets).

The tail (`Distill.tail = "bucket"`, the default). The divergence is taken over k + 1 buckets:
p_i, q_i for i in S and p_tail = 1 - sum_S p, q_tail = 1 - sum_S q. The student's probabilities
come from its FULL softmax (its tail as the log-sum-exp of the logits outside S, never
1 - sum), so mass the student leaks outside S is charged. Temperature: the buckets are a
coarse-graining of the TEMPERED distributions. Online both sides are exact (p_T and q_T from the
full tempered softmaxes, then bucketed), so by the data-processing inequality every kind is
<= its full-vocabulary value at the same T, with equality when the tail is one token (k = V - 1).
Offline the store holds teacher probabilities at T = 1 (`soft_probs`; the tail is `soft_tail` if
given, else 1 - sum(soft_probs), floored at TAIL_FLOOR so reverse KL and JSD stay finite); at
T != 1 its tail is tempered AS ONE TOKEN (p_i^(1/T) and p_tail^(1/T), renormalised over the
k + 1 buckets) while the student's side stays exact. That is exact at T = 1 and when the tail is
one token; for T > 1 a tail spread over many tokens is under-weighted (sum_v p_v^(1/T) >=
p_tail^(1/T)), so the offline bound is approximate there (tests/train/test_losses.py shows both).

`tail = "renorm"` restricts BOTH distributions to S and renormalises them there: the form of
issue 12, kept only on explicit request. It is biased: a student that matches the teacher's shape
on S scores 0 however much mass it puts elsewhere, and with one token in S it is identically 0
(refused for top_k = 1).

`chunked_loss_sums` computes CE and the distillation term from hidden states, chunk by chunk (one
chunk = the unchunked case), through the one LM head `models.project_logits`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models

Array = jax.Array
KINDS = ("forward", "reverse", "jsd")
SUPPORTS = ("full", "topk", "listed", "sampled", "served")
TAILS = ("bucket", "renorm")
# Batch fields a listed / sampled support reads ([B, L, K]; soft_tail [B, L]):
#   soft_ids    int32  the listed (or drawn) token ids
#   soft_probs  float  listed: the teacher's probabilities at T = 1 (0 = padding, all 0 = no
#                      target); sampled: weights c_i / N (counts of the N draws; they sum to 1)
#   soft_tail   float  listed, optional: the teacher's mass outside the listed ids at T = 1
#   soft_logp   float  sampled: the teacher's log-probability of each id at the KD temperature
#   teacher_logp float served, [B, L]: the teacher's log-prob of each target "sampled" marks
SOFT_FIELDS = ("soft_ids", "soft_probs", "soft_tail", "soft_logp", "teacher_logp")
_NEG = -1e30  # a finite "minus infinity": masked entries get zero probability, no NaN gradients
# The smallest teacher tail mass an offline store is taken to mean: 1 - sum(fp32 probs) has
# rounding error of this order, so a smaller (or zero) tail is indistinguishable from it.
TAIL_FLOOR = float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class Distill:
  """The distillation term (static under jit): loss = (1 - alpha) CE + alpha divergence.

  `support` (module docstring): full | topk (`top_k` = k) need an online teacher; listed |
  sampled read the batch's soft fields (SOFT_FIELDS). `tail`: bucket (default) | renorm (biased,
  explicit request only). `vocab`: both models' logits are cut to the first `vocab` ids (the
  shared tokenizer's length; extra embedding rows are padding); 0 = no cut. `weighted`: the term
  counts where the batch `weights` are (KD on response tokens); False = wherever a soft target is
  (ICLDist).
  """
  kind: str = "forward"
  alpha: float = 0.5
  beta: float = 0.5
  temperature: float = 1.0
  support: str = "full"
  top_k: int = 0
  tail: str = "bucket"
  vocab: int = 0
  weighted: bool = True

  def __post_init__(self):
    checks = (("kind", self.kind in KINDS, f"expected one of {KINDS}"),
              ("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]"),
              ("beta", 0.0 <= self.beta <= 1.0, "must be in [0, 1]"),
              ("temperature", self.temperature > 0, "must be > 0"),
              ("support", self.support in SUPPORTS, f"expected one of {SUPPORTS}"),
              ("tail", self.tail in TAILS, f"expected one of {TAILS}"),
              ("top_k", self.top_k >= 0, "must be >= 0"),
              ("top_k", (self.top_k > 0) == (self.support == "topk"),
               "> 0 exactly when support='topk' (the online teacher's k most likely tokens)"),
              ("top_k", not (self.top_k == 1 and self.tail == "renorm"),
               "with tail='renorm' one token renormalised is probability 1 on both sides: the "
               "divergence is identically 0. Use tail='bucket' or top_k >= 2"),
              ("kind", self.support != "sampled" or self.kind == "forward",
               "support='sampled' estimates forward KL only (draws come from the teacher)"),
              ("kind", self.support != "served" or (self.kind, self.temperature) == ("reverse", 1),
               "support='served' estimates reverse KL at T = 1 from the student's samples"),
              ("vocab", self.vocab >= 0, "must be >= 0"))
    for key, ok, why in checks:
      if not ok:
        raise ValueError(f"distillation {key}={getattr(self, key)!r}: {why}")

  @property
  def online(self) -> bool:
    """True when the term needs the teacher's logits (support full / topk)."""
    return self.support in ("full", "topk")

  @property
  def sparse(self) -> bool:
    """True when the teacher's support is a subset (its student mass is worth logging)."""
    return self.support in ("topk", "listed", "sampled")


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


def _support_mask(ids_BxLxK: Array, valid_BxLxK: Array, vocab: int) -> Array:
  """[B, L, V] bool: the listed ids (padding entries dropped)."""
  b, l, _ = ids_BxLxK.shape
  ids = jnp.where(valid_BxLxK, ids_BxLxK, vocab)  # out of range: dropped by the scatter
  return jnp.zeros((b, l, vocab), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(l)[None, :, None], ids].set(True, mode="drop")


def _buckets(logits_BxLxV: Array, ids_BxLxK: Array, in_s_BxLxV: Array) -> tuple[Array, Array]:
  """(log-probs at the ids [B, L, K], log-mass of the tokens outside the support [B, L]) of
  softmax(logits): the tail as the log-sum-exp of the logits outside, exact however small."""
  log_z_BxLx1 = jax.nn.logsumexp(logits_BxLxV, axis=-1, keepdims=True)
  at_s = jnp.take_along_axis(logits_BxLxV, ids_BxLxK, axis=-1) - log_z_BxLx1
  tail = jax.nn.logsumexp(jnp.where(in_s_BxLxV, _NEG, logits_BxLxV), axis=-1) - log_z_BxLx1[..., 0]
  return at_s, tail


def _bucket_divergence(log_p_s, log_p_tail, log_q_s, log_q_tail, valid_BxLxK, has_tail_BxL,
                       kind: str, beta: float) -> Array:
  """`divergence` over the k listed buckets (where valid) and the tail bucket (where it has
  tokens)."""
  mask = jnp.concatenate([valid_BxLxK, has_tail_BxL[..., None]], axis=-1)
  log_p = jnp.where(mask, jnp.concatenate([log_p_s, log_p_tail[..., None]], -1), _NEG)
  log_q = jnp.where(mask, jnp.concatenate([log_q_s, log_q_tail[..., None]], -1), _NEG)
  return divergence(log_p, log_q, kind, beta, mask)


def _online(s_BxLxV: Array, t_BxLxV: Array, d: Distill) -> tuple[Array, Array | None]:
  """(per-position divergence of tempered logits, x T^2; the teacher's top-k ids or None)."""
  t2 = d.temperature**2
  s = s_BxLxV.astype(jnp.float32) / d.temperature
  t = t_BxLxV.astype(jnp.float32) / d.temperature
  if not d.top_k:
    full = divergence(jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1), d.kind, d.beta)
    return full * t2, None
  t_top, ids_BxLxK = jax.lax.top_k(t, d.top_k)
  if d.tail == "renorm":
    s_top = jnp.take_along_axis(s, ids_BxLxK, axis=-1)
    return divergence(jax.nn.log_softmax(t_top, -1), jax.nn.log_softmax(s_top, -1), d.kind,
                      d.beta) * t2, ids_BxLxK
  del t_top
  valid = jnp.ones(ids_BxLxK.shape, bool)
  in_s = _support_mask(ids_BxLxK, valid, t.shape[-1])
  has_tail = jnp.full(ids_BxLxK.shape[:-1], d.top_k < t.shape[-1])
  div = _bucket_divergence(*_buckets(t, ids_BxLxK, in_s), *_buckets(s, ids_BxLxK, in_s), valid,
                           has_tail, d.kind, d.beta)
  return div * t2, ids_BxLxK


def kl_divergence(student_logits_BxLxV: Array, teacher_logits_BxLxV: Array, *,
                  kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                  top_k: int = 0, tail: str = "bucket") -> Array:
  """Per-token divergence of the tempered next-token distributions (x T^2): over the full
  vocabulary, or with `top_k` over the teacher's k most likely tokens + the tail bucket (`tail`:
  bucket | renorm, see the module docstring)."""
  d = Distill(kind=kind, beta=beta, temperature=temperature, top_k=top_k, tail=tail,
              support="topk" if top_k else "full")
  return _online(student_logits_BxLxV, teacher_logits_BxLxV, d)[0]


def soft_divergence(logits_BxLxV: Array, soft_ids_BxLxK: Array, soft_probs_BxLxK: Array, *,
                    kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                    tail: str = "bucket", soft_tail_BxL: Array | None = None) -> Array:
  """Per-position divergence over a listed support (an offline top-k store, verbalizers).

  At each position the teacher gives probabilities `soft_probs` (at T = 1) for the distinct tokens
  `soft_ids` (entries with probability 0 are padding; all zero = no soft target, divergence 0).
  bucket: + one tail bucket, the teacher's `soft_tail` (default 1 - sum soft_probs, floored at
  TAIL_FLOOR) against the student's full-softmax mass outside the ids; the teacher's k + 1
  buckets tempered as p^(1/T) and renormalised, the student's from softmax(logits / T).
  renorm: both restricted to the ids and renormalised there (biased). Scaled by T^2.
  """
  dtype = jnp.promote_types(logits_BxLxV.dtype, jnp.float32)  # at least float32
  s = logits_BxLxV.astype(dtype) / temperature
  probs = soft_probs_BxLxK.astype(dtype)
  valid = probs > 0
  log_p_s = jnp.where(valid, jnp.log(jnp.where(valid, probs, 1.0)), _NEG)
  if tail == "renorm":
    log_t = jnp.where(valid, log_p_s / temperature, _NEG)
    log_t = log_t - jax.nn.logsumexp(log_t, axis=-1, keepdims=True)
    s_at = jnp.take_along_axis(s, soft_ids_BxLxK, axis=-1)
    log_s = jax.nn.log_softmax(jnp.where(valid, s_at, _NEG), axis=-1)
    div = divergence(log_t, log_s, kind, beta, valid)
  elif tail == "bucket":
    in_s = _support_mask(soft_ids_BxLxK, valid, s.shape[-1])
    has_tail = ~jnp.all(in_s, axis=-1)
    p_tail = (1.0 - jnp.sum(probs, -1) if soft_tail_BxL is None
              else soft_tail_BxL.astype(dtype))
    log_p_tail = jnp.log(jnp.maximum(p_tail, TAIL_FLOOR))
    mask = jnp.concatenate([valid, has_tail[..., None]], axis=-1)
    log_t = jnp.where(mask, jnp.concatenate([log_p_s, log_p_tail[..., None]], -1) / temperature,
                      _NEG)
    log_t = log_t - jax.nn.logsumexp(log_t, axis=-1, keepdims=True)  # tail tempered as one token
    log_q_s, log_q_tail = _buckets(s, soft_ids_BxLxK, in_s)
    div = _bucket_divergence(log_t[..., :-1], log_t[..., -1], log_q_s, log_q_tail, valid,
                             has_tail, kind, beta)
  else:
    raise ValueError(f"tail={tail!r}: expected one of {TAILS}")
  return jnp.where(valid.any(-1), div, 0.0) * temperature**2


def sampled_kl(logits_BxLxV: Array, soft_ids_BxLxN: Array, weights_BxLxN: Array,
               teacher_logp_BxLxN: Array, temperature: float = 1.0) -> Array:
  """Per-position unbiased estimate of T^2 KL(p_T || q_T) from tokens drawn from the teacher.

  `soft_ids` were drawn from the teacher's tempered distribution p_T (N draws; the distinct ids
  with weights c_i / N, 0 = padding, all 0 = no target) and `teacher_logp` holds log p_T of each.
  sum_i w_i (log p_T(x_i) - log q_T(x_i)) has expectation KL(p_T || q_T) (Anshumann et al. 2025,
  "Sparse Logit Sampling"); its gradient, -sum_i w_i grad log q_T(x_i), is unbiased for the KL's.
  """
  dtype = jnp.promote_types(logits_BxLxV.dtype, jnp.float32)
  log_q = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV.astype(dtype) / temperature, -1),
                              soft_ids_BxLxN, axis=-1)
  w = weights_BxLxN.astype(dtype)
  terms = jnp.where(w > 0, w * (teacher_logp_BxLxN.astype(dtype) - log_q), 0.0)
  return jnp.sum(terms, -1) * temperature**2


def token_reverse_kl(logits_BxLxV: Array, tokens_BxL: Array, teacher_logp_BxL: Array
                     ) -> tuple[Array, Array]:
  """The sampled-token reverse-KL estimator (on-policy distillation, tinker-cookbook style).

  `tokens` were drawn from the student q (softmax of `logits`), `teacher_logp` holds the
  teacher's log p of each. Per token the estimate is a = log q(x) - log p(x) (its expectation
  under q is KL(q || p)); the returned surrogate has the VALUE a and the GRADIENT
  stop_gradient(a) * grad log q(x), the policy gradient with advantage -a and no reward (its
  expectation is grad KL(q || p): E_q[grad log q] = 0). Returns (surrogate, estimate), [B, L].
  """
  dtype = jnp.promote_types(logits_BxLxV.dtype, jnp.float32)
  log_q = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV.astype(dtype), -1),
                              tokens_BxL[..., None], axis=-1)[..., 0]
  adv = jax.lax.stop_gradient(log_q - teacher_logp_BxL.astype(dtype))
  return adv + adv * (log_q - jax.lax.stop_gradient(log_q)), adv


def support_mass(logits_BxLxV: Array, ids_BxLxK: Array, valid_BxLxK: Array) -> Array:
  """The student's probability (T = 1) on the distinct listed ids: what its loss can see."""
  logits = logits_BxLxV.astype(jnp.float32)
  at = jnp.where(valid_BxLxK, jnp.take_along_axis(logits, ids_BxLxK, axis=-1), _NEG)
  return jnp.exp(jax.nn.logsumexp(at, -1) - jax.nn.logsumexp(logits, -1))


def distill_terms(student_logits_BxLxV: Array, distill: Distill, teacher_logits_BxLxV=None,
                  soft: Mapping[str, Array] | None = None, tokens_BxL=None) -> dict[str, Array]:
  """Per-position {"kd": the divergence of `distill`, "has": a target here; sparse supports
  also "mass": the student's probability on the teacher's support}, logits cut to
  `distill.vocab` ids. The one place the supports branch (served: CE on `tokens`, the targets;
  chunked_loss_sums puts the estimator on the samples). Not weighted."""
  d, v = distill, distill.vocab or None
  student = student_logits_BxLxV[..., :v]
  if d.support == "served":
    ce = cross_entropy(student, tokens_BxL)
    out = {"kd": ce, "has": jnp.ones(ce.shape, bool)}
    if "soft_ids" in (soft or {}):  # the teacher's top-N + tail (teacher.top_logprobs)
      out["listed"] = soft_divergence(student, soft["soft_ids"], soft["soft_probs"], kind=d.kind,
                                      tail="bucket", soft_tail_BxL=soft.get("soft_tail"))
    return out
  if d.online:
    if teacher_logits_BxLxV is None:
      raise ValueError(f"Distill(support={d.support!r}) needs an online teacher's logits")
    if v is None and teacher_logits_BxLxV.shape[-1] != student.shape[-1]:
      raise ValueError(f"teacher logits have {teacher_logits_BxLxV.shape[-1]} ids, the student's "
                       f"{student.shape[-1]}: set Distill.vocab to the shared tokenizer's length")
    kd, ids = _online(student, jax.lax.stop_gradient(teacher_logits_BxLxV[..., :v]), d)
    if ids is None:
      return {"kd": kd, "has": jnp.ones(kd.shape, bool)}
    valid = jnp.ones(ids.shape, bool)
  else:
    missing = [k for k in ("soft_ids", "soft_probs") + (("soft_logp",) if d.support == "sampled"
                                                         else ()) if k not in (soft or {})]
    if missing:
      raise ValueError(f"Distill(support={d.support!r}) reads the batch fields {missing}, which "
                       "this batch lacks (an offline store / soft targets build them)")
    ids, probs = soft["soft_ids"], soft["soft_probs"]
    valid = probs > 0
    if d.support == "listed":
      kd = soft_divergence(student, ids, probs, kind=d.kind, beta=d.beta,
                           temperature=d.temperature, tail=d.tail,
                           soft_tail_BxL=soft.get("soft_tail"))
    else:
      kd = sampled_kl(student, ids, probs, soft["soft_logp"], d.temperature)
  return {"kd": kd, "has": valid.any(-1), "mass": support_mass(student, ids, valid)}


# --------------------------------------------------------------------------- chunked


class Head(NamedTuple):
  """What the one LM head (`models.project_logits`) turns into logits: final hidden states, the
  output kernel and the model's logit soft-cap (0 = none)."""
  hidden_BxTxE: Array
  out_ExV: Array
  softcap: float = 0.0


def _position_inputs(student: Head, targets_BxT: Array, weights_BxT: Array,
                     distill: Distill | None, soft: Mapping[str, Array] | None,
                     teacher: Head | None, sampled_BxT: Array | None) -> dict[str, Array]:
  """chunked_loss_sums' [B, T, ...] inputs by short name (h, tgt, w; th: the online teacher's
  hidden states; the soft fields; s: sampled), checked against what `distill` reads."""
  xs = {"h": student.hidden_BxTxE, "tgt": targets_BxT, "w": weights_BxT.astype(jnp.float32)}
  if (distill is not None and distill.support == "served"
      and (sampled_BxT is None or "teacher_logp" not in (soft or {}))):
    raise ValueError("Distill(support='served') reads the batch fields 'sampled' and "
                     "'teacher_logp' (on-policy rows a served teacher scored: train/served.py)")
  if distill is not None and distill.online:
    if teacher is None:
      raise ValueError(f"Distill(support={distill.support!r}) needs the online teacher's hidden "
                       "states and output kernel")
    xs["th"] = jax.lax.stop_gradient(teacher.hidden_BxTxE)
  elif distill is not None:
    xs |= {k: v for k, v in (soft or {}).items() if k in SOFT_FIELDS}
  if sampled_BxT is not None:
    xs["s"] = sampled_BxT.astype(jnp.float32)
  return xs


def chunked_loss_sums(student: Head, targets_BxT: Array, weights_BxT: Array, chunk: int = 0, *,
                      distill: Distill | None = None, soft: Mapping[str, Array] | None = None,
                      teacher: Head | None = None, sampled_BxT: Array | None = None,
                      token_estimator: bool = False) -> dict[str, Array]:
  """Sums over the batch: {"ce": weighted CE, "kd": the distillation term (0 without
  `distill`)}, and for sparse supports "support_mass" / "support_tokens" (the student's mass on
  the teacher's support, summed where the term counts, and that count).

  `chunk` > 0: a scan over chunks of that many positions (B stays sharded), each chunk's logits
  recomputed in the backward pass (jax.checkpoint), so peak memory is [B, chunk, V] instead of
  [B, T, V]: 8 x 256 x 128k fp32 = 1 GiB rather than 8.6 GiB at T = 2048 for a Llama-3
  vocabulary. 0 (or >= T): one chunk, no recompute. The distillation term: `distill` against the
  online `teacher`'s chunk logits (under stop_gradient) or the
  `soft` fields (SOFT_FIELDS, [B, T, ...]); weighted by `weights` unless `distill.weighted` is
  False (then wherever a soft target is).

  `sampled` (on-policy rows, 1 where the target is a token the student sampled itself): no CE
  there (a student's own sample is no target), and with an online or served teacher "rkl_token"
  / "sampled_tokens": the sum of `token_reverse_kl`'s estimate log q(x) - log p(x) over them.
  `token_estimator` (always, served): there the distillation term IS that estimator's surrogate
  (a policy gradient on the sampled token only) instead of `distill`'s divergence; served with
  the listed fields too (a top-N served teacher), that surrogate plus the bucketed reverse KL.
  """
  hidden_BxTxE = student.hidden_BxTxE
  b, t, _ = hidden_BxTxE.shape
  chunk = min(chunk or t, t)
  xs = _position_inputs(student, targets_BxT, weights_BxT, distill, soft, teacher, sampled_BxT)
  online = distill is not None and distill.online
  served = distill is not None and distill.support == "served"
  pad = -t % chunk
  n = (t + pad) // chunk

  def to_chunks(x):  # [B, T, ...] -> [N, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  t_out = (jax.lax.stop_gradient(teacher.out_ExV).astype(teacher.hidden_BxTxE.dtype) if online
           else None)

  def chunk_sums(c):
    logits_BxCxV = models.project_logits(c["h"], student.out_ExV, hidden_BxTxE.dtype,
                                         student.softcap)
    ce_w = c["w"] * (1.0 - c["s"]) if "s" in c else c["w"]
    sums = {"ce": jnp.sum(cross_entropy(logits_BxCxV, c["tgt"]) * ce_w),
            "kd": jnp.zeros((), jnp.float32)}
    if distill is None:
      return sums
    t_logits = (models.project_logits(c["th"], t_out, t_out.dtype, teacher.softcap) if online
                else None)
    if (online or served) and "s" in c:
      v = distill.vocab or None
      t_logp = c["teacher_logp"] if served else jnp.take_along_axis(
          jax.nn.log_softmax(t_logits[..., :v].astype(jnp.float32), -1), c["tgt"][..., None],
          axis=-1)[..., 0]
      surrogate, est = token_reverse_kl(logits_BxCxV[..., :v], c["tgt"], t_logp)
      sums |= {"rkl_token": jnp.sum(est * c["s"]), "sampled_tokens": jnp.sum(c["s"])}
    terms = distill_terms(logits_BxCxV, distill, t_logits,
                          {k: v for k, v in c.items() if k in SOFT_FIELDS}, c["tgt"])
    if (token_estimator or served) and "s" in c:
      on_samples = surrogate + terms["listed"] if "listed" in terms else surrogate
      terms = {**terms, "kd": jnp.where(c["s"] > 0, on_samples, terms["kd"])}
    w_BxC = c["w"] if distill.weighted else terms["has"].astype(jnp.float32)
    sums["kd"] = jnp.sum(terms["kd"] * w_BxC)
    if "mass" in terms:
      counted = w_BxC * terms["has"]
      sums |= {"support_mass": jnp.sum(terms["mass"] * counted),
               "support_tokens": jnp.sum(counted)}
    return sums

  if n == 1:
    return chunk_sums(xs)
  chunks = {k: to_chunks(v) for k, v in xs.items()}
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(chunk_sums, jax.tree.map(lambda x: x[0], chunks)))
  body = jax.checkpoint(lambda totals, c: (jax.tree.map(jnp.add, totals, chunk_sums(c)), None))
  return jax.lax.scan(body, zeros, chunks)[0]
