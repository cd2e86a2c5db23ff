"""Every notebook in colab/ runs top to bottom (nbclient, a fresh kernel, this CPU), in its quick
mode: `KVJAX_NOTEBOOK_QUICK=1` makes each notebook pick the sizes that run in a few minutes
(a tiny random model where the real one would take too long). A cell error fails the test.

Also: the notebooks are committed without outputs, and a notebook with a broken cell fails
(the runner does not swallow errors).

    python tests/test_notebooks.py colab/kvjax_quickstart.ipynb    # run one by hand
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 900


def run_notebook(path, workdir, *, quick: bool = True):
  """Executes the notebook at `path` in a fresh python3 kernel whose working directory is
  `workdir`; returns the executed notebook. Raises nbclient's CellExecutionError on the first
  failing cell (the cell's source and traceback in the message)."""
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(str(path), as_version=4)
  env = dict(os.environ, KVJAX_NOTEBOOK_QUICK="1" if quick else "0", MPLBACKEND="Agg",
             KVJAX_REPO=str(ROOT))
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(workdir)}})
  client.execute(env=env)
  return nb


def test_there_are_notebooks_and_they_hold_no_outputs():
  import nbformat
  assert len(NOTEBOOKS) >= 4, NOTEBOOKS
  for path in NOTEBOOKS:
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "install" in code[0].source.lower(), f"{path.name}: no install cell first"
    for c in code:
      assert not c.get("outputs") and c.get("execution_count") is None, \
          f"{path.name}: outputs are committed (strip them)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
  nb = run_notebook(path, tmp_path)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors


def test_a_broken_cell_fails_the_run(tmp_path):
  import nbformat
  from nbclient.exceptions import CellExecutionError
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("x = 1"),
      nbformat.v4.new_code_cell("raise ValueError('a deliberately broken cell')"),
      nbformat.v4.new_code_cell("print('never reached')")])
  path = tmp_path / "broken.ipynb"
  nbformat.write(nb, str(path))
  with pytest.raises(CellExecutionError, match="a deliberately broken cell"):
    run_notebook(path, tmp_path)


if __name__ == "__main__":
  for arg in sys.argv[1:]:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
      run_notebook(arg, d, quick=os.environ.get("KVJAX_NOTEBOOK_QUICK", "1") == "1")
    print(f"{arg}: ran top to bottom")
