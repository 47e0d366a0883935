"""generate_topk: the stored top-k equals a direct forward of the teacher at the right positions,
a SIGKILLed job rerun gives the uninterrupted store (no duplicates, no gaps, same bytes), and the
server path (sentijax.serve, echoed prompt logprobs) gives the local path's top-k."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from sentijax import serve
from sentijax.data import packing, readers, records, sequences, topk_store
from sentijax.data.spec import DataSpec

REPO = pathlib.Path(__file__).resolve().parents[2]
LEAK_DIRS = str(REPO.parent / "shared" / "sentibench")  # the job's leak check needs them
K = 8
N_RECORDS = 12
TOL = 1e-5  # fp32 log-softmax of O(10) logits through different (batched / single-row) programs


def _corpus(path: pathlib.Path) -> pathlib.Path:
  """12 demo records cut to varied lengths (two length buckets), one over max_len=120 tokens."""
  demo = [json.loads(x) for x in records.demo_corpus_path().read_text().splitlines()]
  rows = []
  for i, r in enumerate(demo[:N_RECORDS]):
    rows.append({"id": f"d{i}", "prompt": r["prompt"][:30 + 15 * (i % 4)],
                 "response": r["response"][:15 + 20 * (i % 5)], "meta": {"n": i}})
  rows[5]["response"] = demo[5]["response"]  # too long for topk.max_len: skipped and counted
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _config(teacher_dir, workdir, corpus, **overrides):
  spec = importlib.util.spec_from_file_location("cfg_topk", REPO / "configs/generate_topk.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.init, c.workdir, c.data.corpus = str(teacher_dir), str(workdir), str(corpus)
  c.topk.k, c.topk.shard_records, c.topk.logits_chunk, c.topk.max_len = K, 1, 48, 120
  c.topk.progress, c.generate.leak_check_dirs, c.teacher.batch_size = False, LEAK_DIRS, 8
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _args(teacher_dir, workdir, corpus) -> list[str]:
  return [f"--config.model.init={teacher_dir}", f"--config.workdir={workdir}",
          f"--config.data.corpus={corpus}", f"--config.topk.k={K}",
          "--config.topk.shard_records=1", "--config.topk.logits_chunk=48",
          "--config.topk.max_len=120", "--config.topk.progress=False",
          f"--config.generate.leak_check_dirs={LEAK_DIRS}", "--config.teacher.batch_size=8"]


@pytest.fixture(scope="module")
def local_store(teacher_dir, tmp_path_factory):
  from sentijax.teacher import topk
  root = tmp_path_factory.mktemp("topk")
  corpus = _corpus(root / "corpus.jsonl")
  summary = topk.run(_config(teacher_dir, root / "local", corpus))
  assert summary["written"] == summary["stored_records"] == N_RECORDS - 1 and summary["complete"]
  assert summary["too_long_or_empty"] == 1 and summary["shards"] == N_RECORDS - 1
  return root / "local" / "store", corpus


def test_store_equals_direct_forward_at_the_target_positions(local_store, teacher_dir, tmp_path):
  from sentijax import models
  from sentijax.data import tokenizer as tok_lib
  store, corpus = local_store
  width = 5
  recs, soft = topk_store.load(store, width)
  tok = tok_lib.load_tokenizer(store / "tokenizer")
  topk_store.check_tokenizer(store, tok)
  # the ids are the student's rendering of the records (raw: bos prompt response eos)
  src = {r.id: r for r in readers.read_records(corpus)[0]}
  again, _ = sequences.tokenize_records([src[r.id] for r in recs], tok, False, show_progress=False)
  for r, s in zip(recs, again):
    np.testing.assert_array_equal(r.tokens.ids, s.tokens)
    np.testing.assert_array_equal(r.tokens.loss_mask, s.loss_mask)
  spec = DataSpec(seq_len=256, cache_dir=str(tmp_path))
  packed = packing.pack_records(recs, tok, spec, soft, show_progress=False)
  cfg, params = models.load_hf(teacher_dir, dtype="float32")
  ids_BxT = np.zeros((len(recs), 128), np.int32)  # a separate forward, one record per row
  mask_BxT = np.zeros((len(recs), 128), np.int32)
  for j, r in enumerate(recs):
    ids_BxT[j, :len(r.tokens.ids)], mask_BxT[j, :len(r.tokens.ids)] = r.tokens.ids, 1
  logits_BxTxV = np.asarray(models.apply(cfg, params, ids_BxT, attention_mask=mask_BxT),
                            np.float64)
  top_BxTx1 = logits_BxTxV.max(-1, keepdims=True)
  logp_BxTxV = logits_BxTxV - top_BxTx1 - np.log(np.exp(logits_BxTxV - top_BxTx1).sum(
      -1, keepdims=True))
  checked = ties = 0
  for row_ids, row in zip(packed.rows, packed.iter_rows()):
    offset = 0
    for j in row_ids:
      ids, logp = recs[j].tokens.ids, logp_BxTxV[j]
      for t in np.flatnonzero(recs[j].tokens.loss_mask):  # row p = t - 1 predicts tokens[t]
        p = offset + t - 1
        assert row["targets"][p] == ids[t] and row["weights"][p] == 1
        want_ids = np.argsort(-logp[t - 1], kind="stable")[:width]
        want_lp = logp[t - 1][want_ids]
        got_ids, got_lp = row["soft_ids"][p], np.log(row["soft_probs"][p].astype(np.float64))
        scale = TOL * max(1.0, np.abs(want_lp).max())
        # quantised relative to the top-1 (half a step at most), the tail to float16
        quant = topk_store.LOGPROB_STEP / 2 + scale
        np.testing.assert_allclose(got_lp - got_lp[0], want_lp - want_lp[0], atol=quant, rtol=0)
        true_lp = logp[t - 1][got_ids]
        np.testing.assert_allclose(got_lp - got_lp[0], true_lp - true_lp[0], atol=quant, rtol=0)
        tail = 1.0 - np.exp(want_lp).sum()  # the mass outside the first `width`
        assert abs(row["soft_tail"][p] - tail) <= 2e-3 * tail + 1e-6
        assert abs(row["soft_probs"][p].sum() + row["soft_tail"][p] - 1) < 1e-5
        gaps = np.diff(-logp[t - 1][np.argsort(-logp[t - 1])[:width + 1]])
        if (gaps > 10 * scale).all():
          np.testing.assert_array_equal(got_ids, want_ids)
        else:
          ties += 1
        checked += 1
      assert not row["soft_probs"][offset:offset + len(ids) - 1][
          row["weights"][offset:offset + len(ids) - 1] == 0].any()
      offset += len(ids) - 1
  assert checked == sum(int(r.tokens.loss_mask.sum()) for r in recs) > 300
  assert ties < checked // 10


def _stored(store) -> dict:
  return {s.record.id: s for s in topk_store.read_records(store)}


def test_sigkill_and_rerun_give_the_uninterrupted_store(local_store, teacher_dir, tmp_path):
  """Same command after a SIGKILL at an arbitrary shard: same records, once each, same bytes."""
  from sentijax.teacher import topk
  ref, corpus = local_store
  work = tmp_path / "job"
  cmd = [sys.executable, "-m", "sentijax.main", f"--config={REPO}/configs/generate_topk.py",
         *_args(teacher_dir, work, corpus)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # 8 CPU devices as in this process (conftest)
  index = work / "store" / "index.json"

  def shards():
    try:
      return len(json.loads(index.read_text())["shards"])
    except (OSError, ValueError):
      return 0

  job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while shards() < 2 and time.time() < deadline and job.poll() is None:
    time.sleep(0.005)
  job.send_signal(signal.SIGKILL)
  out = job.communicate(timeout=60)[0].decode()
  assert job.returncode == -signal.SIGKILL, out[-3000:]
  killed_at = shards()
  assert 2 <= killed_at < N_RECORDS - 1, out[-3000:]
  # the rerun: the same command's config, in this process (its compiled programs are warm)
  summary = topk.run(_config(teacher_dir, work, corpus))
  assert summary["skipped"] == killed_at and summary["written"] == N_RECORDS - 1 - killed_at
  got, want = _stored(work / "store"), _stored(ref)
  assert len(topk_store.read_records(work / "store")) == len(got) == N_RECORDS - 1  # no dup
  assert got.keys() == want.keys()  # no gaps
  for rid, g in got.items():
    w = want[rid]
    assert g.record == w.record  # text, meta and token ids
    np.testing.assert_array_equal(g.ids, w.ids)
    np.testing.assert_array_equal(g.logprobs, w.logprobs)
    np.testing.assert_array_equal(g.log_tail, w.log_tail)
  assert topk_store.identity(work / "store") == topk_store.identity(ref)  # byte for byte


@pytest.fixture(scope="module")
def server(teacher_dir):
  from teacher import teacher_fixtures
  srv = serve.Server(teacher_fixtures.load_teacher(teacher_dir), "tiny", max_batch=4).start()
  yield srv
  srv.stop()


def test_echo_scores_the_prompt_ids(server):
  ids = server.teacher.encode("The pasta was great")
  body = {"model": "tiny", "prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0,
          "return_tokens_as_token_ids": True}
  r = httpx.post(server.url + "/completions", json=body, timeout=60).json()["choices"][0]
  lp = r["logprobs"]
  assert lp["tokens"] == [f"token_id:{i}" for i in ids]
  assert r["text"] == server.teacher.tokenizer.decode(ids)
  assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
  chosen, tops = server.teacher.logprobs(ids[:1], ids[1:], 3)
  assert lp["token_logprobs"][1:] == chosen
  assert [{f"token_id:{k}": v for k, v in t.items()} for t in tops] == lp["top_logprobs"][1:]
  bad = httpx.post(server.url + "/completions", json=body | {"echo": False}, timeout=60)
  assert bad.status_code == 400 and "'max_tokens'" in bad.text


def test_server_topk_equals_local_topk(local_store, server, teacher_dir, tmp_path):
  from sentijax.teacher import topk
  ref, corpus = local_store
  config = _config(teacher_dir, tmp_path / "served", corpus, teacher__backend="openai",
                   teacher__base_url=server.url, teacher__model="tiny",
                   teacher__tokenizer=str(teacher_dir), teacher__concurrency=4)
  summary = topk.run(config)
  assert summary["written"] == N_RECORDS - 1 and summary["rejected"] == 0
  assert summary["unmapped_logprob_tokens"] == 0
  got, want = _stored(tmp_path / "served" / "store"), _stored(ref)
  assert got.keys() == want.keys()
  positions = ties = 0
  for rid, g in got.items():
    w = want[rid]
    assert g.record.tokens == w.record.tokens
    # both quantised from logprobs equal to TOL: a value on a rounding boundary may differ by
    # one step; the tails (local: log-sum-exp of the rest; server: 1 - sum) to float16
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=topk_store.LOGPROB_STEP * 1.01,
                               rtol=0)
    np.testing.assert_allclose(np.exp(g.log_tail), np.exp(w.log_tail), rtol=5e-3, atol=1e-5)
    same = (g.ids == w.ids).all(axis=1)
    near_tie = (np.diff(-w.logprobs, axis=1) < 1e-4).any(axis=1)
    assert (same | near_tie).all(), rid
    positions += len(same)
    ties += int((~same).sum())
  assert positions > 300 and ties <= positions // 50


def test_store_trains_offline_kd(local_store, tmp_path):
  """generate_topk's store -> `python -m sentijax.main --config=configs/kd.py
  --config.kd.mode=offline`: a few steps with a finite loss whose KD term is active."""
  if not (REPO / "configs" / "kd.py").is_file():
    pytest.skip("configs/kd.py (the logit-distillation job) is not in this checkout")
  store, _ = local_store
  cmd = [sys.executable, "-m", "sentijax.main", f"--config={REPO}/configs/kd.py",
         "--config.kd.mode=offline", f"--config.kd.store={store}", "--config.kd.top_k=4",
         f"--config.workdir={tmp_path / 'kd'}", "--config.train.steps=2",
         "--config.train.log_every=1", "--config.train.warmup_steps=1",
         "--config.train.batch_size=8", "--config.data.seq_len=128",
         "--config.data.val_fraction=0", "--config.data.prefetch=0",
         "--config.checkpoint.every=100", "--config.export_hf=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        timeout=300, check=False)
  out = done.stdout.decode()
  assert done.returncode == 0, out[-3000:]
  assert "KD (offline" in out and "KD done at step 2" in out, out[-3000:]
  steps = [dict(kv.split("=") for kv in line.split(" I step ")[1].split()[1:])
           for line in out.splitlines() if " I step " in line and "train/loss=" in line]
  assert len(steps) == 2
  for metrics in steps:
    loss, ce, kd = (float(metrics[f"train/{m}"]) for m in ("loss", "ce", "kd"))
    assert np.isfinite([loss, ce, kd]).all() and kd > 1e-3  # the KD term is on and not ~0
    assert loss == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-3)  # alpha = 0.5
  stats = json.loads((tmp_path / "kd" / "data_stats.json").read_text())
  assert stats["train"]["pretokenized"] == N_RECORDS - 1 and stats["train"]["soft_width"] == 4


def test_sampled_store_estimates_the_full_forward_kl_and_its_gradient():
  """topk.mode=sample's draws (inverse CDF at the KD temperature, distinct ids + counts + their
  tempered log-probs): over 6000 positions x 8 draws (fixed seeds) the mean of the sampled
  estimate equals T^2 KL(p_T || q_T) and its gradient in the student's logits, T (q_T - p_T),
  within 4 standard errors computed from the draws (float64 numpy reference); the training
  form (losses.sampled_kl) computes the same per-position values."""
  import jax
  import jax.numpy as jnp
  from sentijax.teacher import topk
  from sentijax.train import losses
  rng = np.random.default_rng(3)
  vocab, positions, draws, temp = 40, 6000, 8, 2.0
  teacher = rng.normal(0, 3, vocab)
  student = rng.normal(0, 3, vocab)
  lp_t = jax.nn.log_softmax(jnp.asarray(teacher, jnp.float32) / temp)
  keys = topk.position_keys(0, jnp.asarray([topk.record_seed("rec")]), positions)
  ids, lp = topk.draw(jnp.broadcast_to(lp_t, (1, positions, vocab)), keys, draws)
  ids, counts, lp = topk.distinct_counts(np.asarray(ids[0]), np.asarray(lp[0]))
  w = counts / draws  # [positions, draws]
  log_q = student / temp - np.log(np.exp(student / temp).sum())
  value = temp**2 * np.where(w > 0, w * (lp.astype(np.float64) - log_q[ids]), 0).sum(-1)
  w_dense = np.zeros((positions, vocab))
  np.add.at(w_dense, (np.repeat(np.arange(positions), draws), ids.reshape(-1)), w.reshape(-1))
  grad = temp * (np.exp(log_q)[None] - w_dense)  # d value / d student logits, per position
  log_p = teacher / temp - np.log(np.exp(teacher / temp).sum())
  exact_value = temp**2 * (np.exp(log_p) * (log_p - log_q)).sum()
  exact_grad = temp * (np.exp(log_q) - np.exp(log_p))
  se = value.std(ddof=1) / np.sqrt(positions)
  assert abs(value.mean() - exact_value) <= 4 * se, (value.mean(), exact_value, se)
  grad_se = grad.std(0, ddof=1) / np.sqrt(positions)
  assert (np.abs(grad.mean(0) - exact_grad) <= 4 * grad_se + 1e-12).all()
  # the training path reads the same arrays (soft_ids, soft_probs = counts / N, soft_logp)
  some = slice(0, 64)
  logits = jnp.broadcast_to(jnp.asarray(student, jnp.float32), (1, 64, vocab))
  got = losses.sampled_kl(logits, jnp.asarray(ids[some])[None], jnp.asarray(w[some])[None],
                          jnp.asarray(lp[some])[None], temp)
  np.testing.assert_allclose(np.asarray(got[0]), value[some], rtol=1e-5, atol=1e-5)


def test_sample_mode_job_and_bad_mode(local_store, teacher_dir, tmp_path):
  """topk.mode=sample writes a sample store whose draws sum to topk.k at every response token,
  with the teacher's log-probabilities at topk.temperature; another mode lists the choices."""
  from sentijax.teacher import topk
  _, corpus = local_store
  with pytest.raises(ValueError, match=r"topk.mode='beam': expected one of \('topk', 'sample'\)"):
    topk.TopKSpec.from_config(_config(teacher_dir, tmp_path / "bad", corpus, topk__mode="beam"))
  summary = topk.run(_config(teacher_dir, tmp_path / "s", corpus, topk__mode="sample",
                             topk__k=16, topk__temperature=2.0))
  assert summary["mode"] == "sample" and summary["written"] == N_RECORDS - 1
  head = topk_store.header(tmp_path / "s" / "store")
  assert (head["mode"], head["k"], head["temperature"]) == ("sample", 16, 2.0)
  got = topk_store.read_records(tmp_path / "s" / "store")
  assert all((g.counts.sum(-1) == 16).all() for g in got)
  assert all((g.logprobs[g.counts > 0] <= 0).all() for g in got)
