"""A served on-policy teacher (train/served.py) against an in-process sentijax.serve of a tiny
model: its teacher-forced log-probs of packed segments equal a local forward; steps it scores equal
the local teacher's token-estimator steps; a failed score stops the step; the kd job stops before
training on a server without prompt logprobs or a teacher tokenizer of another vocabulary."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sentijax import metrics, models, serve, sharding
from sentijax.data import packing, sequences
from sentijax.data import tokenizer as tok_lib
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend
from sentijax.teacher.local import LocalTeacher
from sentijax.teacher.openai_api import ClientSpec, OpenAITeacher
from sentijax.train import kd, losses, onpolicy, served, state as state_lib, step
import safetensors.numpy
from kill_resume import kill_then_resume, start_main
from teacher import teacher_fixtures
from tolerances import assert_close, assert_trees_close

V = teacher_fixtures.VOCAB  # the tokenizer's length = both models' vocab (no padding rows)
T_CFG = models.presets.get("tiny").replace(vocab_size=V, max_position_embeddings=256)
S_CFG = T_CFG.replace(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
LENGTH, PROMPT, RESPONSE = 40, 6, 12  # two prompt + response segments per packed row


@pytest.fixture(scope="module")
def teacher_params():
  """A random tiny teacher, its embedding (the tied head) scaled so its next-token log-probs
  spread over several nats (a near-uniform random init would hide misaligned positions)."""
  params = jax.tree.map(np.asarray, models.init(T_CFG, 7))
  params["embedding"] = params["embedding"] * 12.0
  return params


@pytest.fixture(scope="module")
def server(tok, teacher_params):
  srv = serve.Server(LocalTeacher(T_CFG, teacher_params, tok, batch_size=4, name="tiny"), "tiny",
                     max_batch=4, max_wait_ms=5).start()
  yield srv
  srv.stop()


def _client(url, **kw):
  return OpenAITeacher(ClientSpec(base_url=url, model="tiny", endpoint="completions",
                                  concurrency=4, **kw))


def _row(tok, texts, sampled_segments):
  """A packed row of prompt + response segments and its 'sampled' mask (the response targets
  of the segments listed)."""
  seqs = []
  for text in texts:
    ids = tok.encode(text, add_special_tokens=False)[:PROMPT + RESPONSE]
    mask = np.r_[np.zeros(PROMPT), np.ones(len(ids) - PROMPT)].astype(np.int32)
    seqs.append(sequences.TokenizedSequence(np.asarray(ids, np.int32), mask))
  row = packing.pack_row(seqs, LENGTH)
  row["sampled"] = (row["weights"] * np.isin(row["segment_ids"], sampled_segments)).astype(
      np.float32)
  return row


def _batch(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_served_logprobs_equal_a_local_forward(server, tok, teacher_params):
  """Rows of 2, 2 and 1 segments; sampled: both segments of row 0, the second of row 1, none of
  row 2. At every sampled target the served log-prob equals log_softmax of a local forward of
  that segment alone (float64 reference), 0 elsewhere; one request per sampled segment. The
  client asks for logprobs=1: the chosen token's log-prob comes back outside the top-1 too."""
  texts = teacher_fixtures.demo_texts()
  local = _batch([_row(tok, texts[0:2], [1, 2]), _row(tok, texts[2:4], [2]),
                       _row(tok, texts[4:5], [])])
  client = _client(server.url)
  try:
    logp_BxT, scored = served.Scorer(client)(local, step=0)
  finally:
    client.close()
  assert scored["teacher_requests"] == 3 and scored["teacher_score_s"] > 0
  want_BxT = np.zeros_like(logp_BxT, np.float64)
  for r in range(3):
    for seg in np.unique(local["segment_ids"][r][local["sampled"][r] > 0]):
      where = np.flatnonzero(local["segment_ids"][r] == seg)
      logits = np.asarray(models.apply(T_CFG, teacher_params, local["inputs"][r, where][None]),
                          np.float64)[0]
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      at = np.take_along_axis(logp, local["targets"][r, where][:, None], -1)[:, 0]
      on = local["sampled"][r, where] > 0
      want_BxT[r, where[on]] = at[on]
  assert (want_BxT[local["sampled"] > 0] < -0.5).all()  # real log-probs, not zeros
  assert np.ptp(want_BxT[local["sampled"] > 0]) > 3.0  # spread: misalignment would show
  assert_close(logp_BxT, want_BxT, rel=1e-5, what="served teacher_logp")
  np.testing.assert_array_equal(logp_BxT[local["sampled"] == 0], 0)


def test_served_term_is_the_estimator_on_samples_and_ce_on_corpus_tokens():
  """Distill(support='served') through the chunked loss (chunks of 3 of 7 positions, V = 11):
  on sampled targets the value log q(x) - log p(x) (= rkl_token) with the gradient
  sg(log q - log p) grad log q; on other response targets (corpus rows, kd.lmbda < 1) CE; no CE
  term on the samples. Reference: the whole logits, float64 where it matters."""
  rng = np.random.default_rng(0)
  b, t, e, v = 2, 7, 5, 11
  h = jnp.asarray(rng.normal(size=(b, t, e)), jnp.float32)
  out = jnp.asarray(rng.normal(size=(e, v)), jnp.float32)
  tgt = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  w = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.float32).at[:, 2:].set(1.0)
  s = w * jnp.asarray([[1.0] * t, [0.0] * t])  # row 0 sampled, row 1 a corpus row
  t_logp = jnp.asarray(-rng.uniform(0.5, 4.0, (b, t)), jnp.float32) * s
  d = losses.Distill(kind="reverse", alpha=1.0, support="served")

  def chunked(hh):
    sums = losses.chunked_loss_sums(losses.Head(hh, out), tgt, w, 3, distill=d,
                                    soft={"teacher_logp": t_logp}, sampled_BxT=s)
    return sums["kd"], sums

  def ref(hh):
    log_q = jnp.take_along_axis(jax.nn.log_softmax(hh @ out, -1), tgt[..., None], -1)[..., 0]
    adv = jax.lax.stop_gradient(log_q - t_logp)
    return jnp.sum(w * jnp.where(s > 0, adv * log_q, -log_q)), (log_q, adv)
  (kd_value, sums), grads = jax.value_and_grad(chunked, has_aux=True)(h)
  want_grads, (log_q, adv) = jax.grad(ref, has_aux=True)(h)
  want = jnp.sum(w * jnp.where(s > 0, adv, -log_q))
  assert_close(kd_value, want, what="kd")
  assert_close(sums["rkl_token"], jnp.sum(adv * s), what="rkl_token")
  assert_close(sums["ce"], jnp.sum(-log_q * w * (1 - s)), what="ce on corpus rows only")
  assert float(sums["sampled_tokens"]) == float(jnp.sum(s)) > 0
  assert_close(grads, want_grads, rel=1e-5, what="gradient")
  with pytest.raises(ValueError, match="'sampled' and 'teacher_logp'"):
    losses.chunked_loss_sums(losses.Head(h, out), tgt, w, 3, distill=d, soft={})


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_top_logprobs_parsed_into_the_listed_fields_equal_a_local_forward(server, tok,
                                                                           teacher_params):
  """teacher.top_logprobs=2 against sentijax.serve: at every sampled target the soft fields hold
  the teacher's 2 most likely ids (in order), their probabilities and 1 - their sum, from a
  float64 local forward of the segment alone; zeros elsewhere; teacher_logp as without them."""
  n = 2
  texts = teacher_fixtures.demo_texts()
  local = _batch([_row(tok, texts[0:2], [1, 2]), _row(tok, texts[2:4], [2])])
  client = _client(server.url)
  try:
    plain_BxT, _ = served.Scorer(client)(dict(local), step=0)
    logp_BxT, scored = served.Scorer(client, top_logprobs=n)(local, step=0)
  finally:
    client.close()
  assert scored["teacher_requests"] == 3
  assert_close(logp_BxT, plain_BxT, rel=1e-6, what="teacher_logp with top_logprobs")
  sampled = local["sampled"] > 0
  want_ids = np.zeros(sampled.shape + (n,), np.int64)
  want_probs = np.zeros(sampled.shape + (n,))
  for r in range(2):
    for seg in np.unique(local["segment_ids"][r][sampled[r]]):
      where = np.flatnonzero(local["segment_ids"][r] == seg)
      logp = _log_softmax64(models.apply(T_CFG, teacher_params, local["inputs"][r, where][None])[0])
      order = np.argsort(-logp, -1, kind="stable")[:, :n]
      on = sampled[r, where]
      want_ids[r, where[on]] = order[on]
      want_probs[r, where[on]] = np.exp(np.take_along_axis(logp, order, -1))[on]
  want_tail = np.where(sampled, 1.0 - want_probs.sum(-1), 0.0)
  assert local["soft_ids"].shape == sampled.shape + (n,) and local["soft_ids"].dtype == np.int32
  np.testing.assert_array_equal(local["soft_ids"], want_ids)
  assert_close(local["soft_probs"], want_probs, rel=1e-5, what="soft_probs")
  # The teacher is peaked (tails 1e-4 .. 3e-3): 1e-3 of the largest tail is ~1e-6 absolute, the
  # server's fp32 log-probs' rounding; a dropped or misaligned tail is off by the whole tail.
  assert want_tail[sampled].max() > 1e-3
  assert_close(local["soft_tail"], want_tail, rel=1e-3, what="soft_tail")


def _top_server(tops):
  """A scripted vLLM-shaped echo answer for the ids [5, 9, 7] with these top_logprobs."""
  echo = {"choices": [{"text": "", "logprobs": {
      "tokens": ["token_id:5", "token_id:9", "token_id:7"],
      "token_logprobs": [None, -3.5, -0.25]} | ({} if tops is None else {"top_logprobs": tops})}]}
  return teacher_fixtures.ScriptedServer(lambda k, body: (200, {}, json.dumps(echo)))


def test_top_logprobs_from_a_vllm_shaped_answer_and_short_or_missing_lists():
  """vLLM adds the chosen token to the top-N (N + 1 entries, any order): the N most likely are
  kept, sorted, tail = 1 - their probabilities. Fewer than N at a position, no top_logprobs, or
  top-N probabilities summing past 1 stop with an error naming teacher.top_logprobs."""
  tops = [None, {"token_id:9": -3.5, "token_id:4": -0.5, "token_id:2": -1.5},
          {"token_id:1": -3.0, "token_id:7": -0.25, "token_id:3": -2.0}]
  srv = _top_server(tops)
  client = _client(srv.url, max_retries=0)
  try:
    values, (ids, probs, tail) = served.Scorer(client, top_logprobs=2).score([5, 9, 7], "t")
    assert srv.arrivals[0][2]["logprobs"] == 2 and srv.arrivals[0][2]["echo"] is True
    with pytest.raises(served.ScoringError, match=r"returned 3 top log-probs at token 1, "
                       r"teacher.top_logprobs=4 asked for 4"):
      served.Scorer(client, top_logprobs=4).score([5, 9, 7], "t")
  finally:
    client.close()
    srv.stop()
  np.testing.assert_array_equal(values, np.float32([-3.5, -0.25]))
  np.testing.assert_array_equal(ids, [[4, 2], [7, 3]])
  want = np.exp([[-0.5, -1.5], [-0.25, -2.0]])
  assert_close(probs, want, rel=1e-6, what="probs")
  assert_close(tail, 1.0 - want.sum(-1), rel=1e-6, what="tail")
  assert tail.min() > 0.05
  not_a_distribution = [None, tops[1], {"token_id:7": -0.25, "token_id:3": -0.5}]
  for missing in (None, [None, None, None], [None, {}, {}], not_a_distribution):
    srv = _top_server(missing)
    client = _client(srv.url, max_retries=0)
    try:
      with pytest.raises((served.ScoringError, backend.MissingCapability),
                         match=r"teacher.top_logprobs=2\b"):
        served.Scorer(client, top_logprobs=2).score([5, 9, 7], "t")
    finally:
      client.close()
      srv.stop()


def test_step_loss_is_the_estimator_plus_the_bucketed_reverse_kl():
  """step.loss_terms on the tiny student (chunks of 7): with the teacher's top-3 + tail in the
  listed fields, kd = sum over weighted targets of, on sampled ones, (log q(x) - log p(x)) +
  sum over the 4 buckets q_b log(q_b / p_b) (q_tail = the student's mass outside the 3 ids), CE
  on corpus ones. Reference: float64 numpy on the model's logits."""
  rng = np.random.default_rng(5)
  params = models.init(S_CFG, 1)
  n, b, t = 3, 2, 16
  inputs = rng.integers(0, V, (b, t)).astype(np.int32)
  targets = np.roll(inputs, -1, 1)
  w = np.ones((b, t), np.float32)
  w[:, :3] = 0
  s = np.stack([w[0], w[1] * (np.arange(t) >= 8)]).astype(np.float32)
  p_BxTxV = rng.dirichlet(np.full(V, 0.05), (b, t))  # a peaked teacher
  ids = np.argsort(-p_BxTxV, -1)[..., :n].astype(np.int32)
  probs = np.take_along_axis(p_BxTxV, ids, -1) * s[..., None]
  tail = (1.0 - probs.sum(-1)) * s
  t_logp = np.log(np.take_along_axis(p_BxTxV, targets[..., None], -1)[..., 0]) * s
  batch = {"inputs": inputs, "targets": targets, "weights": w, "sampled": s,
           "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t), (b, 1)),
           "teacher_logp": t_logp.astype(np.float32), "soft_ids": ids,
           "soft_probs": probs.astype(np.float32), "soft_tail": tail.astype(np.float32)}
  d = losses.Distill(kind="reverse", alpha=1.0, support="served", vocab=V)
  got = step.loss_terms(S_CFG, params, {k: jnp.asarray(v) for k, v in batch.items()}, 7, d)
  plain = step.loss_terms(S_CFG, params, {k: jnp.asarray(v) for k, v in batch.items()
                                          if k not in ("soft_ids", "soft_probs", "soft_tail")}, 7, d)
  log_q = _log_softmax64(models.apply(S_CFG, params, inputs, segment_ids=batch["segment_ids"]))
  at = np.take_along_axis(log_q, targets[..., None], -1)[..., 0]
  q_s = np.exp(np.take_along_axis(log_q, ids, -1))
  q_tail = 1.0 - q_s.sum(-1)
  p_s = np.where(s[..., None] > 0, probs, 1.0)
  p_tail = np.where(s > 0, tail, 1.0)
  bucket_kl = (q_s * (np.log(q_s) - np.log(p_s))).sum(-1) + q_tail * (np.log(q_tail) - np.log(p_tail))
  estimator = at - t_logp
  want = np.sum(w * np.where(s > 0, estimator + bucket_kl, -at))
  assert np.sum(s * bucket_kl) > 1.0  # a real term, not a rounding of the estimator's sum
  assert_close(got["kd"], want, rel=1e-5, what="kd = estimator + bucketed reverse KL")
  assert_close(got["kd"] - plain["kd"], np.sum(s * bucket_kl), rel=1e-3,
               what="the bucketed term alone (sampled targets only)")
  assert_close(got["rkl_token"], np.sum(s * estimator), rel=1e-5, what="rkl_token")
  assert_close(plain["kd"], np.sum(w * np.where(s > 0, estimator, -at)), rel=1e-5,
               what="kd without top_logprobs")


ROLLOUT = onpolicy.RolloutSpec(lmbda=1.0, seq_kd=False, estimator="token", sampling=SamplingSettings(
    temperature=1.0, max_tokens=RESPONSE, seed=3))


def _train(batches, *, rollout, distill, teacher=None, token_estimator=False, steps_fn=None):
  tx = optax.sgd(0.5)
  st = state_lib.create_state(models.init(S_CFG, 1), tx)
  spec = step.StepSpec(S_CFG, tx, distill=distill, token_estimator=token_estimator)
  fn = step.jit_train_step(spec, sharding.Placement(), None, None, teacher=teacher,
                           rollout=rollout)
  history = []
  for b in batches:
    st, m = fn(st, {k: jnp.asarray(v) for k, v in b.items() if k != "sampled"})
    history.append(jax.device_get(m))
  return st.params, history


def test_served_steps_equal_local_teacher_token_estimator_steps(server, tok, teacher_params):
  """3 fully on-policy steps (two segments per row, 4 rows, SGD 0.5), the same rollout keys:
  Distill(support='served') scored by the server, behind a proxy failing 5 of the requests
  (500, malformed, 429, dropped, truncated: retried by the client), = the local teacher in the
  step with kd.rollout.estimator=token. Params within 1e-4 relative (the server's scoring
  forward and the step's chunked one round differently, ~1e-6 of the log-probs); same samples,
  same rkl_token."""
  texts = teacher_fixtures.demo_texts()
  batches = [_batch([_row(tok, texts[i + 2 * r:i + 2 * r + 2], []) for r in range(4)])
             for i in (10, 20, 30)]

  def rollout(scorer=None):
    return onpolicy.Rollout(ROLLOUT, S_CFG, vocab=V, eos_id=tok.eos_token_id, seq_len=LENGTH,
                            per_layer=False, scorer=scorer)
  want, m_local = _train(batches, rollout=rollout(),
                         distill=losses.Distill(kind="reverse", alpha=1.0, vocab=V),
                         teacher=step.Teacher(T_CFG, teacher_params), token_estimator=True)
  faults = {1: 500, 5: "malformed", 9: 429, 13: "drop", 20: "truncated"}
  proxy = teacher_fixtures.FaultProxy(server.url, lambda n, body: faults.get(n))
  client = _client(proxy.url, backoff_s=0.01, max_backoff_s=0.05)
  try:
    got, m_served = _train(batches, rollout=rollout(served.Scorer(client)), distill=losses.Distill(
        kind="reverse", alpha=1.0, support="served", vocab=V))
  finally:
    client.close()
    proxy.stop()
  assert proxy.count == 3 * 8 + len(faults) and sum(m["teacher_retries"] for m in m_served) == 5
  for a, b in zip(m_local, m_served):
    assert a["rollout_length"] == b["rollout_length"] and a["rollout_dropped"] == 0
    assert_close(b["rkl_token"], a["rkl_token"], rel=1e-4, what="rkl_token")
    assert_close(b["loss"], a["loss"], rel=1e-4, what="loss")
    assert b["teacher_requests"] == 8 and b["teacher_score_s"] > 0
  assert abs(m_local[0]["rkl_token"]) > 0.5  # a teacher far from the student: a real signal
  assert_trees_close(got, want, rtol=1e-4)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), want,
                                       models.init(S_CFG, 1)))
  assert max(float(x) for x in moved) > 1e-3  # the steps trained


class _Recorded(served.Scorer):
  """A Scorer that logs ("score", step) in `events` before scoring."""

  def __init__(self, client, events):
    super().__init__(client)
    self.events = events

  def __call__(self, local, step):
    self.events.append(("score", step))
    return super().__call__(local, step)


def test_overlapped_steps_train_on_rows_sampled_one_update_earlier(server, tok):
  """kd.rollout.overlap: step t's rows are sampled by the params of step t - 1 (step 0's by its
  own) with step t's keys and scored while step t - 1 runs: 4 steps equal a hand-written
  schedule of that (sample t + 1 from params_t, then train t), not the unpipelined run; the
  server is asked for step t + 1's scores only after step t was dispatched; the last step
  prepares nothing."""
  texts = teacher_fixtures.demo_texts()
  batches = [_batch([_row(tok, texts[i + 2 * r:i + 2 * r + 2], []) for r in range(4)])
             for i in (10, 20, 30, 40)]
  rows = [({k: np.array(v) for k, v in b.items() if k != "sampled"}, 0, 4) for b in batches]
  distill = losses.Distill(kind="reverse", alpha=1.0, support="served", vocab=V)
  tx = optax.sgd(0.5)
  spec = step.StepSpec(S_CFG, tx, distill=distill, token_estimator=True)
  inner = step.jit_train_step(spec, sharding.Placement(), None, None)
  client, events = _client(server.url), []

  def rollout():
    return onpolicy.Rollout(ROLLOUT, S_CFG, vocab=V, eos_id=tok.eos_token_id, seq_len=LENGTH,
                            per_layer=False, scorer=_Recorded(client, events))

  def recorded_inner(st, batch):
    events.append(("train", int(st.step)))
    return inner(st, batch)
  try:
    want = state_lib.create_state(models.init(S_CFG, 1), tx)  # the schedule by hand
    r = rollout()

    def sampled(params, t):  # on a copy: sampling rewrites the rows it is given
      local, first, b = rows[t]
      return r.sampled(params, ({k: v.copy() for k, v in local.items()}, first, b), t)[0]
    ready = r.scored(sampled(want.params, 0), 0, {})[0]
    for t in range(4):
      nxt = sampled(want.params, t + 1) if t < 3 else None
      want, _ = inner(want, ready)
      ready = r.scored(nxt, t + 1, {})[0] if t < 3 else None
    events.clear()
    pipelined = onpolicy.Overlapped(rollout())
    fn = step.jit_train_step(spec, sharding.Placement(), None, None, rollout=pipelined)
    assert fn is pipelined
    pipelined.wrap(recorded_inner).start(lambda i: rows[i][0], 4)
    st, lags = state_lib.create_state(models.init(S_CFG, 1), tx), []
    for t in range(4):
      st, m = fn(st, {k: jnp.asarray(v) for k, v in rows[t][0].items()})
      lags.append(int(m["rollout_lag"]))
      assert m["teacher_requests"] == 8 and m["rollout_length"] > 0
    order = list(events)
    fresh, _ = _train(batches, rollout=rollout(), distill=distill, token_estimator=True)
  finally:
    client.close()
  assert order == [("score", 0), ("train", 0), ("score", 1), ("train", 1), ("score", 2),
                    ("train", 2), ("score", 3), ("train", 3)]
  assert lags == [0, 1, 1, 1] and pipelined.pending() is None
  assert_trees_close(st.params, want.params)
  gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(st.params),
                                                     jax.tree.leaves(fresh)))
  assert gap > 1e-3  # one update old is a different run than the unpipelined one


def test_a_failed_score_stops_the_step(server, tok):
  """Every request answered 500: the client retries, then the step raises ScoringError naming
  the step and row; the state is not trained."""
  proxy = teacher_fixtures.FaultProxy(server.url, lambda n, body: 500)
  client = _client(proxy.url, max_retries=1, backoff_s=0.01)
  texts = teacher_fixtures.demo_texts()
  batch = _batch([_row(tok, texts[0:2], [])])
  st = state_lib.create_state(models.init(S_CFG, 1), optax.sgd(0.5))
  fn = step.jit_train_step(
      step.StepSpec(S_CFG, optax.sgd(0.5), distill=losses.Distill(
          kind="reverse", alpha=1.0, support="served", vocab=V)), sharding.Placement(), None,
      None, rollout=onpolicy.Rollout(ROLLOUT, S_CFG, vocab=V, eos_id=tok.eos_token_id,
                                     seq_len=LENGTH, per_layer=False,
                                     scorer=served.Scorer(client)))
  try:
    with pytest.raises(served.ScoringError, match=r"step 0, row 0.*HTTP 500.*no step trains"):
      fn(st, {k: jnp.asarray(v) for k, v in batch.items() if k != "sampled"})
  finally:
    client.close()
    proxy.stop()
  assert int(st.step) == 0 and proxy.count >= 2  # retried, then stopped


# ---------------------------------------------------------------------------------------------
# The kd job: checks before training.


def _config(tmp_path, url, tok_dir, teacher_tok_dir, **over):
  return teacher_fixtures.job_config("kd", **dict(
      workdir=str(tmp_path / "kd"), model__tokenizer=str(tok_dir), kd__mode="on_policy",
      kd__loss="reverse", kd__rollout__estimator="token", teacher__backend="openai",
      teacher__base_url=url, teacher__model="tiny", teacher__tokenizer=str(teacher_tok_dir),
      teacher__max_retries=2, teacher__backoff_s=0.01) | over)


def test_server_without_prompt_logprobs_fails_naming_the_capability(tmp_path, tok_dir):
  """A llama.cpp-like answer (a completion, no prompt logprobs): MissingCapability at the first
  request, before training, not retried."""
  answer = json.dumps({"choices": [{"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 0}})
  srv = teacher_fixtures.ScriptedServer(lambda n, body: (200, {}, answer))
  try:
    with pytest.raises(backend.MissingCapability,
                       match=r"'openai:tiny'.*without the prompt's logprobs.*'prompt_logprobs'"):
      kd.run(_config(tmp_path, srv.url, tok_dir, tok_dir))
  finally:
    srv.stop()
  assert len(srv.arrivals) == 1 and srv.arrivals[0][2]["echo"] is True
  assert not (tmp_path / "kd" / "checkpoints").exists()


def test_a_server_with_fewer_top_logprobs_fails_at_the_probe_naming_the_setting(tmp_path,
                                                                               tok_dir):
  """teacher.top_logprobs=2 against a server echoing prompt logprobs with only 1 top entry: the
  job's probe request (before training) stops with ScoringError naming teacher.top_logprobs; a
  negative setting is refused before any request."""
  def script(n, body):
    ids = body["prompt"]
    return 200, {}, json.dumps({"choices": [{"text": "", "logprobs": {
        "tokens": [f"token_id:{i}" for i in ids], "token_logprobs": [None] + [-1.0] * (len(ids) - 1),
        "top_logprobs": [None] + [{f"token_id:{i}": -1.0} for i in ids[1:]]}}]})
  srv = teacher_fixtures.ScriptedServer(script)
  try:
    with pytest.raises(served.ScoringError, match=r"probe request.*returned 1 top log-probs.*"
                       r"teacher.top_logprobs=2 asked for 2"):
      kd.run(_config(tmp_path, srv.url, tok_dir, tok_dir, teacher__top_logprobs=2))
    assert len(srv.arrivals) == 1 and srv.arrivals[0][2]["logprobs"] == 2
    with pytest.raises(ValueError, match=r"teacher.top_logprobs=-1: expected an int >= 0"):
      kd.run(_config(tmp_path, srv.url, tok_dir, tok_dir, teacher__top_logprobs=-1))
    assert len(srv.arrivals) == 1
  finally:
    srv.stop()


def test_the_kd_job_asks_for_top_logprobs_when_it_scores_training_steps(tmp_path, tok_dir):
  """teacher.top_logprobs=2 reaches the scorer the job trains with: every request after the
  probe (one per sampled segment of the step) asks for logprobs 2, and the step logs the
  teacher's signal."""
  def script(n, body):
    ids = body["prompt"]
    return 200, {}, json.dumps({"choices": [{"text": "", "logprobs": {
        "tokens": [f"token_id:{i}" for i in ids], "token_logprobs": [None] + [-1.0] * (len(ids) - 1),
        "top_logprobs": [None] + [{f"token_id:{i}": -1.0, f"token_id:{(i + 1) % V}": -2.0}
                                  for i in ids[1:]]}}]})
  srv = teacher_fixtures.ScriptedServer(script)
  try:
    kd.run(_config(tmp_path, srv.url, tok_dir, tok_dir, teacher__top_logprobs=2,
                   train__steps=1, train__batch_size=8, train__eval_every=0, data__seq_len=64,
                   kd__rollout__max_new_tokens=4, export_hf=False))
  finally:
    srv.stop()
  asked = [body["logprobs"] for _, _, body in srv.arrivals]
  assert len(asked) > 1 and asked == [2] * len(asked)


def test_eval_teacher_beside_a_served_teacher_scores_the_held_out_divergences(
    tmp_path, server, tok, tok_dir, teacher_params):
  """kd.eval_teacher with a served teacher: the served model's weights as an HF dir score the
  held-out divergences; at step 0 they equal what a run with that teacher in the step logs (the
  same student, val rows and draws). Without it kd.eval_onpolicy stops naming kd.eval_teacher."""
  t_dir = models.save_hf(T_CFG, teacher_params, tmp_path / "teacher", tokenizer=tok)
  common = dict(kd__eval_onpolicy=True, train__steps=1, train__eval_every=1,
                data__seq_len=64, kd__rollout__max_new_tokens=4, export_hf=False)
  with pytest.raises(ValueError, match=r"kd.eval_onpolicy=True.*kd.eval_teacher"):
    kd.run(_config(tmp_path / "none", server.url, tok_dir, tok_dir, **common))
  kd.run(_config(tmp_path / "served", server.url, tok_dir, tok_dir, kd__eval_teacher=str(t_dir),
                 **common))
  kd.run(_config(tmp_path / "local", server.url, tok_dir, tok_dir, teacher__backend="local",
                 teacher__model_dir=str(t_dir), **common))
  got, want = (metrics.read_scalars(tmp_path / run / "kd" / "tensorboard")
               for run in ("served", "local"))
  for tag in ("eval/kl_teacher", "eval/kl_teacher_reverse", "eval/kl_teacher_onpolicy"):
    assert want[tag][0] > 0.1, tag  # a teacher far from the student
    assert_close(got[tag][0], want[tag][0], rel=1e-5, what=tag)
  assert "train/teacher_requests" in got and "train/teacher_requests" not in want


def test_top_logprobs_steps_add_the_bucketed_term_on_the_same_samples(server, tok):
  """One on-policy step scored by sentijax.serve with and without teacher.top_logprobs=2 (the
  soft fields go through the rollout's batch into the jitted step): the same samples and
  rkl_token, and a loss larger by the (non-negative, here > 0) bucketed reverse KL."""
  texts = teacher_fixtures.demo_texts()
  batches = [_batch([_row(tok, texts[2 * r:2 * r + 2], []) for r in range(2)])]
  client = _client(server.url)
  try:
    runs = [_train(batches, rollout=onpolicy.Rollout(
        ROLLOUT, S_CFG, vocab=V, eos_id=tok.eos_token_id, seq_len=LENGTH, per_layer=False,
        scorer=served.Scorer(client, top_logprobs=n)), distill=losses.Distill(
            kind="reverse", alpha=1.0, support="served", vocab=V))[1][0] for n in (0, 2)]
  finally:
    client.close()
  plain, top = runs
  assert plain["rollout_length"] == top["rollout_length"] > 0
  assert_close(top["rkl_token"], plain["rkl_token"], rel=1e-6, what="rkl_token")
  assert top["loss"] > plain["loss"] + 1e-3 * abs(plain["loss"])


def test_teacher_tokenizer_of_another_vocabulary_fails_naming_both(tmp_path, tok_dir):
  other = tmp_path / "other_tok"
  tok_lib.train_tokenizer(teacher_fixtures.demo_texts(), V - 20, other)
  with pytest.raises(kd.TokenizerMismatch, match=rf"student's tokenizer \({tok_dir}.*"
                                                 rf"teacher's \(teacher.tokenizer={other}"):
    kd.run(_config(tmp_path, "http://127.0.0.1:9/v1", tok_dir, other))


def test_served_config_checks_name_the_key(tmp_path, tok_dir):
  for over, match in [({"kd__rollout__estimator": "full"}, "kd.rollout.estimator='full'.*token"),
                      ({"kd__mode": "online"}, "teacher.backend='openai'.*kd.mode=on_policy"),
                      ({"teacher__tokenizer": ""}, "teacher.tokenizer=''.*tokenizer dir"),
                      ({"kd__temperature": 2.0}, "kd.temperature=2.0"),
                      ({"teacher__backend": "vllm"}, r"teacher.backend='vllm'.*expected one of"),
                      ({"teacher__model_dir": str(tok_dir)}, "teacher.model_dir=.*leave"),
                      ({"kd__rollout__overlap": True, "teacher__backend": "local"},
                       "kd.rollout.overlap=True.*teacher.backend=openai"),
                      ({"kd__rollout__overlap": True, "kd__mode": "online"},
                       "kd.rollout.overlap=True.*only for kd.mode=on_policy"),
                      ({"kd__eval_teacher": str(tok_dir), "teacher__backend": "local",
                        "teacher__preset": "tiny"},
                       "kd.eval_teacher=.*only for kd.mode=offline or a served teacher")]:
    with pytest.raises(ValueError, match=match):
      kd.KDSpec.from_config(_config(tmp_path, "http://127.0.0.1:9/v1", tok_dir, tok_dir, **over))
  spec = kd.KDSpec.from_config(_config(tmp_path, "http://127.0.0.1:9/v1", tok_dir, tok_dir))
  assert spec.served and kd.teacher_config(spec) is None
  assert spec.distill(V) == losses.Distill(kind="reverse", alpha=0.5, support="served", vocab=V)


# ---------------------------------------------------------------------------------------------
# The job from the command line against the in-process server: SIGKILL mid-run, resume.

STEPS = 8


def _main(workdir, url, tok_dir, *flags):
  return start_main("kd", workdir, "--config.kd.mode=on_policy", "--config.kd.lmbda=0.5",
                    "--config.kd.loss=reverse", "--config.kd.rollout.estimator=token",
                    "--config.kd.rollout.max_new_tokens=8", "--config.teacher.backend=openai",
                    f"--config.teacher.base_url={url}", "--config.teacher.model=tiny",
                    f"--config.teacher.tokenizer={tok_dir}", "--config.data.seq_len=64",
                    f"--config.train.steps={STEPS}", "--config.train.eval_every=0",
                    "--config.train.log_every=1", "--config.checkpoint.every=2",
                    "--config.checkpoint.async_save=False", *flags)


@pytest.mark.parametrize("overlap", [False, True], ids=["scored_in_step", "overlap"])
def test_main_killed_mid_run_resumes_to_identical_params(tmp_path, server, tok_dir, overlap):
  """kd.lmbda 0.5 (sampled rows scored by the server, corpus rows on CE): a run SIGKILLed after
  a checkpoint and rerun recomputes the scores of the steps it redoes (same tokens from (seed,
  step, row), the same teacher-forced scores) and ends on the uninterrupted run's params. With
  kd.rollout.overlap the checkpoint holds the batch prepared (sampled one update earlier) for
  its step, and the resumed run trains on it."""
  flags = [f"--config.kd.rollout.overlap={overlap}"]
  ref = _main(tmp_path / "ref", server.url, tok_dir, *flags)
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out[-3000:]
  assert f"KD done at step {STEPS}" in out and "train/teacher_score_s" in out
  assert ("train/rollout_lag" in out) == overlap
  work = tmp_path / "killed"
  killed_at, out = kill_then_resume(lambda w: _main(w, server.url, tok_dir, *flags), work,
                                    at_least=2, steps=STEPS, timeout=300, final_timeout=600)
  assert f"resumed from {work / 'checkpoints'} at step {killed_at}" in out
  if overlap:  # the resumed step trained on the checkpoint's batch (sampled before it), not
    # on one sampled now (nearly the same params sample nearly the same tokens here)
    assert f"step {killed_at}: the batch prepared before the checkpoint restored" in out
    assert re.search(rf"step {killed_at + 1} train/.*train/rollout_lag=1\b", out), out[-3000:]
  want = safetensors.numpy.load_file(str(tmp_path / "ref" / "hf" / "model.safetensors"))
  got = safetensors.numpy.load_file(str(work / "hf" / "model.safetensors"))
  assert_trees_close(got, want)  # reduction-order noise only (a resampled step moves far more)
