"""Tokenise, mask, pack, store and read KnowDist records.

Batch schema (what `PackedDataset.batches(...)` yields, one dict per step, numpy arrays of shape
[local_batch, seq_len] where local_batch = batch_size // process_count):

  inputs       int32    token ids fed to the model (0 on padding)
  targets      int32    next-token ids: targets[t] is the token after inputs[t] (0 on padding)
  weights      float32  1.0 where targets[t] is a response token (incl. the final eos / end of turn)
                        and counts in the loss; 0.0 on prompt tokens and padding
  segment_ids  int32    1..k for the k sequences packed into a row, 0 on padding; attention
                        must stay within a segment (causal AND segment_ids[q] == segment_ids[k])
  positions    int32    position of each token within its own sequence (restarts at 0 per
                        segment; 0 on padding), for RoPE

The loss is sum(weights * CE(logits, targets)) / sum(weights).

Per record: with `chat_template=True` and a tokenizer that has one, the conversation
[user: prompt (or record.messages), assistant: response] is rendered with the chat template; the
prompt rendering with add_generation_prompt=True marks where the loss starts (prompt and response
strings are tokenised separately, exactly as the student sees them at generation time). Otherwise
raw: [bos] + tok(prompt) + tok(response) + [eos], loss on the response tokens and eos. A sequence
of n tokens becomes one example of n - 1 positions (inputs = tokens[:-1], targets = tokens[1:],
weights = loss_mask[1:]), so a sequence fits a row when n - 1 <= seq_len.

Truncation (`data.truncation`): `left_prompt` drops prompt tokens from the left (after bos) and
then the response's tail; `drop` skips over-long records. Records with no loss token left are
dropped. Both are counted in `stats`.

Packing is greedy first-fit in corpus order into rows of seq_len; no sequence is split across
rows. Rows are stored once per (corpus content, tokenizer, seq_len, options) as array_record via
a tensorflow-datasets builder under `cache_dir`, and read with grain: a deterministic per-epoch
shuffle (seed folded with the epoch), infinite repeat, and per-host shards. Global batch `step`
is flat rows [step * B, (step + 1) * B) of the shuffled stream; process p of P reads only rows
[p * B / P, (p + 1) * B / P) of it, so the union over processes is the global batch and a run
resumed at `step` (any process count) continues exactly where it stopped.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentijax.data import corpus as corpus_lib
from sentijax.data.corpus import Record
from sentijax.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)

FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions")
_FIELD_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                 "segment_ids": np.int32, "positions": np.int32}
TRUNCATIONS = ("left_prompt", "drop")
_CACHE_VERSION = "packed-v1"
_SPLIT = "rows"
_STATS_FILE = "sentijax_stats.json"
_TOKENIZE_CHUNK = 1024


class DataError(ValueError):
  """The data cannot be turned into training batches (all records dropped, bad options, ...)."""


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
  """One tokenised record before packing."""
  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # int32 [n], 1 on response tokens


# --------------------------------------------------------------------------- tokenisation


def _has_chat_template(tokenizer: Any) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
  if not texts:
    return []
  return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _render_chat(tokenizer: Any, record: Record) -> tuple[str, str]:
  """(prompt rendering with generation prompt, full rendering with the assistant turn)."""
  conversation = record.messages or [{"role": "user", "content": record.prompt}]
  prompt_text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                              add_generation_prompt=True)
  full_text = tokenizer.apply_chat_template(
      conversation + [{"role": "assistant", "content": record.response}], tokenize=False)
  return prompt_text, full_text


def tokenize_records(records: Sequence[Record], tokenizer: Any, chat_template: bool,
                     show_progress: bool = True) -> tuple[list[TokenizedSequence], dict]:
  """Tokenises every record into (tokens, loss_mask); returns the sequences and stats."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  use_chat = chat_template and _has_chat_template(tokenizer)
  if chat_template and not use_chat:
    logger.warning("data.chat_template=True but the tokenizer has no chat template: using the "
                   "raw [bos] prompt response [eos] format.")
  eos_id = tokenizer.eos_token_id
  if not use_chat and eos_id is None:
    raise DataError("The tokenizer has no eos token; the raw format needs one to end responses.")
  bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  stats = {"mode": "chat" if use_chat else "raw", "chat_boundary_fallback": 0}
  sequences: list[TokenizedSequence] = []
  progress = tqdm(total=len(records), desc="Tokenising", unit="rec", disable=not show_progress)
  for start in range(0, len(records), _TOKENIZE_CHUNK):
    chunk = records[start:start + _TOKENIZE_CHUNK]
    if use_chat:
      rendered = [_render_chat(tokenizer, r) for r in chunk]
      prompt_texts = [p for p, _ in rendered]
      split_ok = [full.startswith(p) for p, full in rendered]
      tails = [full[len(p):] if ok else full for (p, full), ok in zip(rendered, split_ok)]
      prompt_ids = _encode_batch(tokenizer, prompt_texts)
      tail_ids = _encode_batch(tokenizer, tails)
      for p_ids, t_ids, ok in zip(prompt_ids, tail_ids, split_ok):
        if ok:
          tokens, mask = p_ids + t_ids, [0] * len(p_ids) + [1] * len(t_ids)
        else:  # template renders the prompt differently once answered: common token prefix
          stats["chat_boundary_fallback"] += 1
          boundary = 0
          while (boundary < min(len(p_ids), len(t_ids))
                 and p_ids[boundary] == t_ids[boundary]):
            boundary += 1
          tokens, mask = t_ids, [0] * boundary + [1] * (len(t_ids) - boundary)
        sequences.append(TokenizedSequence(np.asarray(tokens, np.int32),
                                           np.asarray(mask, np.int32)))
    else:
      prompt_ids = _encode_batch(tokenizer, [r.prompt for r in chunk])
      response_ids = _encode_batch(tokenizer, [r.response for r in chunk])
      for p_ids, r_ids in zip(prompt_ids, response_ids):
        prompt_part = bos + p_ids
        response_part = r_ids + [eos_id]
        sequences.append(TokenizedSequence(
            np.asarray(prompt_part + response_part, np.int32),
            np.asarray([0] * len(prompt_part) + [1] * len(response_part), np.int32)))
    progress.update(len(chunk))
  progress.close()
  return sequences, stats


def fit_sequence(sequence: TokenizedSequence, seq_len: int, truncation: str, bos_id: int | None
                 ) -> tuple[TokenizedSequence | None, str]:
  """Fits a sequence to n - 1 <= seq_len. Returns (sequence or None, what happened)."""
  max_tokens = seq_len + 1
  tokens, mask = sequence.tokens, sequence.loss_mask
  outcome = "kept"
  if len(tokens) > max_tokens:
    if truncation == "drop":
      return None, "dropped_too_long"
    excess = len(tokens) - max_tokens
    num_prompt = int(np.argmax(mask)) if mask.any() else len(mask)
    keep_head = 1 if num_prompt and bos_id is not None and tokens[0] == bos_id else 0
    drop = min(excess, num_prompt - keep_head)
    keep = np.ones(len(tokens), bool)
    keep[keep_head:keep_head + drop] = False
    excess -= drop
    if excess:
      keep[len(tokens) - excess:] = False
      outcome = "truncated_response"
    else:
      outcome = "truncated_prompt"
    tokens, mask = tokens[keep], mask[keep]
  if len(tokens) < 2 or not mask[1:].any():
    return None, "dropped_empty_response"
  return TokenizedSequence(tokens, mask), outcome


# --------------------------------------------------------------------------- packing


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Greedy first-fit bin packing in order: each item goes to the first row with room.

  A max-segment-tree over remaining row capacities makes each placement O(log n).
  """
  if any(length > capacity or length <= 0 for length in lengths):
    raise ValueError(f"Every length must be in [1, {capacity}].")
  size = 1
  while size < max(len(lengths), 1):
    size *= 2
  tree = [capacity] * (2 * size)
  rows: list[list[int]] = []
  for item, length in enumerate(lengths):
    node = 1
    while node < size:
      node = 2 * node if tree[2 * node] >= length else 2 * node + 1
    row = node - size
    tree[node] -= length
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
    if row == len(rows):
      rows.append([])
    rows[row].append(item)
  return rows


def pack_row(sequences: Sequence[TokenizedSequence], seq_len: int) -> dict[str, np.ndarray]:
  """One packed row (dict of [seq_len] arrays) from sequences with total n - 1 <= seq_len."""
  row = {name: np.zeros(seq_len, dtype) for name, dtype in _FIELD_DTYPES.items()}
  offset = 0
  for segment, sequence in enumerate(sequences, start=1):
    length = len(sequence.tokens) - 1
    end = offset + length
    if end > seq_len:
      raise ValueError(f"Sequences of total length {end} do not fit seq_len={seq_len}.")
    row["inputs"][offset:end] = sequence.tokens[:-1]
    row["targets"][offset:end] = sequence.tokens[1:]
    row["weights"][offset:end] = sequence.loss_mask[1:]
    row["segment_ids"][offset:end] = segment
    row["positions"][offset:end] = np.arange(length)
    offset = end
  return row


# --------------------------------------------------------------------------- storage


def _make_builder_class(seq_len: int):
  """A tfds builder (unregistered) writing/reading packed rows of `seq_len`."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class PackedRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Packed KnowDist rows; the generator is given to the constructor."""
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
      # No checksums/metadata files to look up; the default resolves this package's path with
      # `importlib_resources`, which is not installed.
      return None

    def __init__(self, *, rows=None, **kwargs):
      self._row_generator = rows
      super().__init__(**kwargs)

    def _info(self):
      features = tfds.features.FeaturesDict({
          name: tfds.features.Tensor(shape=(seq_len,), dtype=dtype)
          for name, dtype in _FIELD_DTYPES.items()})
      return tfds.core.DatasetInfo(builder=self, features=features,
                                   description="sentijax packed KnowDist rows")

    def _split_generators(self, dl_manager):
      del dl_manager
      return {_SPLIT: self._generate_examples()}

    def _generate_examples(self):
      if self._row_generator is None:
        raise DataError("PackedRows was opened for reading but the data is not prepared.")
      for index, row in enumerate(self._row_generator()):
        yield index, row

  return PackedRows


def _write_json_atomic(path: Path, obj: Any) -> None:
  fd, tmp = corpus_lib.open_temp_file(path)
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def cache_key(records: Sequence[Record], tokenizer: Any, seq_len: int, chat_template: bool,
              truncation: str) -> str:
  """Hash of everything that determines the packed rows."""
  parts = {"version": _CACHE_VERSION, "corpus": corpus_lib.corpus_fingerprint(records),
           "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": seq_len,
           "chat_template": bool(chat_template and _has_chat_template(tokenizer)),
           "truncation": truncation}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- reading


class BatchIterator:
  """Iterator over this process's share of successive global batches, resumable by step.

  `get_state()` -> {"step", "batch_size", "seed", "shuffle"} (JSON-serialisable); after
  `set_state(state)` it yields exactly the batches an uninterrupted run would have yielded. The
  state is global (a step), so it can be restored with a different process count.
  """

  def __init__(self, dataset: "PackedDataset", batch_size: int, start_step: int,
               process_index: int, process_count: int, shuffle: bool, repeat: bool,
               prefetch: int):
    self.dataset = dataset
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.repeat = repeat
    self.prefetch = prefetch
    self.process_index = process_index
    self.process_count = process_count
    self._batches = dataset.grain_batches(batch_size, process_index, process_count,
                                          shuffle=shuffle, repeat=repeat)
    self.num_steps = len(self._batches) if not repeat else None
    self._step = start_step
    self._stream = None

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_steps is not None and self._step >= self.num_steps:
      raise StopIteration
    if self.prefetch:
      if self._stream is None:
        import grain  # pylint: disable=import-outside-toplevel
        options = grain.ReadOptions(num_threads=self.prefetch, prefetch_buffer_size=self.prefetch)
        self._stream = iter(self._batches[self._step:].to_iter_dataset(options))
      batch = next(self._stream)
    else:
      batch = self._batches[self._step]
    self._step += 1
    return batch

  @property
  def step(self) -> int:
    return self._step

  def get_state(self) -> dict:
    return {"step": self._step, "batch_size": self.batch_size, "seed": self.dataset.seed,
            "shuffle": self.shuffle}

  def set_state(self, state: dict) -> None:
    for key, mine in (("batch_size", self.batch_size), ("seed", self.dataset.seed),
                      ("shuffle", self.shuffle)):
      if key in state and state[key] != mine:
        raise ValueError(f"Cannot resume the data iterator: checkpoint has {key}={state[key]!r} "
                         f"but this run uses {mine!r}; restore the same data settings.")
    self._step = int(state["step"])
    self._stream = None


@dataclasses.dataclass
class PackedDataset:
  """Packed rows stored as array_record; random access by row, batches by step."""
  data_dir: str
  seq_len: int
  num_rows: int
  num_tokens: int
  seed: int
  shuffle: bool
  stats: dict
  _source: Any = dataclasses.field(default=None, repr=False)

  @property
  def source(self) -> Any:
    """The tfds array_record data source (random access: len(), [i] -> dict of arrays)."""
    if self._source is None:
      builder = _make_builder_class(self.seq_len)(data_dir=self.data_dir)
      self._source = builder.as_data_source(_SPLIT)
    return self._source

  def steps_per_epoch(self, batch_size: int) -> int:
    return math.ceil(self.num_rows / batch_size)

  def grain_batches(self, batch_size: int, process_index: int | None = None,
                    process_count: int | None = None, shuffle: bool | None = None,
                    repeat: bool = True) -> Any:
    """A grain MapDataset whose element `step` is this process's slice of global batch `step`."""
    import grain  # pylint: disable=import-outside-toplevel
    process_index, process_count = _process_info(process_index, process_count)
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the process "
                       f"count {process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    shuffle = self.shuffle if shuffle is None else shuffle
    local = batch_size // process_count
    rows = grain.MapDataset.source(self.source)
    if shuffle:
      rows = rows.shuffle(seed=self.seed)
    if repeat:
      rows = rows.repeat()  # reseeds the shuffle every epoch
    else:
      num_rows, padded = self.num_rows, self.steps_per_epoch(batch_size) * batch_size
      empty = {name: np.zeros(self.seq_len, dtype) for name, dtype in _FIELD_DTYPES.items()}
      one_epoch = rows
      rows = grain.MapDataset.range(padded).map(
          lambda i: one_epoch[i] if i < num_rows else empty)
    # Flat rows [m*local, (m+1)*local) form local batch m; global batch s = local batches s*P..
    return rows.batch(local, drop_remainder=True)[process_index::process_count]

  def batches(self, batch_size: int, start_step: int = 0, process_index: int | None = None,
              process_count: int | None = None, shuffle: bool | None = None,
              repeat: bool = True, prefetch: int = 0) -> BatchIterator:
    """Iterator over this process's [batch_size // process_count, seq_len] batches from
    `start_step`. `repeat=False` gives one epoch, the last batch padded with empty rows."""
    process_index, process_count = _process_info(process_index, process_count)
    shuffle = self.shuffle if shuffle is None else shuffle
    return BatchIterator(self, batch_size, start_step, process_index, process_count, shuffle,
                         repeat, prefetch)

  def batch_at(self, step: int, batch_size: int, process_index: int | None = None,
               process_count: int | None = None, shuffle: bool | None = None
               ) -> dict[str, np.ndarray]:
    """This process's slice of global batch `step` (infinite, repeating stream)."""
    return self.grain_batches(batch_size, process_index, process_count, shuffle)[step]


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


# --------------------------------------------------------------------------- building


def build_dataset(records: Sequence[Record], tokenizer: Any, cfg_data: Any,
                  cache_dir: str | os.PathLike, seed: int = 0, split: str = "train",
                  show_progress: bool = True) -> PackedDataset:
  """Tokenises, packs and stores `records` (once per content/options) and opens them.

  Uses `cfg_data.seq_len`, `.chat_template`, `.truncation` and `.shuffle` (shuffle applies to the
  train split only; other splits are read in stored order unless `batches(shuffle=True)`).
  """
  seq_len = int(corpus_lib.cfg_get(cfg_data, "seq_len", 512))
  chat_template = bool(corpus_lib.cfg_get(cfg_data, "chat_template", False))
  truncation = corpus_lib.cfg_get(cfg_data, "truncation", "left_prompt")
  shuffle = bool(corpus_lib.cfg_get(cfg_data, "shuffle", True)) and split == "train"
  if truncation not in TRUNCATIONS:
    raise DataError(f"data.truncation={truncation!r}; expected one of {TRUNCATIONS}.")
  if seq_len < 2:
    raise DataError(f"data.seq_len={seq_len} is too small.")
  if not records:
    raise DataError(f"No records for split {split!r}.")
  key = cache_key(records, tokenizer, seq_len, chat_template, truncation)
  data_dir = Path(cache_dir) / f"packed-{key[:24]}"
  stats_path = data_dir / _STATS_FILE
  builder_class = _make_builder_class(seq_len)
  if stats_path.is_file():
    stats = json.loads(stats_path.read_text()) | {"cache_hit": True, "split": split,
                                                  "data_dir": str(data_dir)}
    logger.info("Packed %s data found in %s.", split, data_dir)
  else:
    stats = _prepare(records, tokenizer, seq_len, chat_template, truncation, data_dir,
                     builder_class, show_progress)
    stats |= {"cache_key": key, "data_dir": str(data_dir)}
    _write_json_atomic(stats_path, stats)
    stats |= {"cache_hit": False, "split": split}
  logger.info("%s data: %d rows x %d, %d tokens (%.1f%% filled), %d loss tokens; dropped %d "
              "too long, %d empty; truncated %d.", split, stats["num_rows"], seq_len,
              stats["num_tokens"], 100 * stats["fill_ratio"], stats["num_loss_tokens"],
              stats["dropped_too_long"], stats["dropped_empty_response"],
              stats["truncated_prompt"] + stats["truncated_response"])
  return PackedDataset(data_dir=str(data_dir), seq_len=seq_len, num_rows=stats["num_rows"],
                       num_tokens=stats["num_tokens"], seed=seed, shuffle=shuffle, stats=stats)


def _prepare(records: Sequence[Record], tokenizer: Any, seq_len: int, chat_template: bool,
             truncation: str, data_dir: Path, builder_class: Any, show_progress: bool) -> dict:
  raw_sequences, token_stats = tokenize_records(records, tokenizer, chat_template, show_progress)
  counts = {"kept": 0, "truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0,
            "dropped_empty_response": 0}
  sequences = []
  for sequence in raw_sequences:
    fitted, outcome = fit_sequence(sequence, seq_len, truncation, tokenizer.bos_token_id)
    counts[outcome] += 1
    if fitted is not None:
      sequences.append(fitted)
  if not sequences:
    raise DataError(f"All {len(records)} records were dropped ({counts}); raise data.seq_len or "
                    "use data.truncation='left_prompt'.")
  rows = first_fit([len(s.tokens) - 1 for s in sequences], seq_len)
  num_tokens = sum(len(s.tokens) - 1 for s in sequences)

  def generate_rows():
    for row in rows:
      yield pack_row([sequences[i] for i in row], seq_len)

  data_dir.mkdir(parents=True, exist_ok=True)
  builder = builder_class(rows=generate_rows, data_dir=str(data_dir))
  try:
    builder.download_and_prepare(file_format="array_record")
  except OSError:
    # Another process sharing cache_dir may have finished the same (deterministic) rows first;
    # its final rename then makes ours fail.
    if not builder_class(data_dir=str(data_dir)).is_prepared():
      raise
    logger.info("%s was prepared concurrently by another process; using it.", data_dir)
  return token_stats | counts | {
      "records_in": len(records), "records_used": len(sequences), "num_rows": len(rows),
      "num_tokens": num_tokens, "seq_len": seq_len, "truncation": truncation,
      "num_loss_tokens": int(sum(int(s.loss_mask[1:].sum()) for s in sequences)),
      "fill_ratio": num_tokens / (len(rows) * seq_len)}


def build_train_val(cfg: Any, tokenizer: Any, show_progress: bool = True,
                    corpus: tuple[list[Record], list[Record], dict] | None = None
                    ) -> tuple[PackedDataset, PackedDataset | None, dict]:
  """Builds train and val datasets under `cfg.data.cache_dir` (default <workdir>/data) from
  `corpus` = `corpus.load_corpus(cfg.data)` (loaded here when None). Val is None when there are
  no val records."""
  train_records, val_records, corpus_stats = corpus or corpus_lib.load_corpus(cfg.data)
  cache_dir = cfg.data.cache_dir or os.path.join(cfg.workdir, "data")
  train = build_dataset(train_records, tokenizer, cfg.data, cache_dir, cfg.seed, "train",
                        show_progress)
  val = (build_dataset(val_records, tokenizer, cfg.data, cache_dir, cfg.seed, "val",
                       show_progress) if val_records else None)
  stats = {"corpus": corpus_stats, "train": train.stats, "val": val.stats if val else None}
  return train, val, stats

