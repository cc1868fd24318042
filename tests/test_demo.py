"""`ldm-pipeline demo`: the page driven in headless Chromium (playwright), as a user would."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import save_tiny_pipeline
from PIL import Image

from ldm_pipeline.cli import main as cli
from ldm_pipeline.generation import read_png_metadata

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "a red square on the left"


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


def test_demo_page_generates_pngs_with_metadata(tmp_path):
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    model = save_tiny_pipeline(tmp_path / "pipeline")
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
            page.get_by_label("Prompt", exact=True).fill(PROMPT)
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
