"""The notebooks: each runs top to bottom (on tiny training runs), and each is committed with its outputs,
so that its figures show where the repository is browsed."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
ALL = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("notebook", ALL)
def test_committed_notebooks_keep_their_outputs(notebook):
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), f"{notebook} has cells that were not run: run it and save it"
    assert sum(len(cell.outputs) for cell in code) >= len(code) // 2, f"{notebook} has lost its outputs"
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{notebook} was saved with an error: {errors[0].get('ename')}"
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert figures, f"{notebook} shows no figure"


@pytest.fixture(scope="module")
def notebook_runs(tmp_path_factory, monkeypatch_module):
    runs = tmp_path_factory.mktemp("notebook_runs")
    monkeypatch_module.setenv("NOAH_NOTEBOOK_FAST", "1")  # the same cells on tiny training runs
    monkeypatch_module.setenv("NOAH_RUNS", str(runs))
    return runs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
@pytest.mark.parametrize("notebook, expected", [
    ("01_noah_head.ipynb", ["the same as the module's: True", "grouped-convolution form gives the same logits: True",
                            "uniform-attention NOAH equals GAPHead on the value channels x[:, Ck:]: True",
                            "every POCA is uniform, 1/L: True", "resnet50 "]),
    ("02_quick_training.ipynb", ["NOAH      best validation top-1", "GAP + FC  best validation top-1"]),
    ("03_poca_maps.ipynb", ["pointing game: NOAH", "in its own tile", "GAP + FC: CAM", "peaks on its own tile",
                            "random point, uniform map"]),
    ("04_real_photos.ipynb", ["NOAH      val top-1", "GAP + FC  val top-1", "NOAH: class evidence", "GAP + FC: CAM",
                              "centred box / uniform / centre", "normalized entropy | peak / uniform", "ring, padded",
                              "flipped: with content", "photo "]),
])
def test_notebook_runs_top_to_bottom(notebook, expected, notebook_runs):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert all(text in printed for text in expected), printed[-2000:]
    assert "False" not in printed
