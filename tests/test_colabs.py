"""The notebooks of colabs/ run top to bottom from a clean kernel, as a reader runs them.

Each notebook is executed by nbclient in a fresh IPython kernel started from the "python3"
kernel spec of the environment pytest runs in (ipykernel's, whose ``python`` jupyter_client
replaces with ``sys.executable``), with colabs/ as the working directory. A cell that raises
fails the test, and so does a notebook that runs past its time budget. The notebooks are stored
without outputs; set ``NM_COLABS_OUT=DIR`` to keep the executed copies, plots included.
"""

import os
import pathlib
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
# Seconds for a whole notebook on a 2-core CPU (each takes about a minute there).
BUDGET_S = 300


def test_notebooks_found_and_stored_without_outputs():
  assert NOTEBOOKS, f"no notebooks in {COLABS}"
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: outputs"
    assert "NM_SPARSE_JAX_REPO" in code[0].source, f"{path.name}: no install cell first"


def test_kernel_runs_this_interpreter():
  argv = KernelSpecManager().get_kernel_spec("python3").argv
  names = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info)}
  assert argv[0] in names or os.path.samefile(argv[0], sys.executable), argv


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_from_a_clean_kernel(path):
  nb = nbformat.read(path, as_version=4)
  deadline = time.monotonic() + BUDGET_S
  client = NotebookClient(
    nb,
    kernel_name="python3",
    timeout=BUDGET_S,
    resources={"metadata": {"path": str(COLABS)}},
  )
  # Each cell may use what is left of the notebook's budget.
  client.on_cell_execute = lambda cell, cell_index: setattr(
    client, "timeout", max(1, int(deadline - time.monotonic()))
  )
  try:
    client.execute()
  finally:
    out = os.environ.get("NM_COLABS_OUT")
    if out:
      pathlib.Path(out).mkdir(parents=True, exist_ok=True)
      nbformat.write(nb, pathlib.Path(out) / path.name)
