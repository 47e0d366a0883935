"""`DataSpec`: the `config.data` section, read and checked once, passed to readers and packing.

  spec = DataSpec.from_config(config.data, workdir=config.workdir, seed=config.seed)

Nothing below this module reads the config: readers take `spec` (corpus, format, columns,
validation policy, val split), packing takes `spec` (seq_len, chat_template, truncation) and the
packed datasets take `spec` (cache_dir, shuffle, prefetch, seed).
"""
import dataclasses
import os
from pathlib import Path
from typing import Any

from sentijax.data.records import DataError, demo_corpus_path

FORMATS = ("auto", "records", "mixtral", "hf")
TRUNCATIONS = ("left_prompt", "drop")


@dataclasses.dataclass(frozen=True)
class HFColumns:
  """Column names for the `hf` adapter.

  `prompt` is used when the dataset has that column; otherwise `text` (if set) is turned into a
  KnowDist prompt with `prompts.perspective_for(id, prompt_seed)`. Without an `id` column the id is
  a hash of prompt and response. Remaining scalar columns go into `meta`.
  """
  id: str = "id"
  prompt: str = "prompt"
  response: str = "response"
  text: str = ""
  prompt_seed: int = 0


# config.data key -> (HFColumns field) for the hf adapter's column names.
COLUMN_KEYS = {"id_column": "id", "prompt_column": "prompt", "response_column": "response",
                "text_column": "text", "prompt_seed": "prompt_seed"}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the data layer needs from `config.data` (defaults = `sentijax.config.base()`)."""
  corpus: str = ""  # "" = the demo corpus in the package
  format: str = "auto"  # one of FORMATS
  val_corpus: str = ""  # "" = hold out val_fraction of the corpus
  val_fraction: float = 0.05
  skip_bad_records: bool = False
  columns: HFColumns = HFColumns()
  chat_template: bool = False
  seq_len: int = 512
  truncation: str = "left_prompt"  # one of TRUNCATIONS
  shuffle: bool = True  # the train split only
  prefetch: int = 2  # batches the training loop reads ahead in grain threads (0 = none)
  cache_dir: str = ""  # where packed rows are stored ("" = none set: building raises)
  seed: int = 0  # shuffle seed

  def __post_init__(self):
    checks = (
        ("format", self.format in FORMATS, f"expected one of {FORMATS}"),
        ("truncation", self.truncation in TRUNCATIONS, f"expected one of {TRUNCATIONS}"),
        ("seq_len", self.seq_len >= 2, "must be >= 2"),
        ("val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)"),
        ("prefetch", self.prefetch >= 0, "must be >= 0"),
    )
    for key, ok, why in checks:
      if not ok:
        raise DataError(f"data.{key}={getattr(self, key)!r}: {why}.")

  @property
  def corpus_path(self) -> Path:
    """The corpus file (the packaged demo corpus when `corpus` is empty)."""
    return Path(self.corpus) if self.corpus else demo_corpus_path()

  @classmethod
  def from_config(cls, cfg_data: Any, *, workdir: str | os.PathLike | None = None,
                  seed: int = 0) -> "DataSpec":
    """From a `config.data` ConfigDict or mapping; absent keys keep the defaults.

    `cache_dir` defaults to <workdir>/data; `seed` is the run's seed (`config.seed`).
    """
    def read(key: str, default: Any, kind: type) -> Any:
      value = cfg_data.get(key, default)
      if kind is bool and value not in (True, False):  # also refuses e.g. the string "False"
        raise DataError(f"data.{key}={value!r}: expected a bool.")
      try:
        return kind(value)
      except (TypeError, ValueError):
        raise DataError(f"data.{key}={value!r}: expected {kind.__name__}.") from None

    scalars = {}
    for field in dataclasses.fields(cls):
      if field.name in ("columns", "cache_dir", "seed"):
        continue
      scalars[field.name] = read(field.name, field.default, type(field.default))
    defaults = HFColumns()
    columns = HFColumns(**{name: read(key, getattr(defaults, name), type(getattr(defaults, name)))
                           for key, name in COLUMN_KEYS.items()})
    cache_dir = read("cache_dir", "", str) or (os.path.join(workdir, "data") if workdir else "")
    return cls(**scalars, columns=columns, cache_dir=str(cache_dir), seed=int(seed))
