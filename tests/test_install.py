"""A non-editable install (`pip install .`) carries what an editable one finds in the checkout: the packaged
configs (`--config shapes` by name) and the shapes plug-in (registered by its entry point)."""

import os
import subprocess
import sys

from test_launch import ROOT, run_watched
from test_shapes_main import SHRINK


def test_a_non_editable_install_trains_the_packaged_shapes_config(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(ROOT)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"  # no train_configs/ and no checkout here
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = run_watched([sys.executable, "-c", "import ldm_pipeline; print(ldm_pipeline.__file__)"], timeout=60,
                        cwd=work, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # not the checkout's
    args = [sys.executable, "-m", "ldm_pipeline.cli", "train", "--config", "shapes"] + \
        [f"--set={override}" for override in SHRINK]
    result = run_watched(args, timeout=300, cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "making 96 synthetic shapes images in data/shapes" in result.stdout  # the plug-in, found installed
    assert (work / "outputs" / "shapes" / "pipeline" / "model_index.json").is_file()
