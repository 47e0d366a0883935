"""The kd job: online step sharded = single device, distillation moves the student towards the
teacher faster than CE, tokenizer identity, config checks, the main entry end to end."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.data import readers, records
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.train import kd, kd_eval, losses, onpolicy, state as state_lib, step
from tolerances import RTOL, assert_trees_close

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kd_config", REPO / "configs" / "kd.py")
kd_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kd_config)

RULES = config_lib.base().sharding_rules
STUDENT = models.presets.get("tiny")
# A wider teacher with its own output kernel and more embedding rows than the tokenizer's 1000.
TEACHER = STUDENT.replace(hidden_size=96, intermediate_size=256, vocab_size=1088,
                          tie_embeddings=False)


def _train_cfg(**kw):
  c = config_lib.base().train
  c.unlock()
  c.update(dict(steps=100, warmup_steps=0, learning_rate=3e-3, schedule="constant"), **kw)
  return c


class _Recorded(NamedTuple):
  grads: Any


def _record_grads() -> optax.GradientTransformation:
  """Keeps the updates it passes on (chained first: the step's averaged gradient)."""
  return optax.GradientTransformation(
      lambda params: _Recorded(jax.tree.map(jnp.zeros_like, params)),
      lambda updates, state, params=None: (updates, _Recorded(updates)))


def _batch(rng, rows, length=32, vocab=1000):
  weights = np.ones((rows, length), np.float32)
  weights[:, :length // 4] = 0  # a prompt
  weights[::3, -5:] = 0  # and padding-like tails
  return {"inputs": rng.integers(1, vocab, (rows, length)).astype(np.int32),
          "targets": rng.integers(1, vocab, (rows, length)).astype(np.int32),
          "weights": weights, "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


def test_online_step_sharded_equals_single_device():
  """data=2 x fsdp=2 x tensor=2, 2 microbatches, chunked loss, JSD on the teacher's top-16."""
  s_params, t_params = models.init(STUDENT, 2), models.init(TEACHER, 3)
  batch = _batch(np.random.default_rng(0), rows=8)
  distill = losses.Distill(kind="jsd", alpha=0.4, beta=0.3, temperature=2.0, support="topk",
                           top_k=16, vocab=1000)

  def ref_fn(p):
    terms = step.loss_terms(STUDENT, p, batch, 0, distill, TEACHER, t_params)
    return terms["loss"], terms
  (_, terms), grads = jax.jit(jax.value_and_grad(ref_fn, has_aux=True))(s_params)
  w = float(terms["tokens"])
  want_grads = jax.tree.map(lambda g: g / w, grads)

  tc = _train_cfg()
  tx = optax.chain(_record_grads(), state_lib.make_optimizer(tc))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  st_sh = state_lib.state_shardings(STUDENT, tx, mesh, RULES)
  batch_sh = sharding.batch_sharding(mesh, RULES)
  st = jax.device_put(jax.tree.map(np.array, state_lib.create_state(s_params, tx)), st_sh)
  spec = step.StepSpec(STUDENT, tx, 2, state_lib.learning_rate_schedule(tc), 8, distill=distill)
  fn = step.jit_train_step(spec, sharding.Placement(mesh, RULES), st_sh, batch_sh,
                           teacher=step.Teacher(TEACHER, t_params))
  new, m = fn(st, jax.device_put(batch, batch_sh))
  # Losses: sums of ~150 per-token terms in another order (chunks, microbatches, shards).
  for key, want in (("loss", terms["loss"]), ("ce", terms["ce"])):
    np.testing.assert_allclose(float(m[key]), float(want) / w, rtol=RTOL)
  # Two random models are near uniform: a JSD of ~5e-4 nats per token out of bucket terms of
  # ~1e-2, so summing in another order moves it by ~2e-5 of its value (measured 2.5e-5).
  np.testing.assert_allclose(float(m["kd"]), float(terms["kd"]) / w, rtol=1e-4)
  assert float(m["kd"]) > 1e-4 and int(m["nonfinite"]) == 0  # on (measured 5e-4)
  np.testing.assert_allclose(float(m["kd_support_mass"]),
                             float(terms["support_mass"]) / float(terms["support_tokens"]),
                             rtol=RTOL)
  assert_trees_close(new.opt_state[0].grads, want_grads)
  # The teacher: sharded by the same rules, not donated, not in the optimizer state.
  placed = fn.teacher_params
  assert placed["layers"]["attn"]["q_kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert placed["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  new2, _ = fn(new, jax.device_put(batch, batch_sh))  # the same teacher buffers, reused
  assert int(new2.step) == 2 and not placed["lm_head"].is_deleted()
  np.testing.assert_array_equal(np.asarray(placed["lm_head"]), np.asarray(t_params["lm_head"]))
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(tx.init(s_params))


# ---------------------------------------------------------------------------------------------
# Distillation vs CE: a bigram language, a teacher that knows it, two students.

V = 64
TRANS = np.random.default_rng(99).dirichlet(np.full(V - 1, 0.2), size=V)  # peaky next-token rows


def _bigram_batches(seed, n, rows=8, length=24):
  rng = np.random.default_rng(seed)

  def one():
    toks = np.zeros((rows, length + 1), np.int32)
    toks[:, 0] = rng.integers(1, V, rows)
    for t in range(length):
      for r in range(rows):
        toks[r, t + 1] = 1 + rng.choice(V - 1, p=TRANS[toks[r, t]])
    w = np.ones((rows, length), np.float32)
    w[:, :4] = 0
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": w,
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}
  return [one() for _ in range(n)]


def _oracle_teacher(cfg):
  """A `tiny`-shaped decoder (width V) whose next-token distribution is the bigram table: one-hot
  embeddings pass the residual stream untouched (attention and MLP outputs zero), the final norm
  maps them back to one-hot, and lm_head row i holds log TRANS[i]. (Measured: its log-probs are
  the table's to 0.014, RMSNorm's eps.)"""
  p = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), models.param_shapes(cfg))
  p["embedding"] = np.eye(V, dtype=np.float32)
  p["final_norm"]["scale"][:] = 1 / np.sqrt(V)
  p["lm_head"][:] = -30.0
  p["lm_head"][:, 1:] = np.log(TRANS)
  return step.Teacher(cfg, p)


def test_online_distillation_gets_closer_to_the_teacher_than_ce():
  """Same student init (width 32), same 40 batches, same Adam: CE only (alpha 0) vs
  0.5 CE + 0.5 KL to a width-64 teacher that knows the language (alpha 0.5), both through
  `step.loss_terms` with the teacher forward. Held-out KL(teacher || student), measured: init
  1.30, CE 0.96, KD 0.81."""
  t_cfg = models.presets.get("tiny").replace(vocab_size=V, hidden_size=V, intermediate_size=128,
                                             tie_embeddings=False)
  s_cfg = t_cfg.replace(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                        tie_embeddings=True)
  teacher = _oracle_teacher(t_cfg)
  forward_kl = losses.Distill(kind="forward")
  tx = optax.adam(3e-3)

  @jax.jit
  def update(params, opt, batch, alpha):  # alpha traced: one compiled step for both students
    def loss(p):
      t = step.loss_terms(s_cfg, p, batch, 0, forward_kl, t_cfg, teacher.params)
      return ((1 - alpha) * t["ce"] + alpha * t["kd"]) / t["tokens"]
    updates, opt = tx.update(jax.grad(loss)(params), opt, params)
    return optax.apply_updates(params, updates), opt

  yardstick = jax.jit(lambda p, b: step.loss_terms(s_cfg, p, b, 0, forward_kl, t_cfg,
                                                   teacher.params))
  data, held_out = _bigram_batches(0, 40), _bigram_batches(1, 4)
  init = models.init(s_cfg, 1)
  kl = {}
  for name, alpha in (("init", None), ("ce", 0.0), ("kd", 0.5)):
    params, opt = init, tx.init(init)
    for b in data if alpha is not None else ():
      params, opt = update(params, opt, b, alpha)
    sums = [yardstick(params, b) for b in held_out]
    kl[name] = sum(float(s["kd"]) for s in sums) / sum(float(s["tokens"]) for s in sums)
  assert kl["kd"] < kl["ce"] < kl["init"], kl
  assert kl["kd"] < 0.9 * kl["ce"], kl


def test_top_k_with_the_tail_bucket_trains_closer_to_the_teacher_than_renormalised():
  """The same student, 20 batches, pure distillation (alpha 1) on the oracle teacher's top 4:
  with the tail bucket the student also learns where the teacher puts little mass; renormalised
  on the top 4 it never sees it. Held-out FULL-vocabulary KL(teacher || student), measured: init
  1.30, top-4 renormalised 1.25, top-4 + tail 0.97 (full vocabulary: 0.61 after 40 batches)."""
  t_cfg = models.presets.get("tiny").replace(vocab_size=V, hidden_size=V, intermediate_size=128,
                                             tie_embeddings=False)
  s_cfg = t_cfg.replace(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                        tie_embeddings=True)
  teacher = _oracle_teacher(t_cfg)
  tx = optax.adam(3e-3)
  full = losses.Distill(kind="forward")
  yardstick = jax.jit(lambda p, b: step.loss_terms(s_cfg, p, b, 0, full, t_cfg, teacher.params))
  data, held_out = _bigram_batches(0, 20), _bigram_batches(1, 4)
  init = models.init(s_cfg, 1)
  kl = {}
  for tail in ("bucket", "renorm"):
    distill = losses.Distill(alpha=1.0, support="topk", top_k=4, tail=tail)

    @jax.jit
    def update(params, opt, batch, distill=distill):
      def loss(p):
        t = step.loss_terms(s_cfg, p, batch, 0, distill, t_cfg, teacher.params)
        return t["loss"] / t["tokens"]
      updates, opt = tx.update(jax.grad(loss)(params), opt, params)
      return optax.apply_updates(params, updates), opt
    params, opt = init, tx.init(init)
    for b in data:
      params, opt = update(params, opt, b)
    sums = [yardstick(params, b) for b in held_out]
    kl[tail] = sum(float(s["kd"]) for s in sums) / sum(float(s["tokens"]) for s in sums)
  assert kl["bucket"] < 0.85 * kl["renorm"], kl


# ---------------------------------------------------------------------------------------------
# Tokenizer identity, config checks.


def _texts():
  recs, _ = readers.read_corpus(records.demo_corpus_path())
  return [t for r in recs for t in (r.prompt, r.response)]


def test_tokenizer_identity_not_vocab_size(tmp_path):
  tok = tokenizer_lib.train_tokenizer(_texts(), 300, tmp_path / "a")
  shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
  same = tokenizer_lib.load_tokenizer(tmp_path / "a_copy")
  n = kd.check_same_tokenizer(tok, str(tmp_path / "a"), same, str(tmp_path / "a_copy"))
  assert n == len(tok) == len(same)
  # Different embedding rows for one tokenizer (Qwen2.5 1.5B / 72B): both models accept it, the
  # logits are cut to its n ids (Distill.vocab; tests/train/test_losses.py shows the cut).
  for rows in (n, n + 64, 1088):
    models.check_tokenizer(STUDENT.replace(vocab_size=rows), same)
  other = tokenizer_lib.train_tokenizer([t[::-1] for t in _texts()], 300, tmp_path / "b")
  assert len(other) == len(tok)  # same size, different ids: only the identity tells them apart
  with pytest.raises(kd.TokenizerMismatch) as e:
    kd.check_same_tokenizer(tok, str(tmp_path / "a"), other, str(tmp_path / "b"))
  assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "b") in str(e.value)
  assert "vocab" in str(e.value)


def test_config_is_checked_with_the_key_named(tmp_path):
  def spec(**kw):
    c = kd_config.get_config()
    for k, v in kw.items():
      section, key = k.split("__")
      c[section][key] = v
    return kd.KDSpec.from_config(c)
  assert spec().distill(1000) == losses.Distill(kind="forward", alpha=0.5, vocab=1000)
  assert spec(kd__top_k=8, kd__tail="renorm").distill(1000) == losses.Distill(
      alpha=0.5, support="topk", top_k=8, tail="renorm", vocab=1000)
  offline = dict(kd__mode="offline", kd__store="s", kd__top_k=8)
  assert spec(**offline).distill(1000) == losses.Distill(alpha=0.5, support="listed", vocab=1000)
  assert spec(**offline).distill(1000, "sampled").support == "sampled"
  with pytest.raises(ValueError, match="kd.loss='jsd'.*sampled store.*kd.loss=forward"):
    spec(**offline, kd__loss="jsd").distill(1000, "sampled")
  assert spec(kd__loss="ce").distill(1000) is None
  for kw, match in [({"kd__loss": "kl"}, "kd.loss='kl'"), ({"kd__mode": "x"}, "kd.mode"),
                    ({"kd__alpha": 2.0}, "kd.alpha"), ({"kd__beta": -1.0}, "kd.beta"),
                    ({"kd__temperature": 0.0}, "kd.temperature"),
                    ({"kd__mode": "offline"}, "kd.store"),
                    ({"kd__mode": "offline", "kd__store": "s"}, "kd.top_k"),
                    ({"teacher__preset": ""}, "teacher.model_dir"),
                    ({"kd__tail": "drop"}, r"kd.tail='drop'.*\('bucket', 'renorm'\)"),
                    ({"kd__top_k": 1, "kd__tail": "renorm"}, "kd.top_k=1.*kd.tail=bucket"),
                    ({"kd__eval_teacher": str(tmp_path)}, "kd.eval_teacher.*kd.mode=offline")]:
    with pytest.raises(ValueError, match=match):
      spec(**kw)
  with pytest.raises(FileNotFoundError, match="teacher.model_dir"):
    spec(teacher__model_dir=str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="kd.eval_teacher"):
    spec(**offline, kd__eval_teacher=str(tmp_path / "missing"))
  assert spec(kd__top_k=1).distill(1000).top_k == 1  # bucketed top-1: a real signal


# ---------------------------------------------------------------------------------------------
# Offline held-out metrics: a teacher model only for scoring, names that say what is measured.


def _np_softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_offline_held_out_metrics_are_named_for_what_they_measure(tmp_path):
  """Offline (store-like soft targets: the teacher's top 8 at T = 1 and its tail) with
  kd.eval_teacher: the teacher model is loaded on the mesh only to score the held-out FULL
  vocabulary KL (eval/kl_teacher, and KL(student || teacher) as eval/kl_teacher_reverse; the
  train step never gets it); without it the store's
  bucketed KL is reported as eval/kl_teacher_bucketed (a lower bound), never as kl_teacher.
  Values against float64 numpy from both models' logits."""
  rng = np.random.default_rng(5)
  t_params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32),
                          models.param_shapes(TEACHER))
  t_params["lm_head"] *= 40  # a peaked teacher: its top 8 hold a real share of the mass
  models.save_hf(TEACHER, t_params, tmp_path / "teacher")
  batch = _batch(np.random.default_rng(6), rows=8)
  n = 1000  # the tokenizer's length: both models cut to it
  t_logits = np.asarray(models.apply(TEACHER, t_params, batch["inputs"]), np.float64)[..., :n]
  p = _np_softmax(t_logits)
  ids = np.argsort(-p, -1)[..., :8]
  batch["soft_ids"] = ids.astype(np.int32)
  batch["soft_probs"] = np.take_along_axis(p, ids, -1).astype(np.float32)
  batch["soft_tail"] = (1 - np.take_along_axis(p, ids, -1).sum(-1)).astype(np.float32)

  class Val:
    def batch_at(self, i, batch_size):
      assert i == 0 and batch_size == 8
      return batch

  c = kd_config.get_config()
  c.kd.update(mode="offline", store="s", top_k=8, eval_teacher=str(tmp_path / "teacher"))
  spec = kd.KDSpec.from_config(c)
  distill = spec.distill(n, "listed")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  s_params = jax.device_put(models.init(STUDENT, 0),
                            models.shardings_for(STUDENT, mesh, RULES))
  q = _np_softmax(np.asarray(models.apply(STUDENT, s_params, batch["inputs"]),
                             np.float64)[..., :n])
  w = batch["weights"]
  full = (p * np.log(p / q)).sum(-1)
  reverse = (q * np.log(q / p)).sum(-1)
  in_s = np.zeros(p.shape, bool)
  np.put_along_axis(in_s, ids, True, -1)
  bucket = lambda x: np.concatenate(  # noqa: E731
      [np.where(in_s, x, 0), np.where(in_s, 0, x).sum(-1, keepdims=True)], -1)
  pb, qb = bucket(p), bucket(q)
  pos = pb > 0
  bucketed = np.where(pos, pb * np.log(np.where(pos, pb, 1) / np.where(pos, qb, 1)), 0).sum(-1)
  mass = np.where(in_s, q, 0).sum(-1)
  want = {"kl_teacher": full, "kl_teacher_reverse": reverse, "kl_teacher_bucketed": bucketed,
          "kd": bucketed, "kd_support_mass": mass}
  assert (bucketed < 0.9 * full).all() and mass.max() < 0.2  # the names tell different things

  for eval_teacher, names in ((True, {"kl_teacher", "kl_teacher_reverse", "kd"}),
                              (False, {"kl_teacher_bucketed", "kd"})):
    if not eval_teacher:
      c.kd.eval_teacher = ""
      spec = kd.KDSpec.from_config(c)
    ctx = kd.Context(spec, kd.teacher_config(spec), distill)
    assert ctx.loss_options(mesh, RULES) == {"distill": distill, "teacher": None}
    assert (ctx.teacher is not None) == eval_teacher
    terms = kd_eval.eval_terms(ctx, n, "listed")
    assert set(terms) == names
    got = kd_eval.divergence_hook(ctx, STUDENT, Val(), 8, 1, 0, terms)(0, s_params)
    assert set(got) == names | {"kd_support_mass"}
    for name, value in got.items():
      # Per-token means of fp32 divergences of ~1..5 nats: ~1e-6 relative to float64.
      np.testing.assert_allclose(value, (want[name] * w).sum() / w.sum(), rtol=1e-4,
                                 err_msg=name)
  # A sampled store without a teacher model: only the training term, nothing named kl_teacher.
  assert set(kd_eval.eval_terms(kd.Context(spec, None, None), n, "sampled")) == set()


def test_eval_onpolicy_scores_the_students_own_samples(tmp_path):
  """kd.eval_onpolicy: eval/kl_teacher_onpolicy is KL(student || teacher) over the full
  vocabulary on the tokens the student samples for the val rows' prompts (keys of step 0), not
  on the corpus responses (eval/kl_teacher_reverse). Against float64 numpy on the sampled rows."""
  rng = np.random.default_rng(7)
  t_params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32),
                          models.param_shapes(TEACHER))
  t_params["lm_head"] *= 40
  models.save_hf(TEACHER, t_params, tmp_path / "teacher")
  batch = _batch(np.random.default_rng(8), rows=8)
  n = 1000

  class Val:
    def batch_at(self, i, batch_size):
      return batch

  c = kd_config.get_config()
  c.kd.update(eval_onpolicy=True, loss="forward")
  c.kd.rollout.max_new_tokens = 12
  c.teacher.model_dir = str(tmp_path / "teacher")
  spec = kd.KDSpec.from_config(c)
  assert spec.rollout is None and spec.eval_rollout.lmbda == 1.0
  distill = spec.distill(n, "listed")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ctx = kd.Context(spec, TEACHER, distill)
  ctx.loss_options(mesh, RULES)
  s_params = jax.device_put(models.init(STUDENT, 0), models.shardings_for(STUDENT, mesh, RULES))
  args = {"cfg": STUDENT, "vocab": n, "eos_id": 1, "seq_len": 32, "stop_ids": ()}
  terms = kd_eval.eval_terms(ctx, n, None)
  got = kd_eval.divergence_hook(ctx, STUDENT, Val(), 8, 1, 0, terms, args)(0, s_params)

  rollout = onpolicy.Rollout(spec.eval_rollout, placement=sharding.Placement(mesh, RULES), **args)
  state = type("S", (), {"params": s_params, "step": 0})
  rolled = {k: np.asarray(v) for k, v in rollout(state, batch)[0].items()}
  w = rolled["weights"] * (rolled["segment_ids"] > 0)
  assert w.sum() > 40 and not np.array_equal(rolled["inputs"], batch["inputs"])
  p = _np_softmax(np.asarray(models.apply(TEACHER, t_params, rolled["inputs"]), np.float64)[..., :n])
  q = _np_softmax(np.asarray(models.apply(STUDENT, jax.device_get(s_params), rolled["inputs"]),
                             np.float64)[..., :n])
  reverse = (q * np.log(q / p)).sum(-1)
  # A per-token mean of fp32 divergences of ~1..10 nats: ~1e-6 relative to float64.
  np.testing.assert_allclose(got["kl_teacher_onpolicy"], (reverse * w).sum() / w.sum(), rtol=1e-4)
  assert abs(got["kl_teacher_onpolicy"] - got["kl_teacher_reverse"]) > 1e-3 * got["kl_teacher_reverse"]


# ---------------------------------------------------------------------------------------------
# The main entry: an HF teacher dir (more embedding rows than the tokenizer), a copy of its
# tokenizer for the student, 2 devices, 4 steps, checkpoints and metrics.


def test_main_entry_distils_from_an_hf_teacher(tmp_path):
  tok = tokenizer_lib.train_tokenizer(_texts(), STUDENT.vocab_size, tmp_path / "tok")
  shutil.copytree(tmp_path / "tok", tmp_path / "student_tok")
  rng = np.random.default_rng(5)  # random weights without compiling an init
  t_params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32),
                          models.param_shapes(TEACHER))
  models.save_hf(TEACHER, t_params, tmp_path / "teacher", tokenizer=tok)
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "sentijax.main", "--config=configs/kd.py",
         f"--config.workdir={work}", f"--config.teacher.model_dir={tmp_path / 'teacher'}",
         f"--config.model.tokenizer={tmp_path / 'student_tok'}", "--config.kd.loss=jsd",
         "--config.kd.top_k=32", "--config.data.seq_len=64", "--config.train.steps=4",
         "--config.train.log_every=2", "--config.train.eval_every=4",
         "--config.checkpoint.every=2", "--config.export_hf=False",
         "--config.train.peak_tflops=1.0"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-4000:]
  assert "KD done at step 4" in log
  assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == \
      ["2", "4"]
  stats = json.loads((work / "data_stats.json").read_text())
  assert stats["vocab"] == len(tok) and stats["kd"]["loss"] == "jsd"
  events = b"".join(p.read_bytes() for p in (work / "tensorboard").glob("events.*"))
  for tag in (b"train/ce", b"train/kd", b"train/mfu", b"train/teacher_mfu",
              b"train/teacher_tflops_per_device", b"eval/loss", b"eval/kl_teacher", b"eval/kd",
              b"train/kd_support_mass", b"eval/kd_support_mass"):
    assert tag in events, tag
