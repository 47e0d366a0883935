"""The Colab notebook stays valid, and its `ci`-tagged cells run here on tiny settings.

The cells run in one namespace with `exec`, in notebook order, on the 8 fake CPU devices of
conftest.py; after the `parameters` cell the settings are swapped for tiny ones (papermill style).
"""
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "sentijax_tpu.ipynb"


def _code_cells(tag: str | None = None) -> list[tuple[int, list[str], str]]:
  """(index, tags, source) of the code cells, those with `tag` only when given."""
  cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
  out = []
  for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
      continue
    tags = cell.get("metadata", {}).get("tags", [])
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    if tag is None or tag in tags:
      out.append((i, tags, source))
  return out


def test_notebook_is_valid_nbformat_without_outputs():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "clear the outputs"


def test_ci_cells_are_plain_python():
  ci = _code_cells("ci")
  assert len(ci) >= 5 and sum("parameters" in tags for _, tags, _ in ci) == 1
  for i, _, source in ci:
    for line in source.splitlines():
      assert not line.lstrip().startswith(("!", "%")), f"cell {i}: shell/magic line in a ci cell"
    compile(source, f"cell {i}", "exec")
  # Only the install cells (shell + magics) are left out of CI.
  for i, tags, source in _code_cells():
    if "ci" not in tags:
      assert "pip install" in source or "git clone" in source, f"cell {i} is not tagged ci"


def test_ci_cells_run_on_tiny_settings(sentibench_dir, tmp_path):
  tiny = dict(WORKDIR=str(tmp_path), HF_MODEL_DIR="", SENTIBENCH_DIR=str(sentibench_dir),
              DATASETS="sc/sst2,absa/atsa_rest16", SEEDS="42", MAX_EXAMPLES=4, MAX_NEW_TOKENS=8,
              KNOWDIST_STEPS=3)
  namespace = {"__name__": "__notebook__"}
  for i, tags, source in _code_cells("ci"):
    code = compile(source, f"{NOTEBOOK.name} cell {i}", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
    if "parameters" in tags:
      missing = set(tiny) - set(namespace)
      assert not missing, f"the parameters cell no longer defines {missing}"
      namespace.update(tiny)

  assert namespace["result"].step == 3
  assert len(namespace["result"].train_losses) == 3
  for results in (namespace["results"], namespace["student"]):
    assert set(results["datasets"]) == {"sc/sst2", "absa/atsa_rest16"}
    assert 0.0 <= results["average"] <= 100.0
  assert (tmp_path / "knowdist" / "hf" / "config.json").is_file()
  assert (tmp_path / "knowdist" / "checkpoints").is_dir()
  assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [
      "absa_atsa_rest16_42.jsonl", "sc_sst2_42.jsonl"]
