"""On-policy distillation: the sampled-token reverse-KL estimator against float64 numpy, on-policy
training against CE on teacher text on a teacher with a known distribution, rollouts sharded
over 8 devices = 1 device, the kd job killed mid-run resumes to the uninterrupted run's params."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.sampling import SamplingSettings
from sentijax.train import kd, losses, onpolicy, served, state as state_lib, step
from kill_resume import kill_then_resume, start_main
from tolerances import assert_close, assert_trees_close

REPO = Path(__file__).resolve().parents[2]
RULES = config_lib.base().sharding_rules


def _np_softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The estimator: log q(x) - log p(x) at a token x ~ q.


def test_token_estimator_expectation_and_gradient_equal_the_exact_reverse_kl():
  """V = 7, 3 positions. Enumerated over every token x (weights q(x)), the estimate's mean is
  KL(q || p) and the surrogate's mean gradient is grad KL = q_j (log q_j - log p_j - KL), both
  in float64 numpy (fp32 rounding only). Sampled, R = 20000 draws per position (fixed seed):
  the means lie within 5 standard errors of the exact values."""
  v, rows = 7, 3
  rng = np.random.default_rng(3)
  z = rng.normal(size=(1, rows, v)) * 1.5
  t = rng.normal(size=(1, rows, v)) * 1.5
  q, p = _np_softmax(z), _np_softmax(t)
  exact = (q * np.log(q / p)).sum(-1)[0]  # [rows]
  exact_grad = (q * (np.log(q / p) - exact[None, :, None]))[0]  # [rows, V]
  log_p = np.log(p)

  def per_token(zz, tokens):  # [R, rows] surrogate and estimate at the given tokens
    t_logp = np.take_along_axis(np.broadcast_to(log_p, (tokens.shape[0],) + log_p.shape[1:]),
                                tokens[..., None], -1)[..., 0]
    return losses.token_reverse_kl(zz, jnp.asarray(tokens), jnp.asarray(t_logp, jnp.float32))

  def value_and_grads(tokens):
    r = tokens.shape[0]
    zz = jnp.broadcast_to(jnp.asarray(z, jnp.float32), (r, rows, v))
    est = np.asarray(per_token(zz, tokens)[1], np.float64)
    grads = np.asarray(jax.grad(lambda a: jnp.sum(per_token(a, tokens)[0]))(zz), np.float64)
    return est, grads

  every = np.broadcast_to(np.arange(v, dtype=np.int32)[:, None], (v, rows))  # draw r = token r
  est, grads = value_and_grads(every)
  w = q[0].T  # [V, rows]: q(x) at each position
  assert_close((w * est).sum(0), exact, rel=1e-5, what="E_q[estimate]")
  assert_close((w[..., None] * grads).sum(0), exact_grad, rel=1e-5, what="E_q[gradient]")
  # Value of the surrogate = the estimate (what train/rkl_token reports).
  surrogate = np.asarray(per_token(jnp.broadcast_to(jnp.asarray(z, jnp.float32), (v, rows, v)),
                                   every)[0])
  # surrogate = est + est * (log q - log q): est exactly, or a few fp32 ulps of est * log q off
  # where XLA evaluates log q twice; the bound is scaled to those magnitudes.
  log_q_at = np.log(q[0]).T  # [V, rows]: log q(x) of draw r = token r
  np.testing.assert_allclose(surrogate, est, rtol=0,
                             atol=8 * np.finfo(np.float32).eps * np.abs(est * log_q_at).max())

  r = 20000
  draws = np.stack([rng.choice(v, r, p=q[0, i]) for i in range(rows)], 1).astype(np.int32)
  est, grads = value_and_grads(draws)
  se = est.std(0) / np.sqrt(r)
  assert (np.abs(est.mean(0) - exact) < 5 * se).all(), (est.mean(0), exact, se)
  g_se = grads.std(0) / np.sqrt(r)
  assert (np.abs(grads.mean(0) - exact_grad) < 5 * g_se + 1e-7).all()
  assert (se < 0.1 * exact).all()  # the bound means something


# ---------------------------------------------------------------------------------------------
# A teacher with a known distribution: a bigram language (as in test_kd.py).

V = 64
TRANS = np.random.default_rng(99).dirichlet(np.full(V - 1, 0.2), size=V)
PROMPT, LENGTH = 4, 24  # prompt tokens; packed row length
T_CFG = models.presets.get("tiny").replace(vocab_size=V, hidden_size=V, intermediate_size=128,
                                           tie_embeddings=False)
S_CFG = T_CFG.replace(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                      tie_embeddings=True)
EOS = 0  # the teacher never writes it (logit -30): responses run to the row's end


def _oracle_teacher():
  """Next-token distribution = TRANS[previous token] (see test_kd._oracle_teacher)."""
  p = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), models.param_shapes(T_CFG))
  p["embedding"] = np.eye(V, dtype=np.float32)
  p["final_norm"]["scale"][:] = 1 / np.sqrt(V)
  p["lm_head"][:] = -30.0
  p["lm_head"][:, 1:] = np.log(TRANS)
  return step.Teacher(T_CFG, p)


def _teacher_text(rng, rows):
  toks = np.zeros((rows, LENGTH + 1), np.int32)
  toks[:, 0] = rng.integers(1, V, rows)
  for t in range(LENGTH):
    for r in range(rows):
      toks[r, t + 1] = 1 + rng.choice(V - 1, p=TRANS[toks[r, t]])
  return toks


def _batches(seed, n, rows=8):
  """Packed rows of teacher text: PROMPT tokens of prompt, the rest response."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    toks = _teacher_text(rng, rows)
    w = np.ones((rows, LENGTH), np.float32)
    w[:, :PROMPT - 1] = 0  # targets[PROMPT - 1] = the first response token
    out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": w,
                "segment_ids": np.ones((rows, LENGTH), np.int32),
                "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (rows, 1))})
  return out


ROLLOUT_SAMPLING = SamplingSettings(temperature=1.0, max_tokens=LENGTH + 1 - PROMPT, seed=0)


def _rollout_spec(lmbda=1.0, **kw):
  return onpolicy.RolloutSpec(lmbda=lmbda, seq_kd=False, sampling=ROLLOUT_SAMPLING, **kw)


def _held_out_reverse_kl(params, teacher, seed=5, rows=32):
  """Per-token KL(q || p) over the student's own continuations of held-out prompts: ancestral
  sampling in numpy from full forwards (not the KV-cache sampler), exact float64 KL per step."""
  rng = np.random.default_rng(seed)
  ids = _teacher_text(rng, rows)[:, :LENGTH]
  s_apply = jax.jit(lambda p, x: models.apply(S_CFG, p, x))
  t_apply = jax.jit(lambda p, x: models.apply(T_CFG, p, x))
  total = 0.0
  for t in range(PROMPT - 1, LENGTH - 1):
    q = _np_softmax(np.asarray(s_apply(params, ids), np.float64)[:, t])
    p = _np_softmax(np.asarray(t_apply(teacher.params, ids), np.float64)[:, t])
    total += float((q * (np.log(q) - np.log(np.maximum(p, 1e-300)))).sum(-1).mean())
    ids[:, t + 1] = [rng.choice(V, p=row) for row in q]
  return total / (LENGTH - PROMPT)


def _train(batches, *, rollout=None, distill=None, teacher=None, params=None, mesh=None,
           tx=None, cfg=S_CFG, token_estimator=False):
  tx = optax.adam(1e-2) if tx is None else tx
  st = state_lib.create_state(models.init(cfg, 1) if params is None else params, tx)
  state_sh = batch_sh = None
  if mesh is not None:
    state_sh = state_lib.state_shardings(cfg, tx, mesh, RULES)
    batch_sh = sharding.batch_sharding(mesh, RULES)
    st = jax.device_put(st, state_sh)
  spec = step.StepSpec(cfg, tx, distill=distill, token_estimator=token_estimator)
  fn = step.jit_train_step(spec, sharding.Placement(mesh, RULES), state_sh, batch_sh,
                           teacher=teacher, rollout=rollout)
  metrics = []
  for b in batches:
    st, m = fn(st, {k: jnp.asarray(v) for k, v in b.items()})
    metrics.append(jax.device_get(m))
  return st.params, metrics


def test_on_policy_reaches_lower_reverse_kl_than_ce_on_teacher_text():
  """Same student init, 20 batches of 8 prompts, Adam 1e-2: CE on the teacher's text vs fully
  on-policy (lmbda 1) reverse KL to the teacher on the student's own samples. Held-out
  per-token reverse KL on the student's continuations, measured: init 3.86, CE 3.15,
  on-policy 1.49."""
  teacher = _oracle_teacher()
  data = _batches(0, 20)
  init = models.init(S_CFG, 1)
  kl = {"init": _held_out_reverse_kl(init, teacher)}
  ce, _ = _train(data)
  kl["ce"] = _held_out_reverse_kl(ce, teacher)
  rollout = onpolicy.Rollout(_rollout_spec(), S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH,
                             per_layer=False)
  on, m = _train(data, rollout=rollout, distill=losses.Distill(kind="reverse", alpha=1.0),
                 teacher=teacher)
  kl["on_policy"] = _held_out_reverse_kl(on, teacher)
  assert kl["on_policy"] < 0.6 * kl["ce"] and kl["ce"] < kl["init"], kl
  # The metrics: every row sampled; the random student writes eos (token 0) at times, which
  # ends its response (mean length 17.5 of at most 21 at step 0); the per-token estimate falls.
  assert m[0]["onpolicy_fraction"] == 1.0 and 1 < m[0]["rollout_length"] < LENGTH + 1 - PROMPT
  assert m[0]["rollout_tokens_per_s"] > 0 and m[0]["rollout_dropped"] == 0
  assert m[-1]["rkl_token"] < 0.6 * m[0]["rkl_token"], (m[0]["rkl_token"], m[-1]["rkl_token"])


def test_token_estimator_in_the_step_is_the_policy_gradient_on_the_samples():
  """kd.rollout.estimator=token: on the student's own samples the step's term is
  sum_t sg(log q(x_t) - log p(x_t)) log q(x_t) (gradient) with the value sum_t (log q - log p)
  = train/rkl_token, against a reference from both models' full logits (models.apply, not the
  chunked loss). On a corpus row (lmbda 0.5) the full reverse KL stays."""
  teacher = _oracle_teacher()
  params = models.init(S_CFG, 1)
  st = state_lib.create_state(params, optax.adam(1e-3))
  rollout = onpolicy.Rollout(_rollout_spec(0.5), S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH,
                             per_layer=False)
  batch, _ = rollout(st, {k: jnp.asarray(v) for k, v in _batches(3, 1)[0].items()})
  distill = losses.Distill(kind="reverse", alpha=1.0)

  def loss(p):
    t = step.loss_terms(S_CFG, p, batch, 4, distill, T_CFG, teacher.params, token_estimator=True)
    return t["loss"] / t["tokens"], t
  (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)

  x, s, w = batch["targets"], batch["sampled"], batch["weights"]
  log_p = jnp.take_along_axis(jax.nn.log_softmax(models.apply(T_CFG, teacher.params,
                                                              batch["inputs"]), -1),
                              x[..., None], -1)[..., 0]

  def ref(p):
    logits = models.apply(S_CFG, p, batch["inputs"])
    log_q_all = jax.nn.log_softmax(logits, -1)
    log_q = jnp.take_along_axis(log_q_all, x[..., None], -1)[..., 0]
    adv = jax.lax.stop_gradient(log_q - log_p)
    full = jnp.sum(jnp.exp(log_q_all) * (log_q_all - jax.nn.log_softmax(
        models.apply(T_CFG, teacher.params, batch["inputs"]), -1)), -1)
    return (jnp.sum(adv * log_q * s) + jnp.sum(full * w * (1 - s))) / jnp.sum(w), (adv, full)
  want_grads, (adv, full) = jax.grad(ref, has_aux=True)(params)
  want_value = (jnp.sum(adv * s) + jnp.sum(full * w * (1 - s))) / jnp.sum(w)
  assert 0 < float(jnp.sum(s)) < float(jnp.sum(w))  # both kinds of rows are in the batch
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  np.testing.assert_allclose(float(terms["rkl_token"]), float(jnp.sum(adv * s)), rtol=1e-5)
  # fp32 logits from two code paths (chunked vs whole): ~1e-6 relative per element.
  assert_trees_close(grads, want_grads, rtol=1e-4)


def test_rollout_rows_sharded_equal_single_device():
  """lmbda 0.5 of 8 rows: the sampled rows (same tokens: keys by step and row), the kept corpus
  rows, the 'sampled' mask, and the params after 3 steps (JSD on all rows + CE on the corpus
  rows): data=2 x fsdp=2 x tensor=2 = one device. Plain SGD: Adam's 1 / sqrt(v) would blow a
  near-zero gradient's reduction-order noise up to a full step."""
  teacher = _oracle_teacher()
  data = _batches(1, 3)
  distill = losses.Distill(kind="jsd", beta=0.9, alpha=0.5)
  cfg = S_CFG.replace(num_kv_heads=2)  # kv heads split over tensor=2
  params = jax.tree.map(np.asarray, models.init(cfg, 2))  # host copies: steps donate state
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

  def rollout(m):
    return onpolicy.Rollout(_rollout_spec(0.5), cfg, vocab=V, eos_id=EOS, seq_len=LENGTH,
                            placement=sharding.Placement(m, RULES), per_layer=False)
  st = state_lib.create_state(params, optax.adam(3e-3))
  one, _ = rollout(None)(st, {k: jnp.asarray(v) for k, v in data[0].items()})
  t_placed = jax.device_put(teacher.params, models.shardings_for(T_CFG, mesh, RULES))
  st8 = jax.device_put(st, state_lib.state_shardings(cfg, optax.adam(3e-3), mesh, RULES))
  eight, _ = rollout(mesh)(st8, {k: jnp.asarray(v) for k, v in data[0].items()})
  for k in one:
    np.testing.assert_array_equal(np.asarray(eight[k]), np.asarray(one[k]), err_msg=k)
  np.testing.assert_array_equal(one["inputs"][4:], data[0]["inputs"][4:])  # corpus rows kept
  assert (one["inputs"][:4, PROMPT:] != data[0]["inputs"][:4, PROMPT:]).any()  # sampled
  np.testing.assert_array_equal(one["inputs"][:4, :PROMPT], data[0]["inputs"][:4, :PROMPT])
  np.testing.assert_array_equal(one["sampled"][:4], one["weights"][:4])  # the new responses
  assert (one["weights"][:4, PROMPT - 1] == 1).all() and not one["weights"][:4, :PROMPT - 1].any()
  assert not one["sampled"][4:].any()

  want, _ = _train(data, rollout=rollout(None), distill=distill, teacher=teacher, params=params,
                 cfg=cfg, tx=optax.sgd(1.0))
  got, m = _train(data, rollout=rollout(mesh), distill=distill,
                  teacher=step.Teacher(T_CFG, t_placed), params=params, mesh=mesh, cfg=cfg,
                  tx=optax.sgd(1.0))
  assert_trees_close(got, want)
  assert m[0]["onpolicy_fraction"] == 0.5 and np.isfinite(m[0]["rkl_token"])


def test_seq_kd_samples_from_the_teacher():
  """kd.seq_kd: the teacher writes the responses (every token a teacher bigram successor, never
  the student's own: no 'sampled' mask, so CE trains on them)."""
  teacher = _oracle_teacher()
  batch = _batches(2, 1)[0]
  spec = onpolicy.RolloutSpec(lmbda=1.0, seq_kd=True, sampling=ROLLOUT_SAMPLING)
  st = state_lib.create_state(models.init(S_CFG, 1), optax.adam(1e-3))
  out, m = onpolicy.Rollout(spec, S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH, teacher=teacher,
                            per_layer=False)(st, {k: jnp.asarray(v) for k, v in batch.items()})
  toks = np.asarray(out["inputs"])
  assert (toks[:, PROMPT:] != batch["inputs"][:, PROMPT:]).any()
  # Each sampled token follows its predecessor with teacher probability > 0 (the random student
  # puts mass on token 0 and on every successor; the teacher's zero is TRANS's floor).
  succ = TRANS[toks[:, PROMPT - 1:-1], toks[:, PROMPT:] - 1]
  assert (toks[:, PROMPT:] > 0).all() and (succ > 1e-12).all()
  assert not np.asarray(out["sampled"]).any() and m["rollout_length"] == LENGTH + 1 - PROMPT
  with pytest.raises(ValueError, match="seq_kd=True samples from the teacher"):
    onpolicy.Rollout(spec, S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH)


def test_stop_ids_end_sampled_responses_where_they_are_drawn():
  """kd.rollout.stop: a sampled token holding a stop string ends the response there (kept and
  trained on). Here every token but eos is a stop token: each response is its first token."""
  batch = _batches(3, 1)[0]
  st = state_lib.create_state(models.init(S_CFG, 1), optax.adam(1e-3))
  stop = [i for i in range(V) if i != EOS]
  out, m = onpolicy.Rollout(_rollout_spec(), S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH,
                            per_layer=False, stop_ids=stop)(
                                st, {k: jnp.asarray(v) for k, v in batch.items()})
  assert m["rollout_length"] == 1.0
  sampled = np.asarray(out["sampled"])
  np.testing.assert_array_equal(sampled.sum(-1), np.ones(len(sampled)))  # one token per row
  assert (sampled[:, PROMPT - 1] == 1).all()
  free, m_free = onpolicy.Rollout(_rollout_spec(), S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH,
                                  per_layer=False)(
                                      st, {k: jnp.asarray(v) for k, v in batch.items()})
  assert m_free["rollout_length"] > 1.0  # without stop ids the same rows run on
  config = config_lib.base()
  config.kd = config_lib.kd()
  config.kd.rollout.stop = "\n|###"
  assert onpolicy.RolloutSpec.from_config(config).sampling.stop == ("\n", "###")


def test_config_checks_name_the_key():
  spec = importlib.util.spec_from_file_location("kd_config", REPO / "configs" / "kd.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)

  def kd_spec(**kw):
    c = mod.get_config()
    c.kd.mode = "on_policy"
    for k, v in kw.items():
      node = c
      *path, last = k.split("__")
      for p in path:
        node = node[p]
      node[last] = v
    return kd.KDSpec.from_config(c)
  s = kd_spec(kd__lmbda=0.25, kd__rollout__max_new_tokens=7)
  assert s.online and s.rollout.lmbda == 0.25 and s.rollout.sampling.max_tokens == 7
  assert s.distill(1000) == losses.Distill(kind="forward", alpha=0.5, vocab=1000)
  assert kd_spec(kd__loss="reverse", kd__rollout__estimator="token").rollout.estimator == "token"
  for kw, match in [({"kd__lmbda": 1.5}, "kd.lmbda=1.5"),
                    ({"kd__rollout__temperature": 0.0}, "kd.rollout.temperature=0.0"),
                    ({"kd__rollout__top_p": 0.0}, "kd.rollout.top_p"),
                    ({"kd__rollout__max_new_tokens": 0}, "kd.rollout.max_new_tokens"),
                    ({"kd__loss": "ce"}, "kd.loss='ce'.*on_policy"),
                    ({"kd__rollout__estimator": "pg"}, r"kd.rollout.estimator='pg'.*'token'"),
                    ({"kd__rollout__estimator": "token"}, "kd.loss=reverse.*'forward'"),
                    ({"kd__rollout__estimator": "token", "kd__loss": "reverse",
                      "kd__seq_kd": True}, "kd.seq_kd=False"),
                    ({"teacher__preset": ""}, "kd.mode=on_policy needs teacher.model_dir")]:
    with pytest.raises(ValueError, match=match):
      kd_spec(**kw)


# ---------------------------------------------------------------------------------------------
# The job from the command line: SIGKILL mid-run, resume, same params as an uninterrupted run.

STEPS = 12


def _main(workdir):
  return start_main("kd", workdir, "--config.kd.mode=on_policy", "--config.kd.lmbda=0.5",
                    "--config.kd.loss=reverse", "--config.kd.rollout.max_new_tokens=8",
                    "--config.data.seq_len=64", f"--config.train.steps={STEPS}",
                    "--config.train.eval_every=0", "--config.train.log_every=4",
                    "--config.checkpoint.every=2", "--config.checkpoint.async_save=False")


def test_main_killed_mid_run_resumes_to_identical_params(tmp_path):
  ref = _main(tmp_path / "ref")
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out[-3000:]
  assert f"KD done at step {STEPS}" in out and "train/rollout_tokens_per_s" in out

  work = tmp_path / "killed"
  killed_at, out = kill_then_resume(_main, work, at_least=4, steps=STEPS, timeout=300,
                                     final_timeout=600)
  assert f"resumed from {work / 'checkpoints'} at step {killed_at}" in out
  want = safetensors.numpy.load_file(str(tmp_path / "ref" / "hf" / "model.safetensors"))
  got = safetensors.numpy.load_file(str(work / "hf" / "model.safetensors"))
  # Same params, same rollout keys (seed, step, row), same data: normally bit-identical; the
  # bound admits only reduction-order noise (one step sampled with other keys moves the params
  # by > 1e-3 of their scale).
  assert_trees_close(got, want)


def test_a_scoring_failure_on_one_process_stops_every_process(monkeypatch):
  """Two processes (process count and allgather faked): a served teacher's failure on one is
  gathered with the step's metrics, so the failing process raises its own error and the other
  ScoringError naming it, both after the same one gather (none left waiting at it); without a
  failure the requests and retries are summed, the seconds the slowest process's."""
  gathered = []

  def other_process(row):
    def allgather(x):
      gathered.append(np.asarray(x).shape)
      return np.stack([np.asarray(x), np.asarray(row, np.float32)])
    return allgather
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  mine = {"teacher_requests": 3, "teacher_retries": 1, "teacher_score_s": 0.5}
  monkeypatch.setattr(onpolicy.distributed, "allgather", other_process([1, 0, 0, 0]))
  with pytest.raises(served.ScoringError, match=r"step 7: process\(es\) \[1\] could not score"):
    onpolicy.served_metrics(mine, 7)

  def failing(local, step):
    raise ConnectionError("server gone")
  rollout = onpolicy.Rollout(_rollout_spec(), S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH,
                             scorer=failing)
  with pytest.raises(ConnectionError, match="server gone"):  # its own error, after the gather
    rollout.scored({"targets": np.zeros((2, LENGTH), np.int32)}, 7, {})
  assert gathered == [(4,), (4,)]
  monkeypatch.setattr(onpolicy.distributed, "allgather", other_process([0, 5, 0, 2.0]))
  assert onpolicy.served_metrics(mine, 7) == {"teacher_requests": 8, "teacher_retries": 1,
                                              "teacher_score_s": 2.0}
