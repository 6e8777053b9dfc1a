"""`qualiteacher app` in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by
Playwright. Starts the app on a free 127.0.0.1 port, uploads an image, moves the level slider, runs
the level sweep and a corrupt upload, and saves a screenshot (tmp path + outputs/test_artifacts/).
Deselect with ``-m 'not browser'``."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("QUALITEACHER_CHROMIUM", "/usr/bin/chromium"))
# `./qt test` installs chromium when it can; without it the test is skipped with this reason (-ra shows it)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.is_file(),
                                 reason=f"{CHROMIUM} not found: Debian's chromium is needed for the browser test "
                                        f"(`./qt test` installs it as root or with sudo; else "
                                        f"`apt-get install -y chromium`, or set QUALITEACHER_CHROMIUM)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def app_server(app_checkpoint, demo_root, tmp_path):
    port = _free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "qualiteacher.cli", "app", "--checkpoint", str(app_checkpoint),
             "--port", str(port), "--examples", str(demo_root / "dehaze" / "test" / "lq")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for(url, server, log)
        yield url, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _output_pixels(page, request) -> np.ndarray:
    src = page.locator("#qt-output img").last.get_attribute("src")
    body = request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


def test_app_in_headless_chromium(app_server, demo_root, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, log = app_server
    image = sorted((demo_root / "dehaze" / "test" / "lq").glob("*.png"))[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1300})
            page.goto(url)
            expect(page.locator("#qt-level input[type=range]")).to_be_visible(timeout=60_000)
            # upload: the restored output and the scores appear (student at the top level)
            page.locator("#qt-input input[type=file]").set_input_files(str(image))
            scores, status = page.locator("#qt-scores"), page.locator("#qt-status")
            expect(status).to_contain_text("level 7", timeout=90_000)
            expect(scores).to_contain_text("fused", timeout=30_000)
            top_scores, top_pixels = scores.inner_text(), _output_pixels(page, page.request)
            assert top_pixels.shape[:2] == Image.open(image).size[::-1]
            # move the level slider to 1 with the mouse: output image and scores change
            rng = page.locator("#qt-level input[type=range]")
            box = rng.bounding_box()
            page.mouse.click(box["x"] + box["width"] * 1.2 / 7, box["y"] + box["height"] / 2)
            expect(status).to_contain_text("level 1", timeout=90_000)
            expect(scores).not_to_have_text(top_scores, timeout=30_000)
            low_pixels = _output_pixels(page, page.request)
            assert np.abs(low_pixels - top_pixels).mean() > 1.0, "the output image did not change with the level"
            # the level sweep: the image at every level, a score per level
            page.locator("#qt-sweep-button").click()
            sweep = page.locator("#qt-sweep-scores")
            expect(sweep).to_contain_text("level 7", timeout=90_000)
            expect(page.locator("#qt-sweep img")).to_have_count(8, timeout=30_000)
            shot = tmp_path / "app_browser.png"
            page.screenshot(path=str(shot), full_page=True)
            # a corrupt upload: a message in the page, and the app keeps serving
            page.locator("#qt-input input[type=file]").set_input_files(str(corrupt))
            expect(status).to_contain_text("⚠️", timeout=60_000)
            expect(status).to_contain_text("corrupt.png", timeout=5_000)
            page.screenshot(path=str(tmp_path / "app_browser_bad_upload.png"), full_page=True)
        finally:
            browser.close()
    artifacts = REPO / "outputs" / "test_artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    for name in ("app_browser.png", "app_browser_bad_upload.png"):
        shutil.copy(tmp_path / name, artifacts / name)
    assert Image.open(shot).size[0] >= 1280
    assert "Traceback" not in log.read_text()
