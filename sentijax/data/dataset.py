"""Packed datasets: rows stored once as array_record (tfds), read as resumable batches (grain).

  train, val, stats = build_train_val(train_records, val_records, tokenizer, spec)
  batches = train.batches(batch_size, start_step=step, prefetch=train.prefetch)

`build_dataset` packs records with `packing.pack_records` (tokenise -> mask -> fit -> pack; see
packing.py for the row schema and the optional soft-target fields) and stores the rows once per
(records, tokenizer, seq_len, chat_template, truncation[, soft-target key]) under
`spec.cache_dir`; a second build with the same inputs opens the stored rows. Batches are dicts of
numpy arrays [local_batch, seq_len] (soft fields [local_batch, seq_len, K]), local_batch =
batch_size // process_count, so every field has the batch on axis 0.

Reading is deterministic: a per-epoch shuffle (seed folded with the epoch), infinite repeat, and
per-host shards. Global batch `step` is flat rows [step * B, (step + 1) * B) of the shuffled
stream; process p of P reads only rows [p * B / P, (p + 1) * B / P) of it, so the union over
processes is the global batch and a run resumed at `step` (any process count) continues exactly
where it stopped.
"""
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentijax.data import packing, sequences, writers
from sentijax.data.records import DataError, Record, corpus_fingerprint
from sentijax.data.spec import DataSpec
from sentijax.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger("sentijax")

_CACHE_VERSION = "packed-v3"  # v2: chat records keep the response string as it is; v3: soft
# fields stored only where nonzero (packing.compact_row)
_SPLIT = "rows"
_STATS_FILE = "sentijax_stats.json"


def _make_builder_class(seq_len: int, soft_width: int, extra_fields: tuple[str, ...] = ()):
  """A tfds builder (unregistered) writing/reading packed rows of `seq_len` (and soft width) in
  the stored layout (`packing.compact_row`: soft fields only where they are nonzero)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class PackedRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Packed training rows; the row generator is given to the constructor."""
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
          name: tfds.features.Tensor(shape=shape, dtype=dtype)
          for name, (shape, dtype) in packing.row_spec(seq_len, soft_width, extra_fields,
                                                       compact=True).items()})
      return tfds.core.DatasetInfo(builder=self, features=features,
                                   description="sentijax packed training rows")

    def _split_generators(self, dl_manager):
      del dl_manager
      return {_SPLIT: self._generate_examples()}

    def _generate_examples(self):
      if self._row_generator is None:
        raise DataError("PackedRows was opened for reading but the data is not prepared.")
      for index, row in enumerate(self._row_generator()):
        yield index, packing.compact_row(row)

  return PackedRows


def cache_key(records: Sequence[Record], tokenizer: Any, spec: DataSpec,
              soft_targets: sequences.SoftTargets | None = None) -> str:
  """Hash of everything that determines the packed rows."""
  parts = {"version": _CACHE_VERSION, "corpus": corpus_fingerprint(records),
           "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": spec.seq_len,
           "chat_template": sequences.uses_chat_template(tokenizer, spec.chat_template),
           "truncation": spec.truncation}
  if soft_targets is not None:
    parts["soft_targets"] = [soft_targets.width, soft_targets.key,
                             list(soft_targets.extra_fields)]
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- reading


class BatchIterator:
  """Iterator over this process's share of successive global batches, resumable by step.

  `get_state()` -> {"step", "rows", "batch_size", "seed", "shuffle", "process_count"}
  (JSON-serialisable); after `set_state(state)` it yields exactly the batches an uninterrupted run
  would have yielded. The position is global: `step` global batches = `rows` rows of the shuffled
  stream consumed, the same number on every host. Global batch s is rows [s * B, (s + 1) * B)
  whatever the process count P, host p reading its P-th of it, so a state saved by any number of
  processes restores on any other (`process_count` is recorded for the log, not checked).
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
    return {"step": self._step, "rows": self._step * self.batch_size,
            "batch_size": self.batch_size, "seed": self.dataset.seed, "shuffle": self.shuffle,
            "process_count": self.process_count}

  def set_state(self, state: dict) -> None:
    for key, mine in (("batch_size", self.batch_size), ("seed", self.dataset.seed),
                      ("shuffle", self.shuffle)):
      if key in state and state[key] != mine:
        raise ValueError(f"Cannot resume the data iterator: checkpoint has {key}={state[key]!r} "
                         f"but this run uses {mine!r}; restore the same data settings.")
    step = int(state["step"])
    if "rows" in state and int(state["rows"]) != step * self.batch_size:
      raise ValueError(f"Cannot resume the data iterator: checkpoint says {state['rows']} rows "
                       f"consumed but step {step} x batch_size {self.batch_size} = "
                       f"{step * self.batch_size}; the data state does not match the train step.")
    self._step = step
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
  soft_width: int = 0  # K of the soft_ids / soft_probs fields; 0 = no soft targets
  prefetch: int = 0  # what the training loop passes to `batches`
  extra_fields: tuple[str, ...] = ()  # sequences.EXTRA_SOFT_FIELDS the rows carry
  _source: Any = dataclasses.field(default=None, repr=False)

  @property
  def fields(self) -> tuple[str, ...]:
    """The names of the batch fields."""
    return tuple(packing.row_spec(self.seq_len, self.soft_width, self.extra_fields))

  @property
  def source(self) -> Any:
    """Random access to the stored rows (len(), [i] -> dict of arrays, soft fields dense)."""
    if self._source is None:
      builder = _make_builder_class(self.seq_len, self.soft_width, self.extra_fields)(
          data_dir=self.data_dir)
      self._source = _DenseRows(builder.as_data_source(_SPLIT))
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
      empty = packing.empty_row(self.seq_len, self.soft_width, self.extra_fields)
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


class _DenseRows:
  """A stored-row source read back in the dense row layout (`packing.expand_row`)."""

  def __init__(self, source: Any):
    self._rows = source

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return packing.expand_row(self._rows[index])


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


# --------------------------------------------------------------------------- building


def _store(packed: packing.PackedRows, data_dir: Path) -> None:
  builder_class = _make_builder_class(packed.seq_len, packed.soft_width, packed.extra_fields)
  data_dir.mkdir(parents=True, exist_ok=True)
  builder = builder_class(rows=packed.iter_rows, data_dir=str(data_dir))
  try:
    builder.download_and_prepare(file_format="array_record")
  except OSError:
    # Another process sharing cache_dir may have finished the same (deterministic) rows first;
    # its final rename then makes ours fail.
    if not builder_class(data_dir=str(data_dir)).is_prepared():
      raise
    logger.info("%s was prepared concurrently by another process; using it.", data_dir)


def build_dataset(records: Sequence[Record], tokenizer: Any, spec: DataSpec,
                  split: str = "train", soft_targets: sequences.SoftTargets | None = None,
                  show_progress: bool = True) -> PackedDataset:
  """Packs and stores `records` under `spec.cache_dir` (once per content/options), opens them.

  `spec.shuffle` applies to the train split only; other splits are read in stored order unless
  `batches(shuffle=True)`.
  """
  if not records:
    raise DataError(f"No records for split {split!r}.")
  if not spec.cache_dir:
    raise DataError("data.cache_dir is not set (DataSpec.from_config sets <workdir>/data).")
  key = cache_key(records, tokenizer, spec, soft_targets)
  data_dir = Path(spec.cache_dir) / f"packed-{key[:24]}"
  stats_path = data_dir / _STATS_FILE
  if stats_path.is_file():
    stats = json.loads(stats_path.read_text()) | {"cache_hit": True, "split": split,
                                                  "data_dir": str(data_dir)}
    logger.info("Packed %s data found in %s.", split, data_dir)
  else:
    packed = packing.pack_records(records, tokenizer, spec, soft_targets, show_progress)
    _store(packed, data_dir)
    stats = packed.stats | {"cache_key": key, "data_dir": str(data_dir)}
    writers.write_json_atomic(stats_path, stats)
    stats |= {"cache_hit": False, "split": split}
  logger.info("%s data: %d rows x %d, %d tokens (%.1f%% filled), %d loss tokens; dropped %d "
              "too long, %d empty; truncated %d.", split, stats["num_rows"], spec.seq_len,
              stats["num_tokens"], 100 * stats["fill_ratio"], stats["num_loss_tokens"],
              stats["dropped_too_long"], stats["dropped_empty_response"],
              stats["truncated_prompt"] + stats["truncated_response"])
  return PackedDataset(data_dir=str(data_dir), seq_len=spec.seq_len, num_rows=stats["num_rows"],
                       num_tokens=stats["num_tokens"], seed=spec.seed,
                       shuffle=spec.shuffle and split == "train", stats=stats,
                       soft_width=int(stats.get("soft_width", 0)), prefetch=spec.prefetch,
                       extra_fields=tuple(f for f in stats.get("soft_fields", ())
                                          if f in sequences.EXTRA_SOFT_FIELDS))


def build_train_val(train_records: Sequence[Record], val_records: Sequence[Record],
                    tokenizer: Any, spec: DataSpec, *,
                    soft_targets: sequences.SoftTargets | None = None, show_progress: bool = True
                    ) -> tuple[PackedDataset, PackedDataset | None, dict]:
  """The train and val datasets (val None when there are no val records) and their stats
  {"train": ..., "val": ...}; the one records -> batches path of every training job."""
  train = build_dataset(train_records, tokenizer, spec, "train", soft_targets, show_progress)
  val = (build_dataset(val_records, tokenizer, spec, "val", soft_targets, show_progress)
         if val_records else None)
  return train, val, {"train": train.stats, "val": val.stats if val else None}
