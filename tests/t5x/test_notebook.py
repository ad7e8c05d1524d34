"""colabs/t5x.ipynb, run top to bottom in a T5X environment, trains the tiny configuration.

tests/test_colabs.py runs every notebook wherever the suite runs (in CI without T5X, where the
T5X cells say they are skipped). Here, with T5X importable, the same notebook must take its real
path: ``python -m t5x.train`` on the tiny gin configuration, the summaries read back, and the
checkpoint verified and exported by ``nm_sparse_jax.t5x.checkpoint``.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="running notebooks needs nbformat (test extra)")
nbclient = pytest.importorskip("nbclient", reason="running notebooks needs nbclient (test extra)")
pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (test extra)")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "colabs" / "t5x.ipynb"


def _text(cell) -> str:
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      parts.append(out.text)
    elif "data" in out:
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


def test_t5x_notebook_trains_verifies_and_exports_for_real():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  ).execute()
  text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  assert "T5X is importable" in text and "NOT IMPORTABLE" not in text, text[:2000]
  assert "$ python -m t5x.train" in text and "'checkpoint_20'" in text, text
  assert "loss at steps" in text and "no summaries" not in text, text
  # The trained checkpoint holds dense W (the hook sparsifies in the forward pass); the exported
  # copy is hard N:M in every selected kernel.
  assert "NOT N:M" in text and "wrote " in text, text
  after = text.split("wrote ", 1)[1]
  assert " ok" in after and "FAIL" not in after, after[:3000]
