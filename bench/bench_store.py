"""Top-k store size and speed: store v4 vs v3, v2 (and the v1 format), on a real teacher.

    python bench/bench_store.py --model /work/models/smollm2 --records 32 --cache /tmp/t32.npz

The teacher (an HF Llama-family dir, SmolLM2-135M-Instruct: 49152 ids; made by
../shared/tools/smollm2_hf.py) scores the first `--records` records of
../shared/teacher_corpus (chat template, prompt + response, fp64 log-softmax in torch); its
top-128 and tail at every response token are then written as one-shard stores at k=128 and
k=20: v4 (the writer: topk_context.py), v3 (topk_entries.py), v2 (rank-ordered bit-packed ids +
8-bit log-prob deltas, lzma) and v1 (int32 ids + float32 log-probs, uncompressed npz). Printed
per (k, format): bytes per stored position (shard bytes / response positions, everything the
shard holds), write and read throughput (positions/s and MB/s of the float32 top-k they stand
for, k * 8 bytes per position; read = every record's soft targets decoded as training asks for
them), the KL(float64 teacher top-k + tail || what training reads) over the k + 1 buckets, mean
nats per position, and v4's range code by model. Teacher time is not counted. With
--v3-analyses also what led to v4: zstd instead of lzma, context models of v3's tail ids
(`context_sizes`) and the floors of the tail's two parts (`tail_floors`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sentijax.data import sequences, topk_store  # noqa: E402
from sentijax.data import tokenizer as tok_lib  # noqa: E402
from sentijax.data.records import Record, Tokens  # noqa: E402


MAX_DRAWS = 64
DRAWS = (8, 16, 24, 32, 64)


def teacher_topk(model_dir: str, n: int, k: int = 128):
  """[(record, ids [m, k], logprobs [m, k], log_tail [m], draws [m, 64], their logprobs)] from
  the real teacher (torch; draws at T = 1 from its full distribution)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  tok = tok_lib.load_tokenizer(model_dir)
  model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  corpus = REPO.parent / "shared" / "teacher_corpus" / "mixtral_reviews_500.jsonl"
  rows = [json.loads(x) for x in corpus.read_text().splitlines()[:n]]
  out = []
  for i, r in enumerate(rows):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Analyse this review:\n"
                                       + r["Text"]}], tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(r["mixtral_response"].strip() + "<|im_end|>", add_special_tokens=False)[
        "input_ids"]
    ids = (p_ids + r_ids)[:384]
    mask = np.array([0] * len(p_ids) + [1] * (len(ids) - len(p_ids)), np.int32)
    with torch.no_grad():
      lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    at = np.flatnonzero(mask[1:])  # row t predicts token t + 1
    vals, top = lp[at].topk(k, -1)
    rest = lp[at].scatter(-1, top, float("-inf")).logsumexp(-1)
    gen = torch.Generator().manual_seed(i)
    drawn = torch.multinomial(lp[at].exp(), MAX_DRAWS, replacement=True, generator=gen)
    rec = Record(f"r{i}", prompt, r["mixtral_response"].strip(), {"source_id": f"r{i}"},
                 tokens=Tokens(np.asarray(ids, np.int32), mask))
    out.append((rec, top.numpy().astype(np.int32), vals.numpy(), rest.numpy(),
                drawn.numpy().astype(np.int32), lp[at].gather(-1, drawn).float().numpy()))
  return tok, out


def cached_teacher_topk(model_dir: str, n: int, cache: str):
  """`teacher_topk`, saved to / read from `cache` (an npz) when given."""
  if cache and pathlib.Path(cache).is_file():
    with np.load(cache) as z:  # each array read once (an NpzFile reads it again per access)
      a = {name: z[name] for name in z.files}
    if int(a["n"]) == n:
      off, pos = a["tok_off"], a["pos_off"]
      raw = [(Record(f"r{i}", "p", "r", tokens=Tokens(a["tokens"][off[i]:off[i + 1]],
                                                      a["mask"][off[i]:off[i + 1]])),
              a["ids"][pos[i]:pos[i + 1]], a["lp"][pos[i]:pos[i + 1]],
              a["tail"][pos[i]:pos[i + 1]], a["draws"][pos[i]:pos[i + 1]],
              a["draw_lp"][pos[i]:pos[i + 1]]) for i in range(n)]
      tok = tok_lib.load_tokenizer(model_dir)
      return tok, [(with_text(tok, x[0]),) + tuple(x[1:]) for x in raw]
  tok, raw = teacher_topk(model_dir, n)
  if cache:
    np.savez(cache, n=n, tokens=np.concatenate([r.tokens.ids for r, *_ in raw]),
             mask=np.concatenate([r.tokens.loss_mask for r, *_ in raw]),
             tok_off=np.cumsum([0] + [len(r.tokens.ids) for r, *_ in raw]),
             pos_off=np.cumsum([0] + [len(x[1]) for x in raw]),
             ids=np.concatenate([x[1] for x in raw]), lp=np.concatenate([x[2] for x in raw]),
             tail=np.concatenate([x[3] for x in raw]), draws=np.concatenate([x[4] for x in raw]),
             draw_lp=np.concatenate([x[5] for x in raw]))
  return tok, raw


def with_text(tok, rec: Record) -> Record:
  """The record with its prompt and response text (decoded from its tokens), as a real store
  keeps them."""
  ids, mask = rec.tokens.ids, rec.tokens.loss_mask.astype(bool)
  return Record(rec.id, tok.decode(ids[~mask].tolist()), tok.decode(ids[mask].tolist()),
                {"source_id": rec.id}, tokens=rec.tokens)


def breakdown(store: pathlib.Path, positions: int) -> str:
  """Bytes per position of each array of a store's shards."""
  from sentijax.data import topk_codec  # pylint: disable=import-outside-toplevel
  sizes: dict[str, int] = {}
  for entry in topk_store.read_index(store)["shards"]:
    head, _ = topk_codec.read_header((store / entry["file"]).read_bytes())
    for e in head["arrays"]:
      sizes[e["name"]] = sizes.get(e["name"], 0) + e["size"]
  return ", ".join(f"{n} {b / positions:.1f}" for n, b in sizes.items())


def write_v1(store: pathlib.Path, tok, scored, k: int) -> None:
  """The v1 layout (the old writer's arrays, uncompressed npz), one shard."""
  store.mkdir(parents=True)
  lines = [json.dumps(s.record.to_json(with_tokens=False)).encode() for s in scored]
  np.savez(store / "shard-00000.npz", ids=np.array([s.record.id for s in scored]),
           records_json=np.frombuffer(b"".join(lines), np.uint8),
           record_offsets=np.cumsum([0] + [len(x) for x in lines]),
           tokens=np.concatenate([s.record.tokens.ids for s in scored]).astype(np.int32),
           token_offsets=np.cumsum([0] + [len(s.record.tokens.ids) for s in scored]),
           loss_mask=np.concatenate([s.record.tokens.loss_mask for s in scored]).astype(np.uint8),
           topk_ids=np.concatenate([s.ids for s in scored]).astype(np.int32),
           topk_logprobs=np.concatenate([s.logprobs for s in scored]).astype(np.float32))
  (store / "index.json").write_text(json.dumps({
      "format": topk_store.FORMAT_V1, "k": k, "teacher": "t",
      "tokenizer": topk_store.tokenizer_identity(tok), "render": {"mode": "chat"},
      "shards": [{"file": "shard-00000.npz", "records": len(scored)}], "complete": True}))


def read_v1(store: pathlib.Path) -> int:
  """The old loader's work: every shard in memory, exp of the log-probs."""
  n = 0
  for shard in topk_store.read_v1(store):
    for s in shard:
      n += len(np.exp(s.logprobs))
  return n


def write_old(store: pathlib.Path, tok, scored, k: int, version: int) -> None:
  """A version-2 or version-3 store as the previous writers made it, one shard."""
  # pylint: disable-next=import-outside-toplevel
  from sentijax.data import topk_codec, topk_entries, topk_format, topk_writer
  store.mkdir(parents=True)
  bits = topk_codec.id_bits(len(tok))
  arrays = topk_writer.record_arrays(scored)
  ids, lp = np.concatenate([s.ids for s in scored]), np.concatenate([s.logprobs for s in scored])
  tails = np.concatenate([s.log_tail for s in scored])
  encoding = topk_format.encoding(k, len(tok))
  if version == 2:
    arrays |= topk_codec.v2_arrays(ids, lp, tails, 0.125)
    encoding = {"id_bits": bits, "logprob_step": 0.125, "codec": "lzma"}
  else:
    arrays |= topk_entries.encode(ids, lp, tails, topk_format.quantiser({"encoding": encoding}),
                                  1 << bits)
  data = topk_codec.encode_shard(arrays, "lzma", {"tokens": bits, "topk_ids": bits,
                                                  "rank_table": bits, "loss_mask": 1})
  (store / "shard-00000.bin").write_bytes(data)
  (store / "index.json").write_text(json.dumps({
      "format": topk_store.FORMAT, "version": version, "mode": "topk", "k": k,
      "temperature": 1.0, "teacher": "t", "tokenizer": topk_store.tokenizer_identity(tok),
      "render": {"mode": "chat"}, "encoding": encoding,
      "shards": [{"file": "shard-00000.bin", "records": len(scored),
                  "tokens": int(len(arrays["tokens"])), "positions": int(len(lp)),
                  "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
      "complete": True}))


def read_store(store: pathlib.Path, k: int) -> int:
  recs, soft = topk_store.load(store, k)
  n = 0
  for r in recs:
    fields = soft.fn(r, sequences.TokenizedSequence(r.tokens.ids, r.tokens.loss_mask))
    n += int((fields["soft_probs"].sum(-1) > 0).sum())
  return n


def kl_error(scored, got) -> float:
  """Mean KL over the k + 1 buckets of the float store vs the decoded one (nats / position),
  entries matched by id (v3 orders tail entries by level, then frequency rank)."""
  total, count = 0.0, 0
  for s, g in zip(scored, got):
    o_s, o_g = np.argsort(s.ids, 1), np.argsort(g.ids, 1)
    assert (np.take_along_axis(s.ids, o_s, 1) == np.take_along_axis(g.ids, o_g, 1)).all()
    p = np.exp(np.take_along_axis(s.logprobs.astype(np.float64), o_s, 1))
    q = np.exp(np.take_along_axis(g.logprobs.astype(np.float64), o_g, 1))
    pt, qt = np.exp(s.log_tail.astype(np.float64)), np.exp(g.log_tail.astype(np.float64))
    kl = (p * np.log(p / q)).sum(-1) + np.where(pt > 0, pt * np.log(pt / np.maximum(qt, 1e-300)),
                                                0)
    total, count = total + kl.sum(), count + len(kl)
  return total / count


def row(k: int, name: str, size: int, positions: int, w_s: float, r_s: float, err: str) -> None:
  mb = positions * k * 8 / 1e6  # the float32 ids + log-probs the store stands for
  print(f"k={k:3d} {name:30s}: {size / positions:7.1f} B/pos, write {positions / w_s:8.0f} pos/s"
        f" ({mb / w_s:6.1f} MB/s), read {positions / r_s:8.0f} pos/s ({mb / r_s:6.1f} MB/s){err}")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="/work/models/smollm2")
  ap.add_argument("--records", type=int, default=48)
  ap.add_argument("--cache", default="", help="npz of the teacher's top-128 (made if missing)")
  ap.add_argument("--v3-analyses", action="store_true",
                  help="also the measurements that led to v4 (zstd, context models, floors)")
  args = ap.parse_args()
  t0 = time.time()
  tok, raw = cached_teacher_topk(args.model, args.records, args.cache)
  positions = sum(len(x[1]) for x in raw)
  print(f"teacher {args.model}: {len(raw)} records, {positions} response positions, vocab "
        f"{len(tok)} ({time.time() - t0:.0f} s, not counted)")
  tmp = pathlib.Path(tempfile.mkdtemp())
  try:
    for k in (128, 20):
      scored = []
      for rec, ids, lp, tail, _, _ in raw:
        tail_k = np.logaddexp(tail, np.log(np.exp(lp[:, k:]).sum(-1))) if k < lp.shape[1] \
            else tail
        scored.append(topk_store.ScoredRecord(rec, ids[:, :k], lp[:, :k], tail_k))
      t = time.perf_counter()
      write_v1(tmp / f"v1-{k}", tok, scored, k)
      w_s = time.perf_counter() - t
      t = time.perf_counter()
      read_v1(tmp / f"v1-{k}")
      row(k, "v1 (int32 + float32 npz)", (tmp / f"v1-{k}" / "shard-00000.npz").stat().st_size,
          positions, w_s, time.perf_counter() - t, "")
      for version in (2, 3, 4):
        store = tmp / f"v{version}-{k}"
        t = time.perf_counter()
        if version < topk_store.VERSION:
          write_old(store, tok, scored, k, version)
        else:
          w = topk_store.StoreWriter(store, k=k, teacher="t", tokenizer=tok,
                                     render={"mode": "chat"})
          w.write_shard(scored)
          w.finish(True)
        w_s = time.perf_counter() - t
        t = time.perf_counter()
        assert read_store(store, k) == positions
        r_s = time.perf_counter() - t
        size = sum(s["bytes"] for s in topk_store.read_index(store)["shards"])
        err = kl_error(scored, topk_store.read_records(store))
        row(k, f"v{version} lzma", size, positions, w_s, r_s, f", KL error {err:.2e} nats/pos")
        print(f"          per array (B/pos): {breakdown(store, positions)}")
      range_code_streams(tok, scored, k, positions)
      if args.v3_analyses:
        zstd_size(tok, scored, k, positions)
        context_sizes(scored, k, positions)
        tail_floors(scored, k, positions)
    sample_sizes(tmp, tok, raw, positions)
  finally:
    shutil.rmtree(tmp)


def range_code_streams(tok, scored, k: int, positions: int) -> None:
  """Bytes per position of v4's range code by model (membership, escapes, shape, values,
  ties: topk_context.py)."""
  from sentijax.data import topk_context, topk_format  # pylint: disable=import-outside-toplevel
  tokens = np.concatenate([s.record.tokens.ids for s in scored])
  mask = np.concatenate([s.record.tokens.loss_mask for s in scored])
  enc = topk_format.encoding(k, len(tok))
  stats: dict[str, int] = {}
  topk_context.encode(np.concatenate([s.ids for s in scored]),
                      np.concatenate([s.logprobs for s in scored]),
                      np.concatenate([s.log_tail for s in scored]),
                      *topk_context.context_tokens(tokens, mask),
                      topk_format.quantiser({"encoding": enc}), 1 << enc["id_bits"], stats)
  print(f"          v4 range code by model (B/pos): "
        + ", ".join(f"{n} {b / 8 / positions:.1f}" for n, b in stats.items()))


def zstd_size(tok, scored, k: int, positions: int) -> None:
  """The v3 arrays compressed with zstd-19 (PyPI zstandard) instead of lzma."""
  try:
    import zstandard  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("zstandard not installed: zstd not measured")
    return
  from sentijax.data import topk_codec, topk_format, topk_writer  # pylint: disable=C0415
  index = {"mode": "topk", "version": 3, "k": k, "encoding": topk_format.encoding(k, len(tok))}
  bits = index["encoding"]["id_bits"]
  arrays = topk_writer.shard_arrays(scored, index)
  raw_bytes = [(topk_codec.pack_bits(a, bits).tobytes() if n in topk_writer.ID_ARRAYS
                else np.ascontiguousarray(a).tobytes()) for n, a in arrays.items() if n != "ids"]
  zs = sum(len(zstandard.ZstdCompressor(level=19).compress(b)) for b in raw_bytes)
  print(f"k={k:3d} v3 arrays with zstd-19 (PyPI zstandard): {zs / positions:7.1f} B/pos")


def _chain_parents(key: np.ndarray) -> np.ndarray:
  """Per position, the last earlier position with the same key (-1: none)."""
  order = np.lexsort((np.arange(len(key)), key))
  parent = np.full(len(key), -1)
  same = key[order][1:] == key[order][:-1]
  parent[order[1:][same]] = order[:-1][same]
  return parent


def _tails(scored, k: int) -> dict[str, np.ndarray]:
  """Every position's tail in v3's order (level, frequency rank), flat: row, level, rank, id;
  per position: record, top-1 id."""
  from sentijax.data import topk_entries as te  # pylint: disable=import-outside-toplevel
  from sentijax.data import topk_format  # pylint: disable=import-outside-toplevel
  ids = np.concatenate([s.ids for s in scored]).astype(np.int64)
  lp = np.concatenate([s.logprobs for s in scored]).astype(np.float64)
  q = topk_format.quantiser({"encoding": topk_format.encoding(k, 1 << 16)})
  valid, head, _, levels = te.quantised(ids, lp, q)
  tail = valid & ~head
  perm = te._permutation(  # rank -> id  pylint: disable=protected-access
      te.rank_table(np.bincount(ids[valid], minlength=1 << 16)), 1 << 16)
  t = tail.sum(1)
  key = np.sort(np.where(tail, levels << 32 | np.argsort(perm)[ids], np.int64(1) << 62), axis=1)
  key = key[t[:, None] > np.arange(k)]
  return {"row": np.repeat(np.arange(len(ids)), t), "level": key >> 32,
          "rank": key & 0xFFFFFFFF, "id": perm[key & 0xFFFFFFFF], "top1": ids[:, 0],
          "record": np.repeat(np.arange(len(scored)), [len(s.ids) for s in scored])}


def context_sizes(scored, k: int, positions: int) -> None:
  """What a context model of the tail ids would save (measured before any format change): per
  position, the tail of a context position (an earlier one) is coded as a carry byte per context
  entry (0 = not in this tail, else 1 + its level here), the rest of the tail (new ids) as v3
  codes a tail (level deltas, frequency-rank gaps as exp-Golomb symbols + low bits); lzma on
  each stream. Prints bytes per position of the tail's streams (v3: context `none`)."""
  import lzma  # pylint: disable=import-outside-toplevel
  from sentijax.data import topk_entries as te  # pylint: disable=import-outside-toplevel
  e = _tails(scored, k)
  row, lev, m = e["row"], e["level"], len(e["top1"])
  entry = row * (1 << 16) + e["id"]  # (position, id) of every tail entry
  by_entry = np.argsort(entry)
  previous = np.arange(m) - 1
  previous[np.flatnonzero(np.diff(e["record"], prepend=-1))] = -1
  contexts = {"none (v3)": np.full(m, -1), "previous position": previous,
              "same top-1, record": _chain_parents(e["record"] * (1 << 16) + e["top1"]),
              "same top-1, shard": _chain_parents(e["top1"])}

  def level_at(rows: np.ndarray) -> np.ndarray:
    """Level + 1 of each entry's id at `rows` (0: not in that tail)."""
    want = rows * (1 << 16) + e["id"]
    at = by_entry[np.clip(np.searchsorted(entry[by_entry], want), 0, len(entry) - 1)]
    return np.where((rows >= 0) & (entry[at] == want), lev[at] + 1, 0)

  for name, parent in contexts.items():
    child = np.full(m, -1)  # each position is the context of at most one later one
    child[parent[parent >= 0]] = np.flatnonzero(parent >= 0)
    order = np.lexsort((np.arange(len(row)), child[row]))  # grouped by the position coded
    carry = level_at(child[row])[order][child[row][order] >= 0].astype(np.uint8)
    new = level_at(parent[row]) == 0
    level_delta, gaps = te.level_gaps(lev[new], e["rank"][new], np.bincount(row[new],
                                                                            minlength=m))
    sym, low, bits = te.split_values(gaps)
    sizes = [len(lzma.compress(x.tobytes())) / positions for x in (
        carry, sym, level_delta.astype(np.uint8))] + [len(te.pack_varbits(low, bits)) / positions]
    print(f"k={k:3d} tail ids by context {name:19s}: carry {sizes[0]:5.1f} + symbols "
          f"{sizes[1]:5.1f} + low bits {sizes[3]:5.1f} + levels {sizes[2]:5.1f} = "
          f"{sum(sizes):6.1f} B/pos; {1 - new.mean():.1%} of tail entries carried")


def _entropy_bits(*columns: np.ndarray) -> float:
  _, counts = np.unique(np.stack(columns, 1), axis=0, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def tail_floors(scored, k: int, positions: int) -> None:
  """Lower bounds of the tail's two parts. Sets: each id's positions as a subset of the shard's
  (log2 C(M, count) bits per id: the shard's unigram model, counts free) or of its record's
  (a record's own frequencies, free: what a record-adaptive model could at best reach; what
  sending those frequencies would cost, plainly coded). Levels:
  entropy per entry, alone and given the same id's level at its last earlier position in the
  record (the history a context model would use)."""
  lgamma = np.vectorize(math.lgamma)
  e = _tails(scored, k)

  def subsets(n: np.ndarray, c: np.ndarray) -> float:
    return float((lgamma(n + 1) - lgamma(c + 1) - lgamma(n - c + 1)).sum() / math.log(2))

  shard = subsets(len(e["top1"]), np.bincount(e["id"])[np.bincount(e["id"]) > 0])
  rec = e["record"][e["row"]]
  _, pair_counts = np.unique(rec * (1 << 16) + e["id"], return_counts=True)
  rec_of_pair = np.unique(rec * (1 << 16) + e["id"]) >> 16
  per_record = np.bincount(e["record"])  # positions
  record = subsets(per_record[rec_of_pair], pair_counts)
  distinct = np.bincount(rec_of_pair, minlength=len(per_record))  # a record table's ids...
  table = subsets(np.full(len(distinct), 1 << 16), distinct) + float(
      (distinct * np.log2(np.maximum(per_record, 1))).sum())  # ... + log2(positions) per count
  order = np.lexsort((e["row"], e["id"], rec))
  level = e["level"][order]
  seen = np.zeros(len(order), bool)
  seen[1:] = (rec[order][1:] == rec[order][:-1]) & (e["id"][order][1:] == e["id"][order][:-1])
  last = np.where(seen, np.concatenate([[-1], level[:-1]]), -1)
  h_level = _entropy_bits(level)
  h_given = _entropy_bits(level, last) - _entropy_bits(last)
  print(f"k={k:3d} tail floors: id sets {shard / 8 / positions:5.1f} B/pos (shard unigram), "
        f"{record / 8 / positions:5.1f} (record unigram, its table free; the table as a subset "
        f"of the ids + counts: {table / 8 / positions:5.1f}); levels "
        f"{h_level:.2f} bits/entry, {h_given:.2f} given the id's last level in the record "
        f"({seen.mean():.0%} had one)")


def sample_sizes(tmp: pathlib.Path, tok, raw, positions: int) -> None:
  """Bytes per position of sample stores (topk.mode=sample) of N draws: the equal-bytes match."""
  from sentijax.teacher import topk  # pylint: disable=import-outside-toplevel
  for n in DRAWS:
    scored = []
    for rec, *_, drawn, drawn_lp in raw:
      ids, counts, lp = topk.distinct_counts(drawn[:, :n], drawn_lp[:, :n])
      scored.append(topk_store.ScoredRecord(rec, ids, lp, counts=counts))
    store = tmp / f"sample-{n}"
    t = time.perf_counter()
    w = topk_store.StoreWriter(store, k=n, teacher="t", tokenizer=tok, render={"mode": "chat"},
                               mode="sample")
    w.write_shard(scored)
    w.finish(True)
    w_s = time.perf_counter() - t
    size = sum(s["bytes"] for s in w.index["shards"])
    distinct = np.mean([float((s.counts > 0).sum(-1).mean()) for s in scored])
    print(f"sample N={n:2d} lzma: {size / positions:7.1f} B/pos ({distinct:.1f} distinct ids "
          f"per position), write {positions / w_s:9.0f} pos/s")
    print(f"          per array (B/pos): {breakdown(store, positions)}")


if __name__ == "__main__":
  main()
