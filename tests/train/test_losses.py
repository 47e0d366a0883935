"""Distillation divergences against float64 numpy, their ends and limits, top-k and listed
supports, vocabulary cuts, and the chunked online-teacher loss against the unchunked one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentijax import models
from sentijax.train import losses, step
from tolerances import RTOL, assert_trees_close

EPS32 = float(np.finfo(np.float32).eps)


def _softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _ref(s_logits, t_logits, kind, beta=0.5, temperature=1.0, top_k=0):
  """float64 reference: GKD's definitions written out, top-k by sorting."""
  s, t = s_logits.astype(np.float64) / temperature, t_logits.astype(np.float64) / temperature
  if top_k:
    idx = np.argsort(-t, axis=-1)[..., :top_k]
    s, t = np.take_along_axis(s, idx, -1), np.take_along_axis(t, idx, -1)
  p, q = _softmax(t), _softmax(s)
  kl = lambda a, b: np.sum(a * np.log(a / b), -1)  # noqa: E731
  if kind == "jsd" and beta in (0.0, 1.0):
    kind = "forward" if beta == 0.0 else "reverse"
  if kind == "forward":
    d = kl(p, q)
  elif kind == "reverse":
    d = kl(q, p)
  else:
    m = beta * p + (1 - beta) * q
    d = beta * kl(p, m) + (1 - beta) * kl(q, m)
  return d * temperature**2


def _bound(s_logits, t_logits, temperature):
  """fp32 rounding of a sum of p * (log p - log q) terms: a few ulps of the largest |log-prob|
  (<= the logit range / T + log V) per position, times T^2. 64 ulps leave >10x headroom; a wrong
  direction, temperature or support changes the values by >1e-2."""
  spread = max(np.ptp(s_logits), np.ptp(t_logits)) / temperature + np.log(s_logits.shape[-1])
  return 64 * EPS32 * spread * temperature**2


def _logits(seed, shape=(2, 5, 13), scale=2.0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=shape) * scale).astype(np.float32) for _ in range(2)]


CASES = [(kind, beta, t, k) for kind, beta in [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5),
                                                ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]
         for t, k in ((1.0, 0), (2.5, 4))]


@pytest.mark.parametrize("kind,beta,temperature,top_k", CASES)
def test_divergence_matches_numpy(kind, beta, temperature, top_k):
  s, t = _logits(0)
  got = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=temperature,
                                        top_k=top_k))
  want = _ref(s, t, kind, beta, temperature, top_k)
  assert want.min() > 1e-3  # far from zero: a wrong formula cannot hide in the tolerance
  np.testing.assert_allclose(got, want, rtol=0, atol=_bound(s, t, temperature))


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_zero_when_distributions_match(kind, beta):
  s, _ = _logits(1)
  for temperature, top_k in [(1.0, 0), (2.0, 5)]:
    d = np.asarray(losses.kl_divergence(s, s, kind=kind, beta=beta, temperature=temperature,
                                        top_k=top_k))
    np.testing.assert_allclose(d, 0.0, atol=_bound(s, s, temperature))
  # A student that matches the teacher only up to a constant shift of its logits: same softmax.
  d = np.asarray(losses.kl_divergence(s + 3.0, s, kind=kind, beta=beta))
  np.testing.assert_allclose(d, 0.0, atol=_bound(s + 3.0, s, 1.0))


def test_beta_ends_and_limits():
  """beta = 0 / 1 are forward / reverse KL exactly (TRL's special cases); the mixture formula
  tends to 0 at both ends, as beta * forward KL and (1 - beta) * reverse KL."""
  s, t = _logits(2)
  for beta, kind in [(0.0, "forward"), (1.0, "reverse")]:
    np.testing.assert_array_equal(np.asarray(losses.kl_divergence(s, t, kind="jsd", beta=beta)),
                                  np.asarray(losses.kl_divergence(s, t, kind=kind)))
  with jax.enable_x64(True):  # the limits need float64: beta * KL ~ 1e-6, below fp32 noise
    log_p = jax.nn.log_softmax(jnp.asarray(t, jnp.float64))
    log_q = jax.nn.log_softmax(jnp.asarray(s, jnp.float64))
    fwd = np.asarray(losses.divergence(log_p, log_q, "forward"))
    rev = np.asarray(losses.divergence(log_p, log_q, "reverse"))
    errs = []
    for eps in (1e-4, 1e-6):
      lo = np.asarray(losses.divergence(log_p, log_q, "jsd", eps)) / eps
      hi = np.asarray(losses.divergence(log_p, log_q, "jsd", 1 - eps)) / eps
      errs.append((np.abs(lo / fwd - 1).max(), np.abs(hi / rev - 1).max()))
    # The ratio error is O(beta) (measured 2.3e-3 / 1.2e-2 at 1e-4, 2.4e-5 / 1.3e-4 at 1e-6):
    # shrinking beta 100x shrinks it ~100x.
    assert errs[1][0] < 1e-3 and errs[1][1] < 1e-3, errs
    assert errs[0][0] > 50 * errs[1][0] and errs[0][1] > 50 * errs[1][1], errs
    # beta = 0.5 is symmetric in teacher and student. float64, and swapping the arguments only
    # swaps the operands of commutative sums (0.5P + 0.5Q, the two KL halves): equal to rounding
    # of a ~1e-16 relative error, far inside 1e-12 on any CPU.
    np.testing.assert_allclose(np.asarray(losses.divergence(log_p, log_q, "jsd", 0.5)),
                               np.asarray(losses.divergence(log_q, log_p, "jsd", 0.5)),
                               rtol=1e-12)


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_top_k_of_the_whole_vocab_is_the_full_divergence(kind, beta):
  s, t = _logits(3)
  full = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=1.5))
  top_v = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=1.5,
                                          top_k=s.shape[-1]))
  np.testing.assert_allclose(top_v, full, rtol=0, atol=_bound(s, t, 1.5))  # only summation order
  assert np.abs(top_v - np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta,
                                                        temperature=1.5, top_k=4))).max() > 1e-2


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_listed_support_equals_online_top_k(kind, beta):
  """Offline top-k (ids + teacher probabilities, summing to < 1) = online top-k on the logits."""
  s, t = _logits(4)
  k, temperature = 4, 2.0
  ids = np.argsort(-t, -1)[..., :k].astype(np.int32)
  probs = np.take_along_axis(_softmax(t.astype(np.float64)), ids, -1).astype(np.float32)
  assert probs.sum(-1).max() < 0.999  # a truncated distribution: renormalised on the support
  got = np.asarray(losses.soft_divergence(s, ids, probs, kind=kind, beta=beta,
                                          temperature=temperature))
  want = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=temperature,
                                         top_k=k))
  np.testing.assert_allclose(got, want, rtol=0, atol=_bound(s, t, temperature))
  # Padding entries (prob 0) change nothing; an all-zero row is "no soft target": 0.
  pad_ids = np.concatenate([ids, np.zeros_like(ids[..., :2])], -1)
  pad_probs = np.concatenate([probs, np.zeros_like(probs[..., :2])], -1)
  pad_probs[0, 0] = 0.0
  padded = np.asarray(losses.soft_divergence(s, pad_ids, pad_probs, kind=kind, beta=beta,
                                             temperature=temperature))
  assert padded[0, 0] == 0.0
  np.testing.assert_allclose(padded.ravel()[1:], got.ravel()[1:], rtol=0,
                             atol=_bound(s, t, temperature))


# ---------------------------------------------------------------------------------------------
# Chunked: student and teacher hidden states + output kernels in one scan.

B, T, E, F, V, W, N = 2, 12, 8, 10, 40, 48, 37  # student / teacher rows V / W, tokenizer N


def _hidden_inputs(seed=5):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  weights = (rng.random((B, T)) < 0.6).astype(np.float32)
  targets = rng.integers(0, N, (B, T)).astype(np.int32)
  return f32(B, T, E), f32(E, V), f32(B, T, F), f32(F, W), targets, weights


def _unchunked(h, out, th, tout, targets, weights, distill):
  logits, t_logits = h @ out, th @ tout
  ce = jnp.sum(losses.cross_entropy(logits, targets) * weights)
  kd = jnp.sum(losses.distill_terms(logits, distill, t_logits) * weights)
  return ce, kd


@pytest.mark.parametrize("distill", [
    losses.Distill(kind="forward", alpha=0.3, vocab=N),
    losses.Distill(kind="jsd", alpha=0.7, beta=0.2, temperature=2.0, top_k=6, vocab=N)])
def test_chunked_online_teacher_equals_unchunked_loss_and_grads(distill):
  h, out, th, tout, targets, weights = _hidden_inputs()

  def mixed(fn):
    def f(h_, out_, th_):
      ce, kd = fn(h_, out_, th_)
      return (1 - distill.alpha) * ce + distill.alpha * kd
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  full = mixed(lambda h_, o_, th_: _unchunked(h_, o_, th_, tout, targets, weights, distill))
  chunked = mixed(lambda h_, o_, th_: losses.chunked_loss_sums(
      h_, o_, targets, weights, 5, distill=distill, teacher_hidden_BxTxF=th_,
      teacher_out_FxW=tout))  # 5 does not divide 12: the tail chunk is padded
  (want, want_g), (got, got_g) = full(h, out, th), chunked(h, out, th)
  # Sums of ~20 per-token terms of O(1..10) in another order: ~1e-7 relative.
  np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
  assert_trees_close(got_g[:2], want_g[:2])  # d/d student hidden, d/d student kernel
  assert np.abs(np.asarray(want_g[0])).max() > 1e-2
  assert not np.asarray(got_g[2]).any()  # the teacher gets no gradient (stop_gradient)


def test_vocab_cut_ignores_extra_embedding_rows():
  """Rows past the tokenizer's length (Qwen2.5: 151936 vs 152064 rows for one tokenizer) never
  enter the divergence, however large their logits; CE still normalises over the student's."""
  h, out, th, tout, targets, weights = _hidden_inputs(6)
  distill = losses.Distill(kind="jsd", alpha=0.5, beta=0.4, vocab=N)
  cut = losses.chunked_loss_sums(h, out, targets, weights, 4, distill=distill,
                                 teacher_hidden_BxTxF=th, teacher_out_FxW=tout[:, :N])
  wild_t, wild_s = tout.copy(), out.copy()
  wild_t[:, N:], wild_s[:, N:] = 50.0, -50.0
  wild = losses.chunked_loss_sums(h, wild_s, targets, weights, 4, distill=distill,
                                  teacher_hidden_BxTxF=th, teacher_out_FxW=wild_t)
  np.testing.assert_allclose(float(wild[1]), float(cut[1]), rtol=RTOL)
  uncut = losses.chunked_loss_sums(h, out, targets, weights, 4, teacher_hidden_BxTxF=th,
                                   teacher_out_FxW=wild_t,
                                   distill=losses.Distill(kind="jsd", beta=0.4, vocab=V))
  assert abs(float(uncut[1]) - float(cut[1])) > 1e-2 * float(cut[1])  # the cut matters (3.6%)
  with pytest.raises(ValueError, match="Distill.vocab"):  # 40 vs 48 ids and no cut
    losses.chunked_loss_sums(h, out, targets, weights, 4, teacher_hidden_BxTxF=th,
                             teacher_out_FxW=tout, distill=losses.Distill())


# ---------------------------------------------------------------------------------------------
# loss_terms on real (tiny) models: masking and the CE / KD mix.

STUDENT = models.presets.get("tiny").replace(vocab_size=96, hidden_size=32, intermediate_size=64,
                                             num_heads=2, num_kv_heads=1)
TEACHER = models.presets.get("tiny").replace(vocab_size=104, hidden_size=48,
                                             intermediate_size=96, tie_embeddings=False)


def _batch(seed, b=2, length=16, k=3):
  rng = np.random.default_rng(seed)
  batch = {"inputs": rng.integers(1, 90, (b, length)).astype(np.int32),
           "targets": rng.integers(1, 90, (b, length)).astype(np.int32),
           "weights": (rng.random((b, length)) < 0.5).astype(np.float32),
           "segment_ids": np.ones((b, length), np.int32),
           "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1))}
  ids = rng.integers(0, 90, (b, length, k)).astype(np.int32)
  probs = rng.random((b, length, k)).astype(np.float32) * 0.33
  probs[rng.random((b, length)) < 0.3] = 0.0  # positions without a soft target
  return batch, ids, probs


@pytest.mark.parametrize("chunk", [0, 8])
def test_online_loss_terms_are_weighted_means_of_the_numpy_divergence(chunk):
  s_params, t_params = models.init(STUDENT, 0), models.init(TEACHER, 1)
  batch, _, _ = _batch(7)
  distill = losses.Distill(kind="jsd", alpha=0.25, beta=0.3, temperature=1.5, vocab=90)
  terms = jax.jit(lambda s, t: step.loss_terms(STUDENT, s, batch, chunk, distill, TEACHER, t))(
      s_params, t_params)
  s_logits = np.asarray(models.apply(STUDENT, s_params, batch["inputs"]))
  t_logits = np.asarray(models.apply(TEACHER, t_params, batch["inputs"]))
  per_token = _ref(s_logits[..., :90], t_logits[..., :90], "jsd", 0.3, 1.5)
  want_kd = float((per_token * batch["weights"]).sum())
  np.testing.assert_allclose(float(terms["kd"]), want_kd, rtol=1e-4)  # fp32 vs fp64, ~16 terms
  np.testing.assert_allclose(float(terms["loss"]),
                             0.75 * float(terms["ce"]) + 0.25 * float(terms["kd"]), rtol=RTOL)
  assert float(terms["tokens"]) == float(batch["weights"].sum())
  unweighted = float(_ref(s_logits[..., :90], t_logits[..., :90], "jsd", 0.3, 1.5).sum())
  assert unweighted > 1.5 * want_kd  # the mask really drops terms


@pytest.mark.parametrize("chunk", [0, 8])
def test_offline_soft_term_is_weighted_and_uses_the_kind(chunk):
  s_params = models.init(STUDENT, 0)
  batch, ids, probs = _batch(8)
  batch |= {"soft_ids": ids, "soft_probs": probs}
  distill = losses.Distill(kind="reverse", alpha=0.6, temperature=2.0, vocab=90)
  terms_fn = jax.jit(lambda p, d: step.loss_terms(STUDENT, p, batch, chunk, d), static_argnums=1)
  terms = terms_fn(s_params, distill)
  s_logits = np.asarray(models.apply(STUDENT, s_params, batch["inputs"]), np.float64)
  want = 0.0
  for bi, li in zip(*np.nonzero(batch["weights"] * (probs.sum(-1) > 0))):
    m = probs[bi, li] > 0
    p = probs[bi, li][m].astype(np.float64) ** 0.5
    p /= p.sum()
    q = _softmax(s_logits[bi, li][ids[bi, li][m]] / 2.0)
    want += 4.0 * np.sum(q * np.log(q / p))
  np.testing.assert_allclose(float(terms["kd"]), want, rtol=1e-4)
  # Unweighted (ICLDist's form) also counts the soft targets on prompt positions.
  loose = terms_fn(s_params, losses.Distill(kind="reverse", temperature=2.0, weighted=False))
  assert float(loose["kd"]) > float(terms["kd"]) + 1e-3


def test_distill_validation():
  for bad in (dict(kind="kl"), dict(alpha=1.5), dict(beta=-0.1), dict(temperature=0.0),
              dict(top_k=-1)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      losses.Distill(**bad)
