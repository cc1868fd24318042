"""`ldm-pipeline demo`: the page driven in headless Chromium (playwright), as a user would."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from conftest import save_tiny_pipeline
from PIL import Image
from test_bad_input import assert_one_error_line

from ldm_pipeline.cli import main as cli
from ldm_pipeline.generation import read_png_metadata

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "a red square on the left"
EXAMPLES = ["a blue square on the right", PROMPT]  # as training writes them into ldm_pipeline.json


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the demo did not answer at {url} within {timeout} s")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_demo_page_generates_pngs_with_metadata(tmp_path, family):
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    model = save_tiny_pipeline(tmp_path / "pipeline", family=family)
    defaults = json.loads((model / "ldm_pipeline.json").read_text())
    (model / "ldm_pipeline.json").write_text(json.dumps({**defaults, "example_prompts": EXAMPLES}))
    port, log = free_port(), tmp_path / "demo.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "ldm_pipeline.cli", "demo", "--model", str(model), "--port",
                                   str(port), "--device", "cpu", "--out", str(tmp_path / "images")],
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_page(url, server, log)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            prompt = page.get_by_label("Prompt", exact=True)
            sync_api.expect(page.get_by_text("Prompts the model was trained on")).to_be_visible()
            sync_api.expect(prompt).to_have_value("")
            page.get_by_text(PROMPT, exact=True).click()  # one of the examples fills the prompt box
            sync_api.expect(prompt).to_have_value(PROMPT)
            page.get_by_label("Seed").fill("5")
            page.get_by_role("button", name="Generate").click()
            shown = page.locator("img[src$='.png']").first  # the gallery shows the PNG files themselves
            shown.wait_for(timeout=30_000)
            download = page.locator("a[download]").first
            png = page.request.get(download.get_attribute("href")).body()
            shown_png = page.request.get(shown.get_attribute("src")).body()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (32, 32)
        metadata = dict(image.text)
    assert metadata["prompt"] == PROMPT and metadata["seed"] == "5" and metadata["num_inference_steps"] == "2"
    assert shown_png == png
    assert read_png_metadata(tmp_path / "images" / "00000.png")["prompt"] == PROMPT


def test_demo_without_gradio_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    assert cli(["demo", "--model", str(tmp_path)]) == 2
    assert 'pip install -e ".[demo]"' in capsys.readouterr().err


@pytest.fixture
def temporary_root(tmp_path, monkeypatch):
    """The folder the demo's temporary image folder (no --out) is made in, for this test."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1"])
def test_a_port_out_of_range_is_refused_before_the_model_loads(tmp_path, temporary_root, capsys, port):
    assert cli(["demo", "--model", str(tmp_path / "never_loaded"), "--port", port]) == 2  # no model error first
    assert_one_error_line(capsys.readouterr().err, f"--port {port} is not a TCP port; give one from 1 to 65535")
    assert not list(temporary_root.iterdir())


def test_a_port_in_use_is_refused_before_serving_and_leaves_no_temporary_folder(tmp_path, temporary_root, capsys):
    with socket.socket() as server:  # another server, listening
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert cli(["demo", "--model", str(tmp_path / "never_loaded"), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert_one_error_line(err, f"--host 127.0.0.1 --port {port}: port {port} is in use on 127.0.0.1 (another demo "
                               "or server?); stop it, or choose another --port")
    assert "serving" not in out
    assert not list(temporary_root.iterdir())


def test_a_demo_that_fails_to_start_removes_its_empty_temporary_folder(tmp_path, temporary_root, capsys):
    assert cli(["demo", "--model", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    out, err = capsys.readouterr()
    assert_one_error_line(err, f"model {tmp_path / 'missing'} does not exist")
    assert "serving" not in out
    assert not list(temporary_root.iterdir())
