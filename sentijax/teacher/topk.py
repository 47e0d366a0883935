"""`config.job = "generate_topk"`: the teacher's top-k next-token distribution (and the mass of
the rest) at every response token of an existing corpus, or N tokens drawn from it
(`topk.mode=sample`), stored offline (sentijax/data/topk_store.py) for logit distillation.

    python -m sentijax.main --config=configs/generate_topk.py

Recipe: read the corpus (`config.data`, the readers of every training job) -> render and tokenise
each record exactly as the student trains (`sequences.tokenize_records` with the teacher's tokenizer
and `data.chat_template`) -> plan: records sorted by length (stable), cut into shards of
`topk.shard_records`, each scored in batches of `teacher.batch_size` -> teacher forcing: one
forward per batch over prompt + response (no generation), fp32 log-softmax at temperature 1,
top `topk.k` at every position and the log of the mass outside them (`topk.mode=topk`), or
`topk.k` draws from softmax(logits / topk.temperature) (`topk.mode=sample`: inverse-CDF sampling
with a key per record and position, so the draws do not depend on batching; stored as distinct
ids, counts and their tempered log-probabilities: an unbiased sampled estimate of the forward KL
at that temperature, Anshumann et al. 2025) -> keep the positions that predict a response token
-> one atomic shard at a time, then the index. A killed job rerun with the same command skips the
stored records; the plan does not depend on what was stored, so the rerun scores the remaining
shards in the same batches and writes the same bytes as an uninterrupted run.

Backends (`teacher.backend`, by capability, teacher/backend.py): one giving the `model` (`local`:
the sentijax model of `config.model`, batched and sharded over the mesh; the [B, T, V] logits
never exist at once: `topk.logits_chunk` positions at a time), else one giving
`prompt_logprobs` (`openai`: a server that echoes prompt logprobs: vLLM, `sentijax.serve`; the
token ids are sent as the prompt, `teacher.tokenizer` names the teacher's tokenizer dir; k <= 20
there). Records a
server fails on go to rejects.jsonl and are retried by the next run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sentijax import models, sampling, sharding
from sentijax.data import readers, sequences, topk_store
from sentijax.data.records import Tokens
from sentijax.data.spec import DataSpec
from sentijax.data.writers import write_json_atomic
from sentijax.teacher import backend
from sentijax.teacher import generate as gen

log = logging.getLogger("sentijax")


@dataclasses.dataclass(frozen=True)
class TopKSpec:
  """`config.topk`, read and checked once."""
  k: int = 20  # topk: entries per position; sample: draws per position (<= 255)
  mode: str = "topk"  # topk | sample
  temperature: float = 1.0  # sample: the KD temperature the draws come from
  store_dir: str = ""  # "" = <workdir>/store
  shard_records: int = 256
  logits_chunk: int = 256
  max_len: int = 0  # 0 = the teacher's max_position_embeddings (local) / no limit (server)
  echo_max_tokens: int = 0
  progress: bool = True

  @classmethod
  def from_config(cls, config) -> "TopKSpec":
    c = config.topk
    mode = str(c.get("mode", "topk"))
    if mode not in topk_store.MODES:
      raise ValueError(f"topk.mode={mode!r}: expected one of {topk_store.MODES}")
    spec = cls(k=int(c.k), mode=mode, temperature=float(c.get("temperature", 1.0)),
               store_dir=str(c.store_dir or f"{config.workdir}/store"),
               shard_records=int(c.shard_records), logits_chunk=int(c.logits_chunk),
               max_len=int(c.max_len), echo_max_tokens=int(c.echo_max_tokens),
               progress=bool(c.progress))
    for key, low in (("k", 1), ("shard_records", 1), ("logits_chunk", 1), ("max_len", 0),
                     ("echo_max_tokens", 0)):
      if getattr(spec, key) < low:
        raise ValueError(f"topk.{key}={getattr(spec, key)!r}: must be >= {low}")
    if spec.mode == "sample" and not (spec.k <= 255 and spec.temperature > 0):
      raise ValueError(f"topk.mode=sample: topk.k={spec.k} draws (<= 255) at topk.temperature="
                       f"{spec.temperature} (> 0)")
    return spec


def plan(lengths: Sequence[int], shard_records: int) -> list[list[int]]:
  """Shards of record indices: sorted by length (ties in corpus order), `shard_records` each."""
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  return [order[i:i + shard_records] for i in range(0, len(order), shard_records)]


def _at_loss(mask: np.ndarray, tops_TxK: np.ndarray) -> np.ndarray:
  """Rows of `tops_TxK` (row t: the distribution for token t + 1) at the loss tokens."""
  return tops_TxK[np.flatnonzero(mask[1:])]


# --------------------------------------------------------------------------- local teacher


def _top_and_tail(lp_BxCxV, k: int):
  """([B, C, k] top log-probs, their ids, [B, C] log of the mass outside them)."""
  top_lp, top_id = jax.lax.top_k(lp_BxCxV, k)
  rest = jnp.put_along_axis(lp_BxCxV, top_id, -jnp.inf, axis=-1, inplace=False)
  return top_lp, top_id, jax.nn.logsumexp(rest, axis=-1)


def draw(lp_BxCxV, keys_BxC, n: int):
  """n draws per position from exp(lp) by inverse CDF: ([B, C, n] ids, [B, C, n] their lp)."""
  def one(lp_V, key):
    cdf_V = jnp.cumsum(jnp.exp(lp_V))
    u_N = jax.random.uniform(key, (n,), jnp.float32) * cdf_V[-1]
    ids_N = jnp.minimum(jnp.searchsorted(cdf_V, u_N, side="right"), lp_V.shape[-1] - 1)
    return ids_N, lp_V[ids_N]
  return jax.vmap(jax.vmap(one))(lp_BxCxV, keys_BxC)


def position_keys(seed: int, row_seeds_B, t: int):
  """A key per (row, position): fold_in(fold_in(seed, row seed), position) -> [B, t] keys."""
  base = jax.random.key(seed)
  row = jax.vmap(lambda s: jax.random.fold_in(base, s))(row_seeds_B)
  return jax.vmap(lambda k: jax.vmap(lambda p: jax.random.fold_in(k, p))(jnp.arange(t)))(row)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "chunk", "mode", "temperature"))
def topk_logprobs(cfg, params, ids_BxT, mask_BxT, row_seeds_B=None, *, k: int, chunk: int,
                  mode: str = "topk", temperature: float = 1.0, seed: int = 0):
  """At every position (t: the distribution for the token at t + 1), in chunks of `chunk`:
  topk: fp32 log-softmax top-k ([B, T, k] logprobs, [B, T, k] ids, [B, T] log tail mass);
  sample: k draws from softmax(logits / temperature) ([B, T, k] their tempered logprobs, ids,
  [B, T] zeros), keyed by `row_seeds_B` and position."""
  hidden_BxTxE = models.forward_hidden(cfg, params, ids_BxT, segment_ids_BxT=mask_BxT,
                                       positions_BxT=models.default_positions(mask_BxT))
  b, t, e = hidden_BxTxE.shape
  pad = -t % chunk
  h_NxBxCxE = jnp.pad(hidden_BxTxE, ((0, 0), (0, pad), (0, 0))).reshape(
      b, (t + pad) // chunk, chunk, e).swapaxes(0, 1)
  out_ExV = models.output_kernel(cfg, params)
  if mode == "sample":
    keys = position_keys(seed, row_seeds_B, t + pad)
    keys_NxBxC = keys.reshape(b, (t + pad) // chunk, chunk).swapaxes(0, 1)
  else:
    keys_NxBxC = jnp.zeros(((t + pad) // chunk, b, chunk), jnp.int32)

  def one(args):
    h_BxCxE, keys_BxC = args
    logits_BxCxV = models.project_logits(h_BxCxE, out_ExV, hidden_BxTxE.dtype,
                                         cfg.logit_softcap)
    if mode == "sample":
      ids, lp = draw(jax.nn.log_softmax(logits_BxCxV / temperature, axis=-1), keys_BxC, k)
      return lp, ids, jnp.zeros(lp.shape[:2], jnp.float32)
    return _top_and_tail(jax.nn.log_softmax(logits_BxCxV, axis=-1), k)

  lp_NxBxCxK, id_NxBxCxK, tail_NxBxC = jax.lax.map(one, (h_NxBxCxE, keys_NxBxC))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, t + pad, *x.shape[3:])[:, :t]  # noqa: E731
  return unchunk(lp_NxBxCxK), unchunk(id_NxBxCxK).astype(jnp.int32), unchunk(tail_NxBxC)


def distinct_counts(ids_MxN: np.ndarray, lp_MxN: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws -> (distinct ids ascending, padded with 0; their counts, 0 = padding; their lp)."""
  m, n = ids_MxN.shape
  order = np.argsort(ids_MxN, axis=1, kind="stable")
  ids, lp = np.take_along_axis(ids_MxN, order, 1), np.take_along_axis(lp_MxN, order, 1)
  new = np.ones((m, n), bool)
  new[:, 1:] = ids[:, 1:] != ids[:, :-1]
  slot = np.cumsum(new, axis=1) - 1
  rows = np.repeat(np.arange(m), n).reshape(m, n)
  out_ids, out_lp = np.zeros((m, n), np.int32), np.zeros((m, n), np.float32)
  counts = np.zeros((m, n), np.int32)
  out_ids[rows[new], slot[new]], out_lp[rows[new], slot[new]] = ids[new], lp[new]
  np.add.at(counts, (rows, slot), 1)
  return out_ids, counts, out_lp


def record_seed(record_id: str) -> int:
  """A record's sampling seed: crc32 of its id (the draws do not depend on batching)."""
  return zlib.crc32(record_id.encode("utf-8")) & 0x7FFFFFFF


class LocalScorer:
  """Top-k of a LocalTeacher's model over right-padded, length-bucketed batches."""

  def __init__(self, teacher: Any, k: int, chunk: int, mode: str = "topk",
               temperature: float = 1.0, seed: int = 0):
    self.teacher, self.k, self.chunk = teacher, k, chunk
    self.mode, self.temperature, self.seed = mode, temperature, seed
    self.unmapped = 0
    if mode == "topk" and k > teacher.cfg.vocab_size:
      raise ValueError(f"topk.k={k} exceeds the teacher's vocab_size {teacher.cfg.vocab_size}")

  def score(self, seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
            ids: Sequence[str] = ()) -> list[topk_store.ScoredRecord | Exception]:
    """Per sequence: a ScoredRecord without its record (the job adds it) or the exception."""
    t = self.teacher
    divisor = t.placement.batch_divisor
    out = []
    for start in range(0, len(seqs), t.batch_size):
      chunk = seqs[start:start + t.batch_size]
      rows = sampling.bucket_batch(len(chunk), divisor)
      length = sampling.bucket_length(max(len(s) for s in chunk))
      ids_BxT = np.full((rows, length), t.pad_id, np.int32)
      mask_BxT = np.zeros((rows, length), np.int32)
      seeds_B = np.zeros(rows, np.int32)
      for r, s in enumerate(chunk):
        ids_BxT[r, :len(s)], mask_BxT[r, :len(s)] = s, 1
        seeds_B[r] = record_seed(ids[start + r]) if ids else start + r
      ids_dev, mask = jnp.asarray(ids_BxT), jnp.asarray(mask_BxT)
      if t.placement.mesh is not None:
        ids_dev, mask = (jax.device_put(x, t.placement.batch()) for x in (ids_BxT, mask_BxT))
      lp, top, tail = topk_logprobs(t.cfg, t.params, ids_dev, mask, jnp.asarray(seeds_B),
                                    k=self.k, chunk=min(self.chunk, length), mode=self.mode,
                                    temperature=self.temperature, seed=self.seed)
      lp, top, tail = (sharding.to_host(x) for x in (lp, top, tail))
      for r, m in enumerate(masks[start:start + t.batch_size]):
        n = len(m)
        top_m, lp_m = _at_loss(m, top[r, :n - 1]), _at_loss(m, lp[r, :n - 1])
        if self.mode == "sample":
          d_ids, counts, d_lp = distinct_counts(top_m, lp_m)
          out.append(topk_store.ScoredRecord(None, d_ids, d_lp, counts=counts))
        else:
          out.append(topk_store.ScoredRecord(None, top_m, lp_m, _at_loss(m, tail[r, :n - 1])))
    return out


# --------------------------------------------------------------------------- server


class ServerScorer:
  """Top-k from an OpenAI-compatible server (prompt logprobs with echo), `concurrency` requests
  in flight; fewer than k entries at a position are padded with id 0, logprob -inf."""

  def __init__(self, client: Any, k: int, echo_max_tokens: int):
    if k > 20:
      raise ValueError(f"topk.k={k}: OpenAI-compatible servers return at most 20 logprobs")
    self.client, self.k, self.echo_max_tokens = client, k, echo_max_tokens
    self.unmapped = 0

  def _one(self, ids: np.ndarray, mask: np.ndarray) -> topk_store.ScoredRecord:
    tops, unmapped = self.client.prompt_logprobs(ids.tolist(), self.k, self.echo_max_tokens)
    self.unmapped += unmapped
    positions = np.flatnonzero(mask)
    ids_MxK = np.zeros((len(positions), self.k), np.int32)
    lp_MxK = np.full((len(positions), self.k), -np.inf, np.float32)
    for row, t in enumerate(positions):
      best = sorted((tops[t] or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:self.k]
      ids_MxK[row, :len(best)] = [i for i, _ in best]
      lp_MxK[row, :len(best)] = [v for _, v in best]
    return topk_store.ScoredRecord(None, ids_MxK, lp_MxK)  # tail: 1 - sum, on writing

  def score(self, seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
            ids: Sequence[str] = ()) -> list[topk_store.ScoredRecord | Exception]:
    del ids
    with concurrent.futures.ThreadPoolExecutor(self.client.concurrency) as pool:
      futures = [pool.submit(self._one, s, m) for s, m in zip(seqs, masks)]
      out = []
      for f in futures:
        try:
          out.append(f.result())
        except Exception as e:  # pylint: disable=broad-except
          out.append(e)
      return out


# --------------------------------------------------------------------------- job


def _scorer(config, spec: TopKSpec):
  """(teacher, its tokenizer, scorer): the model's own forward when the backend gives the model
  (any k, sampled draws), else a server's prompt logprobs."""
  teacher = backend.make(config)
  try:
    if spec.mode == "sample":
      backend.require(teacher, backend.MODEL, "topk.mode=sample (draws from the teacher's full "
                      "distribution)")
    if backend.MODEL in teacher.capabilities:
      return teacher, teacher.tokenizer, LocalScorer(
          teacher, spec.k, spec.logits_chunk, spec.mode, spec.temperature, int(config.seed))
    backend.require(teacher, backend.PROMPT_LOGPROBS, "generate_topk (the teacher's top-k at "
                    "every response token)")
    if teacher.tokenizer is None:
      raise ValueError(f"teacher.backend={config.teacher.backend}: set teacher.tokenizer to the "
                       "teacher's tokenizer dir (records are tokenised here and sent as token "
                       "ids)")
    return teacher, teacher.tokenizer, ServerScorer(teacher, spec.k, spec.echo_max_tokens)
  except BaseException:
    teacher.close()
    raise


def _open_store(spec: TopKSpec, teacher: str, tok: Any, mode: str,
                cfg: models.ModelConfig | None) -> topk_store.StoreWriter:
  """The writer on process 0; the other hosts read the store once process 0 has opened it.
  `cfg`: the teacher model's config when the backend gives the model (its vocab_size is
  recorded), else None."""
  def open_store(read_only: bool) -> topk_store.StoreWriter:
    return topk_store.StoreWriter(spec.store_dir, k=spec.k, teacher=teacher, tokenizer=tok,
                                  render={"mode": mode}, mode=spec.mode,
                                  temperature=spec.temperature,
                                  vocab_size=cfg.vocab_size if cfg else 0, read_only=read_only)
  if jax.process_count() == 1:
    return open_store(False)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  writer = open_store(False) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("generate_topk: store opened")
  return writer or open_store(True)


def run(config) -> dict:
  """Scores every record of `config.data.corpus` not yet in the store; returns the summary."""
  workdir, _, checker = gen.start_job(config)
  spec = TopKSpec.from_config(config)
  data = DataSpec.from_config(config.data, workdir=config.workdir, seed=config.seed)
  start = time.time()
  records, read_stats = readers.read_corpus(data.corpus_path, data.format, data.skip_bad_records,
                                            data.columns)
  teacher, tok, scorer = _scorer(config, spec)
  try:
    seqs, token_stats = sequences.tokenize_records(records, tok, data.chat_template,
                                                 show_progress=spec.progress)
    cfg = teacher.cfg if backend.MODEL in teacher.capabilities else None  # a model at hand
    max_len = spec.max_len or (cfg.max_position_embeddings if cfg else 0)
    keep = [i for i, s in enumerate(seqs) if (not max_len or len(s.tokens) <= max_len)
            and s.loss_mask[1:].any()]
    writer = _open_store(spec, teacher.name, tok, token_stats["mode"], cfg)
    vocab = writer.index["tokenizer"]["vocab"]
    summary = {"teacher": teacher.name, "k": spec.k, "mode": spec.mode, "store": spec.store_dir,
               "records": len(records), "too_long_or_empty": len(records) - len(keep),
               "skipped": sum(records[i].id in writer.done_ids for i in keep), "written": 0,
               "rejected": 0, "shards_written": 0, "tokens_scored": 0, "response_tokens": 0,
               "unmapped_logprob_tokens": 0, "tokenize": token_stats,
               "data": read_stats.to_dict(), "leaks": {"records": 0, "ids": []}}
    shards = plan([len(seqs[i].tokens) for i in keep], spec.shard_records)
    bar = tqdm(total=len(keep) - summary["skipped"], unit="rec", desc="teacher top-k",
               disable=not spec.progress)
    main = jax.process_index() == 0  # the one host writing files
    with open(workdir / "rejects.jsonl" if main else os.devnull, "w", encoding="utf-8") as rejects:
      for shard in shards:
        todo = [keep[j] for j in shard if records[keep[j]].id not in writer.done_ids]
        if not todo:
          continue
        results = scorer.score([seqs[i].tokens for i in todo], [seqs[i].loss_mask for i in todo],
                               [records[i].id for i in todo])
        scored = []
        for i, result in zip(todo, results):
          if isinstance(result, Exception):
            rejects.write(json.dumps({"id": records[i].id,
                                      "error": f"{type(result).__name__}: {result}"}) + "\n")
            summary["rejected"] += 1
            continue
          tokens = Tokens(seqs[i].tokens, seqs[i].loss_mask, vocab)
          scored.append(dataclasses.replace(
              result, record=dataclasses.replace(records[i], tokens=tokens)))
          summary["tokens_scored"] += len(tokens.ids)
          summary["response_tokens"] += len(result.ids)
          hits = checker.hits(records[i].response) if checker else []
          if hits:
            summary["leaks"]["records"] += 1
            if len(summary["leaks"]["ids"]) < 100:
              summary["leaks"]["ids"].append({"id": records[i].id, "sentences": hits[:5]})
        if scored:
          writer.write_shard(scored)  # other hosts: only the ids
          summary["shards_written"] += 1
          summary["written"] += len(scored)
        bar.update(len(todo))
    bar.close()
    summary["unmapped_logprob_tokens"] = scorer.unmapped
    stored = len(writer.done_ids)
    complete = stored == len(keep)
    writer.finish(complete)
    summary |= {"stored_records": stored, "complete": complete,
                "shards": len(writer.index["shards"]),
                "store_id": topk_store.identity(spec.store_dir),
                "seconds": round(time.time() - start, 3)}
    summary["tokens_per_s"] = round(summary["tokens_scored"] / max(summary["seconds"], 1e-9), 1)
  finally:
    teacher.close()
  if summary["leaks"]["records"]:
    log.warning("%d stored records contain SentiBench test sentences (summary.json: leaks)",
                summary["leaks"]["records"])
  if jax.process_index() == 0:
    write_json_atomic(workdir / "summary.json", summary)
  log.info("top-k store %s: %d written, %d already there, %d rejected, %d skipped (too long or "
           "no response token); %d records in %d shards, k=%d, %d tokens scored in %.1f s",
           spec.store_dir, summary["written"], summary["skipped"], summary["rejected"],
           summary["too_long_or_empty"], stored, summary["shards"], spec.k,
           summary["tokens_scored"], summary["seconds"])
  return summary
