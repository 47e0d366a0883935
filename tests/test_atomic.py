"""Atomic files: the old content survives a failed write, and no temp file is left behind."""
import json

import pytest

from sentijax import atomic


def test_atomic_open_replaces_only_on_success(tmp_path):
  path = tmp_path / "sub" / "out.json"
  atomic.write_json(path, {"a": "é", "b": [1, 2]})
  assert path.read_text(encoding="utf-8") == '{\n "a": "é",\n "b": [\n  1,\n  2\n ]\n}\n'
  with pytest.raises(RuntimeError):
    with atomic.atomic_open(path) as f:
      f.write('{"half": ')
      raise RuntimeError("killed mid-write")
  assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é", "b": [1, 2]}
  with atomic.atomic_open(tmp_path / "blob.bin", "wb") as f:
    f.write(b"\x00\x01")
  assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
  assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["blob.bin", "out.json"]
  with pytest.raises(ValueError, match="mode"):
    with atomic.atomic_open(path, "a"):
      pass
