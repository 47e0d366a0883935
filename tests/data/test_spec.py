"""DataSpec (spec.py): every config.data key read once, defaults, bad values named."""
import dataclasses

import pytest

from sentijax.data import readers
from sentijax.data import records as records_lib
from sentijax.data import spec as spec_lib
from sentijax.data.spec import DataSpec


def test_data_spec_reads_the_config_once_and_names_bad_keys(tmp_path):
  from sentijax import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base()
  cfg.data.text_column = "review"
  cfg.data.seq_len = 64
  spec = DataSpec.from_config(cfg.data, workdir=str(tmp_path), seed=3)
  assert spec.cache_dir == str(tmp_path / "data") and spec.seed == 3 and spec.seq_len == 64
  assert spec.columns == readers.HFColumns(text="review")
  assert spec.corpus_path == records_lib.demo_corpus_path()
  # Every config.data key is read (a DataSpec field or an HFColumns column key), and the
  # DataSpec defaults are the config's.
  fields = {f.name for f in dataclasses.fields(DataSpec)} - {"columns", "seed"}
  assert set(config_lib.base().data.keys()) == fields | set(spec_lib.COLUMN_KEYS)
  assert DataSpec.from_config({}) == DataSpec()
  defaults = DataSpec.from_config(config_lib.base().data)
  assert dataclasses.replace(defaults, cache_dir="") == DataSpec()
  for key, value, why in [("truncation", "cut", "expected one of"), ("seq_len", 1, ">= 2"),
                          ("val_fraction", 1.0, r"\[0, 1\)"), ("format", "csv", "expected one of"),
                          ("seq_len", "long", "expected int"), ("shuffle", "no", "bool")]:
    with pytest.raises(records_lib.DataError, match=f"data.{key}=.*{why}"):
      DataSpec.from_config({key: value})
