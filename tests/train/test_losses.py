"""The distillation term against float64 numpy: full vocabulary, the teacher's top-k and listed
supports with the tail bucket (temperature, masks, padding), the renormalised form, the leaked-mass
probe, bucketed <= full, the sampled estimator's unbiasedness, and the chunked loss against one
chunk."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentijax import models
from sentijax.train import losses, step
from tolerances import RTOL, assert_trees_close

EPS32 = float(np.finfo(np.float32).eps)
KIND_BETAS = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0),
              ("jsd", 1.0)]


def _softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _np_div(p, q, kind, beta=0.5):
  """float64 GKD divergences over the last axis; zero-probability entries of the first argument
  of each KL contribute 0."""
  def kl(a, b):
    pos = a > 0
    return np.sum(np.where(pos, a * (np.log(np.where(pos, a, 1)) - np.log(np.where(pos, b, 1))),
                           0.0), -1)
  if kind == "jsd" and beta in (0.0, 1.0):
    kind = "forward" if beta == 0.0 else "reverse"
  if kind == "forward":
    return kl(p, q)
  if kind == "reverse":
    return kl(q, p)
  m = beta * p + (1 - beta) * q
  return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _np_buckets(p, in_s):
  """[..., V] probabilities -> [..., V + 1]: p on the support (0 elsewhere), then the tail mass."""
  return np.concatenate([np.where(in_s, p, 0.0), np.sum(np.where(in_s, 0.0, p), -1,
                                                        keepdims=True)], -1)


def _np_topk_mask(t, k):
  idx = np.argsort(-t, -1)[..., :k]
  mask = np.zeros(t.shape, bool)
  np.put_along_axis(mask, idx, True, -1)
  return mask, idx


def _ref(s_logits, t_logits, kind, beta=0.5, temperature=1.0, top_k=0, tail="bucket"):
  """float64 reference of the online forms: full vocabulary, top-k + tail bucket (a
  coarse-graining of the tempered distributions), or top-k renormalised."""
  s, t = s_logits.astype(np.float64) / temperature, t_logits.astype(np.float64) / temperature
  p, q = _softmax(t), _softmax(s)
  if top_k:
    in_s, idx = _np_topk_mask(t, top_k)
    if tail == "renorm":
      p, q = _softmax(np.take_along_axis(t, idx, -1)), _softmax(np.take_along_axis(s, idx, -1))
    else:
      p, q = _np_buckets(p, in_s), _np_buckets(q, in_s)
  return _np_div(p, q, kind, beta) * temperature**2


def _ref_listed(s_logits, ids, probs, kind, beta, temperature, tail_mass=None):
  """float64 reference of the listed form: teacher buckets [probs, tail] (tail = 1 - sum unless
  given) tempered as p^(1/T) and renormalised; the student's buckets from softmax(logits / T)."""
  out = np.zeros(probs.shape[:-1])
  q_full = _softmax(s_logits.astype(np.float64) / temperature)
  for pos in np.ndindex(*probs.shape[:-1]):
    valid = probs[pos] > 0
    if not valid.any():
      continue
    in_s = np.zeros(s_logits.shape[-1], bool)
    in_s[ids[pos][valid]] = True
    tail = 1 - probs[pos][valid].astype(np.float64).sum() if tail_mass is None else tail_mass[pos]
    p = np.r_[probs[pos][valid].astype(np.float64), max(tail, losses.TAIL_FLOOR)]
    if in_s.all():
      p[-1] = 0.0
    p = p ** (1 / temperature)
    p /= p.sum()
    q = np.r_[q_full[pos][ids[pos][valid]], q_full[pos][~in_s].sum()]
    out[pos] = _np_div(p, q, kind, beta) * temperature**2
  return out


def _bound(s_logits, t_logits, temperature):
  """fp32 rounding of a sum of p * (log p - log q) terms: a few ulps of the largest |log-prob|
  (<= the logit range / T + log V) per position, times T^2. 64 ulps leave >10x headroom; a wrong
  direction, temperature, support or tail changes the values by >1e-2."""
  spread = max(np.ptp(s_logits), np.ptp(t_logits)) / temperature + np.log(s_logits.shape[-1])
  return 64 * EPS32 * spread * temperature**2


def _logits(seed, shape=(2, 5, 13), scale=2.0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=shape) * scale).astype(np.float32) for _ in range(2)]


CASES = [(kind, beta, t, k, tail) for kind, beta in KIND_BETAS
         for t, k, tail in ((1.0, 0, "bucket"), (2.5, 4, "bucket"), (0.7, 3, "bucket"),
                            (2.5, 4, "renorm"))]


@pytest.mark.parametrize("kind,beta,temperature,top_k,tail", CASES)
def test_online_divergence_matches_numpy(kind, beta, temperature, top_k, tail):
  s, t = _logits(0)
  got = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=temperature,
                                        top_k=top_k, tail=tail))
  want = _ref(s, t, kind, beta, temperature, top_k, tail)
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
  d = np.asarray(losses.kl_divergence(s + 3.0, s, kind=kind, beta=beta, top_k=4))
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


# ---------------------------------------------------------------------------------------------
# The tail bucket: what it charges, and the data-processing inequality.


def _probe(v=64, k=4, leak=0.998):
  """A teacher with most of its mass on k tokens; a student with the teacher's shape on those
  k tokens but `leak` of its mass spread over the others."""
  rng = np.random.default_rng(0)
  t = np.full((1, 1, v), -4.0, np.float32)
  t[0, 0, :k] = np.linspace(5.0, 3.0, k)
  s = (rng.normal(size=(1, 1, v)) * 0.3 + 2.0).astype(np.float32)
  p_top = _softmax(t[0, 0, :k].astype(np.float64))
  z_rest = np.exp(s[0, 0, k:].astype(np.float64)).sum() / leak
  s[0, 0, :k] = np.log((1 - leak) * p_top * z_rest)
  return s, t


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_leaked_student_mass_is_charged(kind):
  """The probe of the issue: matched shape on the teacher's top 4, 99.8% of the student's mass
  elsewhere. Full-vocabulary forward KL 6.17 nats, reverse 5.57, JSD 0.67; the renormalised form
  gives 0 (the old default), the tail bucket > 25% of the full value (measured > 99%), online and
  from a store's listed ids."""
  s, t = _probe()
  q = _softmax(s.astype(np.float64))
  assert abs(q[0, 0, :4].sum() - 0.002) < 1e-6  # the probe is what it claims
  full = float(losses.kl_divergence(s, t, kind=kind)[0, 0])
  assert full > 0.5
  online = float(losses.kl_divergence(s, t, kind=kind, top_k=4)[0, 0])
  ids = np.arange(4, dtype=np.int32)[None, None]
  probs = _softmax(t.astype(np.float64))[..., :4].astype(np.float32)
  listed = float(losses.soft_divergence(s, ids, probs, kind=kind)[0, 0])
  assert online > 0.25 * full and listed > 0.25 * full, (online, listed, full)
  renorm = float(losses.kl_divergence(s, t, kind=kind, top_k=4, tail="renorm")[0, 0])
  assert abs(renorm) < 1e-4  # blind to the leak: why it is no longer the default
  np.testing.assert_allclose(float(losses.support_mass(s, ids, ids >= 0)[0, 0]), 0.002,
                             rtol=1e-4)


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5),
                                       ("jsd", 0.2)])
def test_bucketed_never_exceeds_full_and_equals_it_with_one_token_outside(kind, beta):
  """Online, the buckets coarse-grain the tempered distributions on both sides: <= the full
  divergence at the same T (data-processing inequality) for every k; = it when exactly one token
  is outside S (k = V - 1) and when none is (k = V)."""
  s, t = _logits(3, shape=(4, 6, 13), scale=2.5)
  v = s.shape[-1]
  for temperature in (0.7, 1.0, 2.5):
    full = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=temperature))
    tol = _bound(s, t, temperature)
    for k in (1, 3, 8):
      part = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta,
                                             temperature=temperature, top_k=k))
      assert (part <= full + tol).all(), (temperature, k, (part - full).max())
      assert (full - part).max() > 10 * tol  # a real gap: the check is not vacuous
    for k in (v - 1, v):
      whole = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta,
                                              temperature=temperature, top_k=k))
      np.testing.assert_allclose(whole, full, rtol=0, atol=tol)
  renorm = np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, top_k=3, tail="renorm"))
  if kind == "reverse":  # no such bound for the renormalised form (measured 2.1x the full KL)
    assert (renorm > np.asarray(losses.kl_divergence(s, t, kind=kind)) + 1e-2).any()


# ---------------------------------------------------------------------------------------------
# Listed supports (an offline store, verbalizers).


LISTED = [(kind, beta, t) for kind, beta in KIND_BETAS[:4] for t in (1.0, 2.0)]


@pytest.mark.parametrize("kind,beta,temperature", LISTED)
def test_listed_support_matches_numpy(kind, beta, temperature):
  """Store-like rows (teacher probs at T = 1, tail implicit), padding entries (prob 0, id 0 even
  where 0 is a listed id), a row without a target, and an explicit stored tail."""
  s, t = _logits(4)
  k = 4
  ids = np.argsort(-t, -1)[..., :k].astype(np.int32)
  probs = np.take_along_axis(_softmax(t.astype(np.float64)), ids, -1).astype(np.float32)
  ids = np.concatenate([ids, np.zeros_like(ids[..., :2])], -1)  # two padding entries
  probs = np.concatenate([probs, np.zeros_like(probs[..., :2])], -1)
  probs[0, 0] = 0.0  # no soft target here
  probs[1, 2, 3] = 0.0  # a row with 3 entries
  got = np.asarray(losses.soft_divergence(s, ids, probs, kind=kind, beta=beta,
                                          temperature=temperature))
  want = _ref_listed(s, ids, probs, kind, beta, temperature)
  assert got[0, 0] == 0.0 and np.delete(want.ravel(), 0).min() > 1e-3
  np.testing.assert_allclose(got, want, rtol=0, atol=_bound(s, t, temperature))
  tail = np.random.default_rng(9).uniform(0.05, 0.6, probs.shape[:-1]).astype(np.float32)
  got_tail = np.asarray(losses.soft_divergence(s, ids, probs, kind=kind, beta=beta,
                                               temperature=temperature, soft_tail_BxL=tail))
  want_tail = _ref_listed(s, ids, probs, kind, beta, temperature, tail)
  np.testing.assert_allclose(got_tail, want_tail, rtol=0, atol=_bound(s, t, temperature))
  assert np.abs(want_tail - want).max() > 1e-2  # the stored tail is used


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_listed_support_and_online_top_k_agree_where_exact(kind, beta):
  """A store row (the teacher's top-k probabilities at T = 1) gives the online top-k value at
  T = 1 exactly; at T != 1 only when the tail is one token (k = V - 1): the store's tail is
  tempered as one token, the online one from the tempered teacher (measured here at T = 2, k = 4:
  the two differ by up to ~10%)."""
  s, t = _logits(5)
  v = s.shape[-1]

  def both(k, temperature):
    ids = np.argsort(-t, -1)[..., :k].astype(np.int32)
    probs = np.take_along_axis(_softmax(t.astype(np.float64)), ids, -1).astype(np.float32)
    return (np.asarray(losses.soft_divergence(s, ids, probs, kind=kind, beta=beta,
                                              temperature=temperature)),
            np.asarray(losses.kl_divergence(s, t, kind=kind, beta=beta, temperature=temperature,
                                            top_k=k)))
  for k, temperature in ((4, 1.0), (v - 1, 1.0), (v - 1, 2.0)):
    listed, online = both(k, temperature)
    np.testing.assert_allclose(listed, online, rtol=0, atol=_bound(s, t, temperature))
  listed, online = both(4, 2.0)
  assert np.abs(listed - online).max() > 1e-3  # the documented approximation is real


def test_listed_renorm_is_the_old_restricted_form():
  """tail='renorm': both restricted to the listed ids and renormalised (teacher p^(1/T))."""
  s, t = _logits(6)
  ids = np.argsort(-t, -1)[..., :4].astype(np.int32)
  probs = np.take_along_axis(_softmax(t.astype(np.float64)), ids, -1).astype(np.float32)
  got = np.asarray(losses.soft_divergence(s, ids, probs, kind="reverse", temperature=2.0,
                                          tail="renorm"))
  want = _ref(s, t, "reverse", temperature=2.0, top_k=4, tail="renorm")
  np.testing.assert_allclose(got, want, rtol=0, atol=_bound(s, t, 2.0))


def test_listed_gradient_matches_finite_differences_and_reaches_every_token():
  """float64 central differences of the bucketed verbalizer KL (ICLDist's form): the tail bucket
  sends gradient to every logit (the renormalised form only to the listed ones)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 11)) * 3
  ids = np.array([[[1, 4, 0], [2, 3, 5], [0, 0, 0]], [[7, 8, 9], [1, 2, 0], [6, 5, 4]]], np.int32)
  probs = np.array([[[0.7, 0.2, 0], [0.2, 0.5, 0.3], [0, 0, 0]],
                    [[0.1, 0.1, 0.7], [0.5, 0.4, 0], [0.6, 0.3, 0.1]]])
  with jax.enable_x64(True):
    for tail, kind in (("bucket", "forward"), ("bucket", "reverse"), ("renorm", "forward")):
      f = jax.jit(lambda z: jnp.sum(losses.soft_divergence(  # noqa: E731
          z, ids, probs, kind=kind, temperature=1.5, tail=tail)))
      x = jnp.asarray(logits)
      grad = np.asarray(jax.grad(f)(x))
      steps = np.eye(x.size).reshape(x.size, *x.shape) * 1e-6  # every coordinate at once
      num = np.asarray((jax.vmap(f)(x + steps) - jax.vmap(f)(x - steps)) / 2e-6).reshape(x.shape)
      # Central differences in float64: error ~eps^2 f''' + 1e-16 |f| / eps ~ 1e-10, two
      # orders inside the bound; both sides are float64 (CPU-to-CPU differences ~1e-16 of |f|).
      np.testing.assert_allclose(grad, num, atol=1e-8)
      listed = np.zeros(x.shape, bool)
      np.put_along_axis(listed, ids, probs > 0, axis=-1)
      has = (probs > 0).any(-1)
      assert (grad[~has] == 0).all()  # no target, no gradient
      unlisted = (~listed) & has[..., None]
      if tail == "bucket":
        assert (np.abs(grad[unlisted]) > 1e-6).all()
      else:
        assert (grad[unlisted] == 0).all()


# ---------------------------------------------------------------------------------------------
# The sampled estimator.


def test_sampled_kl_is_unbiased_in_value_and_gradient():
  """N = 8 draws per position from the tempered teacher (T = 2), as a store keeps them (distinct
  ids, weights c_i / N, teacher log-probs at T), R = 4000 independent draw sets: their mean value
  and mean gradient equal the exact full-vocabulary T^2 KL(p_T || q_T) and its gradient within
  5 standard errors (a fixed seed; a biased estimator, e.g. weights renormalised over the drawn
  ids or log q_T at T = 1, misses by > 20 standard errors)."""
  v, n, r, temperature = 12, 8, 4000, 2.0
  s, t = _logits(7, shape=(1, 1, v))
  p_t = _softmax(t[0, 0].astype(np.float64) / temperature)
  rng = np.random.default_rng(0)
  counts = np.stack([np.bincount(rng.choice(v, n, p=p_t), minlength=v) for _ in range(r)])
  ids = np.broadcast_to(np.arange(v, dtype=np.int32), (r, 1, v))  # every id; weight 0 = absent
  weights = (counts / n).astype(np.float32)[:, None]
  logp = np.broadcast_to(np.log(p_t).astype(np.float32), (r, 1, v))
  student = jnp.broadcast_to(jnp.asarray(s), (r, 1, v))

  def per_draw(z):
    return losses.sampled_kl(z, ids, weights, logp, temperature)[:, 0]
  values = np.asarray(per_draw(student))
  grads = np.asarray(jax.grad(lambda z: jnp.sum(per_draw(z)))(student))[:, 0]
  exact = float(losses.kl_divergence(s, t, temperature=temperature)[0, 0])
  exact_grad = np.asarray(jax.grad(lambda z: jnp.sum(losses.kl_divergence(
      z, t, temperature=temperature)))(jnp.asarray(s)))[0, 0]
  se = values.std() / np.sqrt(r)
  assert abs(values.mean() - exact) < 5 * se, (values.mean(), exact, se)
  g_se = grads.std(0) / np.sqrt(r)
  assert (np.abs(grads.mean(0) - exact_grad) < 5 * g_se + 1e-6).all()
  assert se < 0.05 * exact  # the bound is tight enough to mean something
  # A biased variant (weights renormalised to the drawn ids' teacher mass) is caught.
  biased = np.asarray(losses.sampled_kl(student, ids, weights * 0.9, logp, temperature))[:, 0]
  assert abs(biased.mean() - exact) > 5 * se


# ---------------------------------------------------------------------------------------------
# The Distill type.


def test_distill_validation():
  for bad, match in ((dict(kind="kl"), "kind"), (dict(alpha=1.5), "alpha"),
                     (dict(beta=-0.1), "beta"), (dict(temperature=0.0), "temperature"),
                     (dict(tail="drop"), r"tail='drop'.*\('bucket', 'renorm'\)"),
                     (dict(support="dense"), "support='dense'.*'full', 'topk', 'listed'"),
                     (dict(top_k=4), "top_k=4.*support='topk'"),
                     (dict(support="topk"), "top_k=0"),
                     (dict(support="topk", top_k=1, tail="renorm"), "identically 0"),
                     (dict(support="sampled", kind="reverse"), "forward KL only")):
    with pytest.raises(ValueError, match=match):
      losses.Distill(**bad)
  assert losses.Distill(support="topk", top_k=1).sparse  # bucketed top-1 is a real signal
  assert losses.Distill(support="listed").sparse and not losses.Distill().sparse


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
  kd = jnp.sum(losses.distill_terms(logits, distill, t_logits)["kd"] * weights)
  return ce, kd


@pytest.mark.parametrize("distill", [
    losses.Distill(kind="forward", alpha=0.3, vocab=N),
    losses.Distill(kind="jsd", alpha=0.7, beta=0.2, temperature=2.0, support="topk", top_k=6,
                   vocab=N)])
def test_chunked_online_teacher_equals_unchunked_loss_and_grads(distill):
  h, out, th, tout, targets, weights = _hidden_inputs()

  def mixed(fn):
    def f(h_, out_, th_):
      ce, kd = fn(h_, out_, th_)
      return (1 - distill.alpha) * ce + distill.alpha * kd
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  def chunked_fn(chunk):
    def f(h_, o_, th_):
      sums = losses.chunked_loss_sums(losses.Head(h_, o_), targets, weights, chunk,
                                      distill=distill, teacher=losses.Head(th_, tout))
      return sums["ce"], sums["kd"]
    return mixed(f)

  full = mixed(lambda h_, o_, th_: _unchunked(h_, o_, th_, tout, targets, weights, distill))
  want, want_g = full(h, out, th)
  for chunk in (5, 0):  # 5 does not divide 12: the tail chunk is padded; 0 = one chunk
    got, got_g = chunked_fn(chunk)(h, out, th)
    # Sums of ~20 per-token terms of O(1..10) in another order: ~1e-7 relative.
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    assert_trees_close(got_g[:2], want_g[:2])  # d/d student hidden, d/d student kernel
    assert not np.asarray(got_g[2]).any()  # the teacher gets no gradient (stop_gradient)
  assert np.abs(np.asarray(want_g[0])).max() > 1e-2


def test_vocab_cut_ignores_extra_embedding_rows():
  """Rows past the tokenizer's length (Qwen2.5: 151936 vs 152064 rows for one tokenizer) never
  enter the divergence, however large their logits; CE still normalises over the student's."""
  h, out, th, tout, targets, weights = _hidden_inputs(6)
  distill = losses.Distill(kind="jsd", alpha=0.5, beta=0.4, vocab=N)
  kd = lambda o, to, d: float(losses.chunked_loss_sums(  # noqa: E731
      losses.Head(h, o), targets, weights, 4, distill=d, teacher=losses.Head(th, to))["kd"])
  cut = kd(out, tout[:, :N], distill)
  wild_t, wild_s = tout.copy(), out.copy()
  wild_t[:, N:], wild_s[:, N:] = 50.0, -50.0
  np.testing.assert_allclose(kd(wild_s, wild_t, distill), cut, rtol=RTOL)
  uncut = kd(out, wild_t, losses.Distill(kind="jsd", beta=0.4, vocab=V))
  assert abs(uncut - cut) > 1e-2 * cut  # the cut matters (3.6%)
  with pytest.raises(ValueError, match="Distill.vocab"):  # 40 vs 48 ids and no cut
    kd(out, tout, losses.Distill())


def test_chunked_losses_apply_each_models_logit_softcap():
  """A soft-capped model (Gemma-2 style) trains on cap * tanh(logits / cap), student and online
  teacher alike, chunked or not (float64 numpy reference)."""
  h, out, th, tout, targets, weights = _hidden_inputs()
  distill = losses.Distill(kind="forward", alpha=0.5, vocab=N)
  caps = (3.0, 2.0)

  def capped_logp(hid, kernel, cap):
    z = np.asarray(hid, np.float64) @ np.asarray(kernel, np.float64)[:, :N]
    z = cap * np.tanh(z / cap)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  s_logp, t_logp = capped_logp(h, out, caps[0]), capped_logp(th, tout, caps[1])
  w = np.asarray(weights, np.float64)
  tgt = np.asarray(targets)
  want_ce = -(np.take_along_axis(s_logp, tgt[..., None], -1)[..., 0] * w).sum()
  want_kd = ((np.exp(t_logp) * (t_logp - s_logp)).sum(-1) * w).sum()
  for chunk in (5, 0):
    sums = losses.chunked_loss_sums(losses.Head(h, out[:, :N], caps[0]), targets, weights,
                                    chunk, distill=distill,
                                    teacher=losses.Head(th, tout[:, :N], caps[1]))
    np.testing.assert_allclose(float(sums["ce"]), want_ce, rtol=RTOL)
    np.testing.assert_allclose(float(sums["kd"]), want_kd, rtol=RTOL)
  uncapped = losses.chunked_loss_sums(losses.Head(h, out[:, :N]), targets, weights, 0)
  assert abs(float(uncapped["ce"]) - want_ce) > 1e-2 * want_ce  # the cap changes the loss


# ---------------------------------------------------------------------------------------------
# loss_terms on real (tiny) models: masking, the CE / KD mix, the support-mass metric.

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
  ids = np.stack([rng.permutation(90)[:k] for _ in range(b * length)]).reshape(b, length, k)
  probs = rng.random((b, length, k)).astype(np.float32) * 0.33
  probs[rng.random((b, length)) < 0.3] = 0.0  # positions without a soft target
  return batch, ids.astype(np.int32), probs


@pytest.mark.parametrize("chunk,top_k", [(0, 0), (8, 7)])
def test_online_loss_terms_are_weighted_means_of_the_numpy_divergence(chunk, top_k):
  s_params, t_params = models.init(STUDENT, 0), models.init(TEACHER, 1)
  batch, _, _ = _batch(7)
  distill = losses.Distill(kind="jsd", alpha=0.25, beta=0.3, temperature=1.5, vocab=90,
                           support="topk" if top_k else "full", top_k=top_k)
  terms = jax.jit(lambda s, t: step.loss_terms(STUDENT, s, batch, chunk, distill, TEACHER, t))(
      s_params, t_params)
  s_logits = np.asarray(models.apply(STUDENT, s_params, batch["inputs"]))[..., :90]
  t_logits = np.asarray(models.apply(TEACHER, t_params, batch["inputs"]))[..., :90]
  per_token = _ref(s_logits, t_logits, "jsd", 0.3, 1.5, top_k)
  want_kd = float((per_token * batch["weights"]).sum())
  # Random tiny models are near uniform: ~1e-3 nats per token from p (log p - log q) terms with
  # |log p| ~ 4.5, so fp32 cancellation costs ~eps * 4.5 / 1e-3 ~ 5e-4 of the value (measured
  # 1.1e-4); a wrong support, tail, temperature or mask moves it by > 1e-2.
  np.testing.assert_allclose(float(terms["kd"]), want_kd, rtol=1e-3)
  np.testing.assert_allclose(float(terms["loss"]),
                             0.75 * float(terms["ce"]) + 0.25 * float(terms["kd"]), rtol=RTOL)
  assert float(terms["tokens"]) == float(batch["weights"].sum())
  assert per_token.sum() > 1.5 * want_kd  # the mask really drops terms
  if top_k:  # the student's T = 1 mass on the teacher's top-k, summed over weighted tokens
    in_s, _ = _np_topk_mask(t_logits.astype(np.float64), top_k)
    mass = np.where(in_s, _softmax(s_logits.astype(np.float64)), 0).sum(-1)
    np.testing.assert_allclose(float(terms["support_mass"]),
                               float((mass * batch["weights"]).sum()), rtol=1e-4)
    assert float(terms["support_tokens"]) == float(batch["weights"].sum())
  else:
    assert "support_mass" not in terms


@pytest.mark.parametrize("chunk", [0, 8])
def test_offline_soft_term_is_weighted_and_uses_the_kind(chunk):
  s_params = models.init(STUDENT, 0)
  batch, ids, probs = _batch(8)
  batch |= {"soft_ids": ids, "soft_probs": probs}
  distill = losses.Distill(kind="reverse", alpha=0.6, temperature=2.0, vocab=90,
                           support="listed")
  terms_fn = jax.jit(lambda p, d: step.loss_terms(STUDENT, p, batch, chunk, d), static_argnums=1)
  terms = terms_fn(s_params, distill)
  s_logits = np.asarray(models.apply(STUDENT, s_params, batch["inputs"]), np.float64)[..., :90]
  per_pos = _ref_listed(s_logits, ids, probs, "reverse", 0.5, 2.0)
  np.testing.assert_allclose(float(terms["kd"]), float((per_pos * batch["weights"]).sum()),
                             rtol=1e-4)
  has = batch["weights"] * (probs.sum(-1) > 0)
  mass = np.take_along_axis(_softmax(s_logits), ids, -1).sum(-1)
  np.testing.assert_allclose(float(terms["support_mass"]), float((mass * has).sum()), rtol=1e-4)
  assert float(terms["support_tokens"]) == float(has.sum())
  # Unweighted (ICLDist's form) also counts the soft targets on prompt positions.
  loose = terms_fn(s_params, losses.Distill(kind="reverse", temperature=2.0, weighted=False,
                                            support="listed"))
  assert float(loose["kd"]) > float(terms["kd"]) + 1e-3
  with pytest.raises(ValueError, match="soft_ids"):  # a listed term without soft targets
    step.loss_terms(STUDENT, s_params, {k: v for k, v in batch.items() if "soft" not in k}, 0,
                    distill)
  with pytest.raises(ValueError, match="online teacher"):
    step.loss_terms(STUDENT, s_params, batch, 0, losses.Distill(vocab=90))
