"""The notebooks run top to bottom in fast mode, draw their figures, and write only to their workdir."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ldm_pipeline.notebook import REPO, NotebookSettings, notebook_settings, shapes_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# notebook -> (figures it must produce at least, directories it must create under the workdir)
EXPECTED = {
    "01_how_it_works.ipynb": (8, ["notebook-shapes-fast/pipeline", "notebook-images"]),
    "02_text_to_image.ipynb": (6, ["notebook-images"]),
    "03_train_in_a_notebook.ipynb": (3, ["notebook-train-fast/pipeline", "notebook-train-fast/samples"]),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared by the three notebooks, in order: 02 reuses the model 01 trained, as it would for a user."""
    return tmp_path_factory.mktemp("notebooks")


def test_notebooks_are_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code), name
        assert "notebook_settings()" in code[0].source, f"{name}: the first cell must read the fast-mode settings"


def test_fast_mode_and_workdir_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LDM_PIPELINE_FAST", raising=False)
    monkeypatch.delenv("LDM_PIPELINE_WORKDIR", raising=False)
    assert notebook_settings() == NotebookSettings(fast=False, workdir=REPO / "outputs")
    monkeypatch.setenv("LDM_PIPELINE_FAST", "1")
    monkeypatch.setenv("LDM_PIPELINE_WORKDIR", str(tmp_path))
    assert notebook_settings() == NotebookSettings(fast=True, workdir=tmp_path.resolve())
    monkeypatch.setenv("LDM_PIPELINE_FAST", "fast")
    with pytest.raises(ValueError, match="LDM_PIPELINE_FAST='fast': use 1"):
        notebook_settings()


def test_both_notebook_runs_are_valid_shapes_configs(tmp_path):
    """The full-size run is not trained by the suite, so at least its config must load."""
    fast = shapes_config(NotebookSettings(fast=True, workdir=tmp_path))
    full = shapes_config(NotebookSettings(fast=False, workdir=tmp_path))
    assert (fast.resolution, full.resolution) == (32, 64)
    assert fast.max_train_steps < full.max_train_steps and fast.output_dir != full.output_dir
    assert fast.stages == full.stages == ["vae", "unet"]  # as train_configs/shapes.yaml has them
    assert all(Path(c.output_dir).parent == tmp_path for c in (fast, full))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_fast_mode(name, workdir, monkeypatch):
    monkeypatch.setenv("LDM_PIPELINE_FAST", "1")
    monkeypatch.setenv("LDM_PIPELINE_WORKDIR", str(workdir))
    # One torch thread in the kernel: tiny models gain nothing from two, and on a busy 2-core machine
    # two OpenMP threads waiting on each other made training 10-30x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    started = time.perf_counter()
    # The kernel inherits this environment and starts in the workdir, so relative paths land there too.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    seconds = time.perf_counter() - started

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    min_figures, created = EXPECTED[name]
    assert figures >= min_figures, f"{name}: {figures} figures, expected at least {min_figures}"
    for path in created:
        assert (workdir / path).is_dir(), f"{name} did not write {path} into its workdir"
    assert not any((ROOT / "outputs").glob("notebook-*-fast")), "a notebook wrote into the repository"
    print(f"{name}: {seconds:.1f} s, {figures} figures")
