"""On-policy ICLDist (train/icl_onpolicy.py): student and teacher rows carry the student's sampled
answer at the same positions, the loss counts exactly those tokens; student_shots = k is the
ordinary on-policy path; the divergence against a float64 reference of teacher(k-shot) vs
student(0-shot); a served teacher's steps equal the local teacher's; the icldist job SIGKILLed
mid-run resumes to the uninterrupted run's params; bad settings name their key."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from sentijax import metrics, models, serve, sharding
from sentijax.data import packing, sequences
from sentijax.sampling import SamplingSettings
from sentijax.teacher.local import LocalTeacher
from sentijax.teacher.openai_api import ClientSpec, OpenAITeacher
from sentijax.train import icl_onpolicy, icldist, losses, onpolicy, served, state as state_lib
from sentijax.train import step
from kill_resume import kill_then_resume, start_main
from teacher import teacher_fixtures
from tolerances import assert_close, assert_trees_close

V = teacher_fixtures.VOCAB  # the test tokenizer's length = both models' vocab
T_CFG = models.presets.get("tiny").replace(vocab_size=V, max_position_embeddings=256)
S_CFG = T_CFG.replace(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
LENGTH, EOS, MAX_NEW = 72, 0, 6
SAMPLING = SamplingSettings(temperature=1.0, max_tokens=MAX_NEW, seed=5)


def _spec(lmbda=1.0, **kw):
  return onpolicy.RolloutSpec(lmbda=lmbda, seq_kd=False, sampling=SAMPLING, **kw)


@pytest.fixture(scope="module")
def params():
  """A random student whose samples depend on its prompt (x3: at the init's scale the tiny model
  samples the same tokens after any prompt ending in the same token, with the same keys)."""
  return jax.tree.map(lambda x: 3 * np.asarray(x), models.init(S_CFG, 1))


def _terms(distill, chunk=0, **kw):
  """step.loss_terms of the student (S_CFG) and the T_CFG teacher, jitted."""
  return jax.jit(lambda p, b, tp: step.loss_terms(S_CFG, p, b, chunk, distill, T_CFG, tp, **kw))


@pytest.fixture(scope="module")
def teacher_params():
  """A random teacher far from the student, every weight x3: its next-token log-probs spread
  over ~10 nats and move by ~5 nats without the demos (so a teacher reading the wrong context or
  positions shows)."""
  return jax.tree.map(lambda x: 3 * np.asarray(x), models.init(T_CFG, 7))


def _examples(rng, n, k=3):
  """n (teacher prompt, student prompts by shots, gold answer): an instruction, k demos, a
  query; the student's prompt keeps the instruction, its first demos and the query."""
  out = []
  for _ in range(n):
    instr, query = rng.integers(1, V, 4), rng.integers(1, V, 3)
    demos = [rng.integers(1, V, int(rng.integers(4, 7))) for _ in range(k)]
    students = [np.concatenate([instr, *demos[:s], query]).astype(np.int32) for s in range(k + 1)]
    answer = np.append(rng.integers(1, V, int(rng.integers(1, 3))), EOS).astype(np.int32)
    out.append((students[-1], students, answer))
  return out


def _batch(examples, per_row=2):
  """Rows of the teacher's k-shot prompts with gold answers, `per_row` segments each."""
  rows = []
  for i in range(0, len(examples), per_row):
    seqs = [sequences.TokenizedSequence(
        np.concatenate([t, a]), np.r_[np.zeros(len(t)), np.ones(len(a))].astype(np.int32))
        for t, _, a in examples[i:i + per_row]]
    rows.append(packing.pack_row(seqs, LENGTH))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _student_of(examples, shots):
  return {t.tobytes(): s[shots] for t, s, _ in examples}


def _rollout(lmbda=1.0, scorer=None, **kw):
  return onpolicy.Rollout(_spec(lmbda, **kw), S_CFG, vocab=V, eos_id=EOS, seq_len=LENGTH,
                          per_layer=False, scorer=scorer)


def _side(row, inputs, seg_ids, seg):
  """A segment's own tokens in a row (inputs, then the last target) and where they lie."""
  where = np.flatnonzero(row[seg_ids] == seg)
  return np.append(row[inputs][where], row["targets"][where[-1]]), where


def test_student_and_teacher_rows_share_the_answer_positions_and_the_loss_counts_it(
    params, teacher_params):
  """8 examples, 2 per row, kd.lmbda 0.5: rows 0-1 answered by the student (its samples for its
  0-shot prompts, the same as `Rollout.sample` gives for those prompts at this step), rows 2-3
  keep the gold answer. Per segment: the student's side is its 0-shot prompt + the answer, the
  teacher's its 3-shot prompt + the same answer, both ending at the same position, positions
  counting from 0 where each starts; the student's left padding is segment 0; weights (and
  'sampled' on rows 0-1) exactly on the answer; the step counts those tokens."""
  examples = _examples(np.random.default_rng(0), 8)
  batch = _batch(examples)
  st = state_lib.create_state(params, optax.sgd(0.1))
  rollout = _rollout(0.5)
  out, m = icl_onpolicy.ICLRollout(rollout, _student_of(examples, 0))(
      st, {k: jnp.asarray(v) for k, v in batch.items()})
  out = {k: np.asarray(v) for k, v in out.items()}
  sampled = rollout.sample(params, [s[0] for _, s, _ in examples[:4]], 0)
  answers = sampled + [a for _, _, a in examples[4:]]
  assert any(len(a) != len(g) or (a != g).any() for a, (_, _, g) in zip(sampled, examples))
  n_answer = 0
  for i, (t_prompt, students, _) in enumerate(examples):
    r, seg, answer = i // 2, i % 2 + 1, answers[i]
    row = {k: v[r] for k, v in out.items()}
    s_tokens, s_where = _side(row, "inputs", "segment_ids", seg)
    t_tokens, t_where = _side(row, "teacher_inputs", "teacher_segment_ids", seg)
    np.testing.assert_array_equal(s_tokens, np.concatenate([students[0], answer]))
    np.testing.assert_array_equal(t_tokens, np.concatenate([t_prompt, answer]))
    assert s_where[-1] == t_where[-1] and len(np.unique(np.diff(s_where))) == 1
    np.testing.assert_array_equal(row["positions"][s_where], np.arange(len(s_where)))
    np.testing.assert_array_equal(row["teacher_positions"][t_where], np.arange(len(t_where)))
    pad = np.setdiff1d(t_where, s_where)  # the teacher's extra demos: student padding
    assert len(pad) == len(t_prompt) - len(students[0]) and not row["segment_ids"][pad].any()
    on = t_where[-len(answer):]
    np.testing.assert_array_equal(row["targets"][on], answer)
    assert (row["weights"][on] == 1).all() and (row["sampled"][on] == (r < 2)).all()
    n_answer += len(answer)
  assert out["weights"].sum() == n_answer  # nothing else counts
  assert out["sampled"].sum() == sum(len(a) for a in sampled)
  assert m["onpolicy_fraction"] == 0.5 and m["rollout_dropped"] == 0
  assert m["rollout_length"] == np.mean([len(a) for a in sampled])
  terms = _terms(losses.Distill(kind="reverse", alpha=1.0))(params, out, teacher_params)
  assert float(terms["tokens"]) == n_answer
  assert float(terms["sampled_tokens"]) == out["sampled"].sum()


def test_student_shots_equal_k_is_the_ordinary_on_policy_path(params, teacher_params):
  """student_shots = k: the student's prompt is the teacher's; the rows equal onpolicy.Rollout's
  (same samples, same packing), the teacher fields equal the student's, the loss and its
  gradient equal the ordinary on-policy step's (JSD, lmbda 0.5: CE + divergence on gold rows)."""
  examples = _examples(np.random.default_rng(1), 8)
  batch = {k: jnp.asarray(v) for k, v in _batch(examples).items()}
  st = state_lib.create_state(params, optax.sgd(0.1))
  icl, _ = icl_onpolicy.ICLRollout(_rollout(0.5), _student_of(examples, 3))(st, batch)
  plain, _ = _rollout(0.5)(st, batch)
  for k in plain:
    np.testing.assert_array_equal(np.asarray(icl[k]), np.asarray(plain[k]), err_msg=k)
  for t, s in zip(step.TEACHER_FIELDS, icl_onpolicy.STUDENT):
    np.testing.assert_array_equal(np.asarray(icl[t]), np.asarray(plain[s]), err_msg=t)
  d = losses.Distill(kind="jsd", beta=0.3, alpha=0.5)

  @jax.jit
  def loss(p, b):
    terms = step.loss_terms(S_CFG, p, b, 16, d, T_CFG, teacher_params)
    return terms["loss"] / terms["tokens"]
  want, want_g = jax.value_and_grad(loss)(params, plain)
  got, got_g = jax.value_and_grad(loss)(params, icl)
  assert float(got) == float(want)
  assert_trees_close(got_g, want_g, rtol=0)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_divergence_is_teacher_k_shot_vs_student_zero_shot(params, teacher_params):
  """One row of two segments (0-shot student, 3-shot teacher, the student's sampled answers):
  the step's full-vocabulary reverse KL and the sampled-token estimate (rkl_token) equal a
  float64 reference from each model's forward of its own sequence ALONE (student: 0-shot prompt
  + answer; teacher: 3-shot prompt + answer), summed over the answer tokens. The teacher's
  context matters: against its 0-shot forward the reference differs by far more than the
  bound."""
  examples = _examples(np.random.default_rng(2), 2)
  st = state_lib.create_state(params, optax.sgd(0.1))
  out, _ = icl_onpolicy.ICLRollout(_rollout(), _student_of(examples, 0))(
      st, {k: jnp.asarray(v) for k, v in _batch(examples).items()})
  answers = _rollout().sample(params, [s[0] for _, s, _ in examples], 0)
  terms = _terms(losses.Distill(kind="reverse", alpha=1.0))(params, out, teacher_params)

  def reference(teacher_prompts):
    kl = est = 0.0
    for (_, students, _), t_prompt, answer in zip(examples, teacher_prompts, answers):
      s_seq, t_seq, n = (np.concatenate([students[0], answer]),
                         np.concatenate([t_prompt, answer]), len(answer))
      log_q = _np_log_softmax(models.apply(S_CFG, params, jnp.asarray(s_seq[None, :-1])))[0][-n:]
      log_p = _np_log_softmax(models.apply(T_CFG, teacher_params,
                                           jnp.asarray(t_seq[None, :-1])))[0][-n:]
      kl += float((np.exp(log_q) * (log_q - log_p)).sum())
      est += float((log_q - log_p)[np.arange(n), answer].sum())
    return kl, est
  kl, est = reference([t for t, _, _ in examples])
  assert_close(terms["kd"], kl, rel=1e-5, what="reverse KL")
  assert_close(terms["rkl_token"], est, rel=1e-5, what="rkl_token")
  kl0, _ = reference([s[0] for _, s, _ in examples])  # the teacher without its demos
  assert abs(kl0 - kl) > 1e-2 * abs(kl), (kl0, kl)  # measured: 5% (19.7 vs 18.7)


def test_held_out_kl_teacher_is_teacher_k_shot_vs_student_own_prompt(params, teacher_params):
  """eval/kl_teacher: KL(teacher || student) per gold-answer token over 3 val queries (batches of
  2, the last padded), the teacher on its 3-shot prompt, the student on its 1-shot one, against
  float64 numpy from each model's forward of its own sequence alone."""
  examples = _examples(np.random.default_rng(4), 3)
  ctx = types.SimpleNamespace(mesh=None, rules=None, teacher=step.Teacher(T_CFG, teacher_params))
  hook = icl_onpolicy.kl_teacher_hook(ctx, S_CFG, [(s[1], t, a) for t, s, a in examples], LENGTH,
                                      batch_size=2, num_batches=2, loss_chunk=0, vocab=V)
  got = hook(0, params)["kl_teacher"]
  kl = tokens = 0.0
  for t_prompt, students, answer in examples:
    n = len(answer)
    log_q = _np_log_softmax(models.apply(S_CFG, params, jnp.asarray(
        np.concatenate([students[1], answer])[None, :-1])))[0][-n:]
    log_p = _np_log_softmax(models.apply(T_CFG, teacher_params, jnp.asarray(
        np.concatenate([t_prompt, answer])[None, :-1])))[0][-n:]
    kl, tokens = kl + float((np.exp(log_p) * (log_p - log_q)).sum()), tokens + n
  assert_close(got, kl / tokens, rel=1e-5, what="kl_teacher")


# ---------------------------------------------------------------------------------------------
# A served teacher: the same steps as the local one.


def _train(batches, rollout, distill, teacher=None, token_estimator=False):
  tx = optax.sgd(0.5)
  st = state_lib.create_state(models.init(S_CFG, 1), tx)
  fn = step.jit_train_step(step.StepSpec(S_CFG, tx, distill=distill,
                                         token_estimator=token_estimator),
                           sharding.Placement(), None, None, teacher=teacher, rollout=rollout)
  history = []
  for b in batches:
    st, m = fn(st, {k: jnp.asarray(v) for k, v in b.items()})
    history.append(jax.device_get(m))
  return st.params, history


def test_served_teacher_steps_equal_the_local_teacher(tok, teacher_params):
  """3 fully on-policy steps (4 rows x 2 segments, SGD 0.5, 0-shot student, 3-shot teacher):
  an in-process sentijax.serve scoring the teacher's prompt + the student's answer (echo +
  logprobs) = the local teacher in the step with kd.rollout.estimator=token. Params within 1e-4
  relative (two scoring forwards round differently), the same samples, the same rkl_token."""
  examples = _examples(np.random.default_rng(3), 24)
  student_of = _student_of(examples, 0)
  batches = [_batch(examples[i:i + 8]) for i in (0, 8, 16)]
  want, m_local = _train(batches, icl_onpolicy.ICLRollout(_rollout(estimator="token"),
                                                          student_of),
                         losses.Distill(kind="reverse", alpha=1.0, vocab=V),
                         step.Teacher(T_CFG, teacher_params), token_estimator=True)
  srv = serve.Server(LocalTeacher(T_CFG, teacher_params, tok, batch_size=4, name="tiny"),
                     "tiny", max_batch=4, max_wait_ms=5).start()
  client = OpenAITeacher(ClientSpec(base_url=srv.url, model="tiny", endpoint="completions",
                                    concurrency=4))
  try:
    got, m_served = _train(batches, icl_onpolicy.ICLRollout(
        _rollout(estimator="token", scorer=served.Scorer(client)), student_of),
        losses.Distill(kind="reverse", alpha=1.0, support="served", vocab=V))
  finally:
    client.close()
    srv.stop()
  for a, b in zip(m_local, m_served):
    assert a["rollout_length"] == b["rollout_length"] and b["teacher_requests"] == 8
    assert_close(b["rkl_token"], a["rkl_token"], rel=1e-4, what="rkl_token")
    assert b["teacher_score_s"] > 0
  assert abs(m_local[0]["rkl_token"]) > 0.5  # a real signal
  assert_trees_close(got, want, rtol=1e-4)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), want,
                                       models.init(S_CFG, 1)))
  assert max(float(x) for x in moved) > 1e-3  # the steps trained


def test_overlapped_icl_rollouts_are_sampled_one_update_earlier(teacher_params):
  """kd.rollout.overlap around ICLDist's rollout: 3 steps (local teacher in the step) equal the
  hand-written schedule (step t + 1's answers sampled by params_t with step t + 1's keys, then
  step t trained), and differ from the unpipelined run."""
  examples = _examples(np.random.default_rng(3), 24)
  student_of = _student_of(examples, 0)
  batches = [_batch(examples[i:i + 8]) for i in (0, 8, 16)]
  tx, teacher = optax.sgd(8.0), step.Teacher(T_CFG, teacher_params)
  spec = step.StepSpec(S_CFG, tx, distill=losses.Distill(kind="reverse", alpha=1.0, vocab=V))
  inner = step.jit_train_step(spec, sharding.Placement(), None, None, teacher=teacher)
  icl = icl_onpolicy.ICLRollout(_rollout(), student_of)

  def prepared(params, t):
    rows = ({k: np.array(v) for k, v in batches[t].items()}, 0, 4)
    return icl.scored(icl.sampled(params, rows, t)[0], t, {})[0]
  want = state_lib.create_state(models.init(S_CFG, 1), tx)
  ready = prepared(want.params, 0)
  for t in range(3):
    nxt = prepared(want.params, t + 1) if t < 2 else None
    want, _ = inner(want, ready)
    ready = nxt
  pipelined = onpolicy.Overlapped(icl_onpolicy.ICLRollout(_rollout(), student_of))
  fn = step.jit_train_step(spec, sharding.Placement(), None, None, teacher=teacher,
                           rollout=pipelined)
  pipelined.start(lambda i: batches[i], 3)
  got = state_lib.create_state(models.init(S_CFG, 1), tx)
  for b in batches:
    got, m = fn(got, {k: jnp.asarray(v) for k, v in b.items()})
  assert int(m["rollout_lag"]) == 1
  assert_trees_close(got.params, want.params)
  fresh = state_lib.create_state(models.init(S_CFG, 1), tx)
  unpipelined = step.jit_train_step(spec, sharding.Placement(), None, None, teacher=teacher,
                                    rollout=icl_onpolicy.ICLRollout(_rollout(), student_of))
  for b in batches:
    fresh, _ = unpipelined(fresh, {k: jnp.asarray(v) for k, v in b.items()})
  gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got.params),
                                                     jax.tree.leaves(fresh.params)))
  assert gap > 1e-3  # one update old is another run


def test_icldist_job_with_a_served_teacher(tmp_path, tok_dir, tok, teacher_params, caplog):
  """The ICLDist job, icl.target=on_policy, teacher.backend=openai against an in-process
  sentijax.serve (behind a counting proxy): the teacher's tokenizer checked, the server probed,
  then every step's sampled answers scored there (train/teacher_requests); no eval/kl_teacher
  without a local teacher."""
  srv = serve.Server(LocalTeacher(T_CFG, teacher_params, tok, batch_size=4, name="tiny"),
                     "tiny", max_batch=4, max_wait_ms=5).start()
  proxy = teacher_fixtures.FaultProxy(srv.url, lambda n, body: None)
  c = _config(model__tokenizer=str(tok_dir), teacher__backend="openai",
              teacher__base_url=proxy.url, teacher__model="tiny", teacher__tokenizer=str(tok_dir),
              kd__rollout__estimator="token", kd__rollout__max_new_tokens=4, train__steps=2,
              train__eval_every=0, train__log_every=1, icl__num_prompts=16, data__seq_len=96,
              checkpoint__every=0, export_hf=False, workdir=str(tmp_path / "served"),
              icl__heldout="sc/sst2")  # not found: no held-out scoring
  try:
    with caplog.at_level("INFO", logger="sentijax"):
      result = icldist.run(c)
  finally:
    proxy.stop()
    srv.stop()
  assert result.step == 2 and "scored by the served 'tiny'" in caplog.text
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert any("train/teacher_requests=" in m and "train/rkl_token=" in m for m in lines), lines
  assert not any("eval/kl_teacher" in m for m in lines)
  assert proxy.count >= 3  # the probe, then scoring


# ---------------------------------------------------------------------------------------------
# The job: its data, its settings, SIGKILL + resume.


def _config(**over):
  return teacher_fixtures.job_config("icldist", **{
      "icl.target": "on_policy", "icl.shots": "3", "icl.leak_check": "off",
      "icl.heldout": "sc/movies", "eval.data_dir": "/nonexistent", **over})


def test_bad_settings_name_the_key():
  spec = icldist.ICLSpec.from_config(_config(icl__student_shots=2))
  assert spec.recipe.student_shots == 2 and spec.on_policy.rollout.lmbda == 1.0
  assert spec.on_policy.distill(V) == losses.Distill(kind="reverse", alpha=1.0, vocab=V)
  for over, match in [({"icl__student_shots": -1}, r"icl.student_shots=-1.*0\.\.3"),
                      ({"icl__student_shots": 4}, r"icl.student_shots=4.*0\.\.3.*icl.shots='3'"),
                      ({"icl__shots": "1-8", "icl__student_shots": 2},
                       r"icl.student_shots=2.*0\.\.1"),
                      ({"kd__seq_kd": True}, "kd.seq_kd=True.*student samples"),
                      ({"kd__mode": "online"}, "kd.mode='online'.*kd.mode=on_policy"),
                      ({"kd__loss": "ce"}, "kd.loss='ce'"),
                      ({"data__truncation": "left_prompt"}, "data.truncation='left_prompt'"),
                      ({"teacher__preset": ""}, "teacher.model_dir")]:
    with pytest.raises(ValueError, match=match):
      icldist.ICLSpec.from_config(_config(**over))
  c = _config()
  with c.unlocked():
    del c["teacher"]
  with pytest.raises(ValueError, match="config.teacher.*configs/icldist.py"):
    icldist.ICLSpec.from_config(c)


def test_records_student_prompts_and_room_for_the_answer(tmp_path, tok):
  """The demo tasks, 3-shot teacher, 1-shot student: each student prompt is its teacher's
  instruction, first demo and query (lines of the teacher's text, in order); each teacher prompt
  leaves room for kd.rollout.max_new_tokens sampled tokens in data.seq_len; `student_prompts`
  maps the teacher's prompt tokens to the student's."""
  from sentijax.data import icl, icl_recipe
  from sentijax.data.spec import DataSpec
  c = _config(icl__student_shots=1, icl__num_prompts=24, icl__val_prompts=4,
              data__seq_len=256, workdir=str(tmp_path))
  recipe = icl_recipe.RecipeSpec.from_config(c)
  data = DataSpec.from_config(c.data, workdir=str(tmp_path), seed=0)
  sources, _, groups = icl_recipe.resolve_tasks(recipe)
  out = icl_onpolicy.records(recipe, sources, icl.forbidden_sentences(groups), tok, data, 20)
  teacher, student, stats = out.teacher, out.student, out.stats
  assert len(teacher) == len(student) == 24 and len(out.val_student) == len(out.val_teacher) == 4
  length = sequences.sequence_length_fn(tok, data.chat_template)
  fewer = 0
  for t, s in zip(teacher, student):
    t_lines, s_lines = t.prompt.split("\n"), s.prompt.split("\n")
    k = t.meta["k"]
    assert s.response == t.response and s.meta["k"] == min(1, k)
    # a demo is 3 lines (Sentence:, Label:, an empty line), the query 2
    assert s_lines == t_lines[:2 + 3 * min(1, k)] + t_lines[2 + 3 * k:], (t.prompt, s.prompt)
    assert length(t.prompt, "") - 1 + 20 <= 256 + 1
    fewer += int(len(s_lines) < len(t_lines))
  assert fewer > 10 and stats["student_shots"] == 1
  mapping = icl_onpolicy.student_prompts(teacher, student, tok, False)
  t_seqs, _ = sequences.tokenize_records(teacher, tok, False, show_progress=False)
  s_seqs, _ = sequences.tokenize_records(student, tok, False, show_progress=False)
  for ts, ss in zip(t_seqs, s_seqs):
    key = ts.tokens[:int(np.argmax(ts.loss_mask))].astype(np.int32).tobytes()
    np.testing.assert_array_equal(mapping[key], ss.tokens[:int(np.argmax(ss.loss_mask))])


STEPS = 8


def _main(workdir):
  return start_main("icldist", workdir, "--config.icl.target=on_policy", "--config.icl.shots=2",
                    "--config.icl.student_shots=0", "--config.icl.num_prompts=48",
                    "--config.icl.leak_check=off", "--config.icl.heldout=sc/sst2",
                    "--config.eval.data_dir=/nonexistent", "--config.kd.lmbda=0.5",
                    "--config.kd.rollout.max_new_tokens=8", "--config.data.seq_len=128",
                    f"--config.train.steps={STEPS}", "--config.train.eval_every=0",
                    "--config.train.log_every=2", "--config.checkpoint.every=2",
                    "--config.checkpoint.async_save=False")


def test_main_killed_mid_run_resumes_to_identical_params(tmp_path):
  ref = _main(tmp_path / "ref")
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out[-3000:]
  assert f"ICLDist done at step {STEPS}" in out and "train/rollout_tokens_per_s" in out
  assert "train/rkl_token" in out
  work = tmp_path / "killed"
  killed_at, out = kill_then_resume(_main, work, at_least=2, steps=STEPS, timeout=300,
                                    final_timeout=600)
  assert f"resumed from {work / 'checkpoints'} at step {killed_at}" in out
  want = safetensors.numpy.load_file(str(tmp_path / "ref" / "hf" / "model.safetensors"))
  got = safetensors.numpy.load_file(str(work / "hf" / "model.safetensors"))
  assert_trees_close(got, want)  # reduction-order noise only (a resampled step moves far more)


ICL_MP_ARGS = ["--config=configs/icldist.py", "--config.icl.target=on_policy",
               "--config.icl.shots=2", "--config.icl.student_shots=0",
               "--config.icl.num_prompts=48", "--config.icl.leak_check=off",
               "--config.icl.heldout=sc/sst2", "--config.eval.data_dir=/nonexistent",
               "--config.kd.lmbda=0.75", "--config.kd.rollout.max_new_tokens=8",
               "--config.data.seq_len=128", "--config.train.steps=4",
               "--config.train.eval_every=0", "--config.train.log_every=1",
               "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


def test_two_processes_equal_one(tmp_path):
  """kd.lmbda 0.75 of 8 rows: 2 processes x 2 devices (each rebuilding its own rows, the student
  prompts of both decoded as one global batch) end with the params, losses, rollout counts and
  eval/kl_teacher of 1 process x 4 devices."""
  import test_multiprocess as mp  # the multi-process harness (subprocesses)
  ref_dir, multi_dir = tmp_path / "ref", tmp_path / "multi"
  outs = mp._finish_all([*mp._two_processes(multi_dir, ICL_MP_ARGS, devices=2),
                         mp._Run(ref_dir, 4, args=ICL_MP_ARGS)])
  assert all("ICLDist done at step 4" in o for o in outs), outs[0][-3000:]
  ref = metrics.read_scalars(ref_dir / "tensorboard")
  multi = metrics.read_scalars(multi_dir / "tensorboard")
  for tag in ("train/loss", "train/kd", "train/ce"):
    mp._assert_curve(multi, ref, tag, [1, 2, 3, 4])
  mp._assert_curve(multi, ref, "eval/kl_teacher", [4])  # at the end
  for tag in ("train/onpolicy_fraction", "train/rollout_length", "train/rollout_dropped"):
    assert multi[tag] == ref[tag], tag  # counts over all processes' rows
  assert ref["train/onpolicy_fraction"][1] == 0.75
  assert_trees_close(mp._params(multi_dir), mp._params(ref_dir))
