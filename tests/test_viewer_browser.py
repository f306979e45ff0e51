"""The slice browser used by a person: JupyterLab in a real Chromium, driven by Playwright.

What the in-kernel tests cannot prove: that the widget renders in JupyterLab and
that a mouse and a keyboard move it. The test starts JupyterLab on 127.0.0.1 with
a token and throw-away config, settings, workspace and runtime folders, opens the
fixture notebook in Debian's Chromium (``/usr/bin/chromium``; Playwright's own
browser download is impossible offline), runs all cells, then moves the slice with
the keyboard and with a mouse drag, switches the view, the opacity, the modality and
the left-right convention, and checks each time that the readout text and the
picture's pixels changed. A second test opens the notebook's offline HTML copy and
checks that the static figure is displayed.

Without Chromium the tests are skipped with a message saying how to enable them,
except when the environment variable ``CI`` is set: there a missing browser fails.

Negative control: ``BRAINMRI_NEGATIVE_CONTROL=widgets-off`` starts JupyterLab with
the widget manager extension disabled; the live-widget test must then fail.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import series
from helpers.paths import PROJECT_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("BRAINMRI_CHROMIUM", "/usr/bin/chromium"))
FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "viewer_demo.ipynb"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOW_TO_ENABLE = ("the browser test needs Debian's Chromium at /usr/bin/chromium (or set "
                 "BRAINMRI_CHROMIUM): run `make browser` as root, or `sudo apt-get install chromium`")
NEGATIVE_CONTROL = os.environ.get("BRAINMRI_NEGATIVE_CONTROL", "") == "widgets-off"
STEP_TIMEOUT_S = 15.0


def _sync_playwright():
    """Playwright's sync API, or skip (fail under CI) saying how to get a browser."""
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} not found"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed (pip install -r requirements-test.txt)"
    if problem:
        message = f"{problem}; {HOW_TO_ENABLE}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so a missing browser is a failure: {message}", pytrace=False)
        pytest.skip(message)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, artifacts_dir):
    """A JupyterLab server on 127.0.0.1 serving a temp copy of the fixture notebook."""
    _sync_playwright()
    base = tmp_path_factory.mktemp("lab")
    root, folders = base / "root", {}
    root.mkdir()
    shutil.copy(FIXTURE, root / FIXTURE.name)
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR",
                "JUPYTER_RUNTIME_DIR"):
        folders[var] = base / var.lower()
        folders[var].mkdir()
    news = folders["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    if NEGATIVE_CONTROL:
        labconfig = folders["JUPYTER_CONFIG_DIR"] / "labconfig"
        labconfig.mkdir()
        (labconfig / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {"@jupyter-widgets/jupyterlab-manager": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, **{k: str(v) for k, v in folders.items()}}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = artifacts_dir / "viewer_browser_jupyterlab.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; log in {log_path}", pytrace=False)
                time.sleep(0.25)
        yield {"url": url, "token": token, "notebook": FIXTURE.name}
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_playwright = _sync_playwright()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM),
            headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 1.0
    return float(np.mean(np.any(a != b, axis=2)))


class Viewer:
    """The viewer's DOM hooks (CSS classes set by helpers.viewer) and a step checker."""

    def __init__(self, page, artifacts: Path):
        self.page, self.artifacts = page, artifacts
        root = page.locator(".bmv-viewer").first
        self.image = root.locator("img.bmv-image")
        self.readout = root.locator(".bmv-readout")
        self.drawn = root.locator(".bmv-drawn")
        self.root = root

    def state(self) -> tuple[str, str, np.ndarray]:
        return self.readout.inner_text(), self.drawn.inner_text(), _pixels(self.image.screenshot())

    def step(self, name: str, action, readout_changes: bool = True) -> str:
        """Do ``action``; wait for the redraws to settle, then check readout and pixels changed.

        A mouse drag sends several values; the marker (``frame N``, updated after
        each picture) must stay put for a moment before the step counts as done.
        """
        text, drawn, pixels = self.state()
        started = time.monotonic()
        action()
        deadline = started + STEP_TIMEOUT_S
        while self.drawn.inner_text() == drawn:
            assert time.monotonic() < deadline, f"{name}: the viewer never redrew"
            time.sleep(0.05)
        last, quiet_since = self.drawn.inner_text(), time.monotonic()
        while time.monotonic() - quiet_since < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
            if (now := self.drawn.inner_text()) != last:
                last, quiet_since = now, time.monotonic()
        while True:  # the marker is sent after the picture; the browser may paint it a bit later
            new_pixels = _pixels(self.image.screenshot())
            changed = _changed_fraction(pixels, new_pixels)
            if changed > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        new_text = self.readout.inner_text()
        self.page.screenshot(path=str(self.artifacts / f"viewer_browser_{name}.png"))
        assert changed > 0.001, f"{name}: the picture's pixels did not change"
        if readout_changes:
            assert new_text != text, f"{name}: the readout did not change ({text!r})"
        else:
            assert new_text == text, f"{name}: the readout changed ({text!r} -> {new_text!r})"
        print(f"{name}: {time.monotonic() - started:.2f} s, {changed:.1%} of pixels changed; "
              f"readout: {new_text}")
        return new_text


def _slice(readout: str) -> int:
    return int(re.search(r"slice (\d+) /", readout).group(1))


def test_a_person_can_use_the_viewer_in_jupyterlab(lab, browser, artifacts_dir):
    started = time.monotonic()
    page = browser.new_page()
    page.goto(f"{lab['url']}/lab/tree/{lab['notebook']}?token={lab['token']}")
    try:
        # the toolbar says idle while the kernel still starts: wait for the status bar
        page.get_by_text(re.compile(r"\(ipykernel\) \| Idle")).first.wait_for(timeout=60_000)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        page.get_by_text("viewer ready:").wait_for(timeout=60_000)
        page.locator(".bmv-viewer").first.wait_for(timeout=15_000)
    except Exception:
        page.screenshot(path=str(artifacts_dir / "viewer_browser_failure.png"))
        raise
    viewer = Viewer(page, artifacts_dir)
    first = viewer.readout.inner_text()
    assert first.startswith("axial") and "T1 =" in first

    # keyboard: focus the slice slider's handle and press the right arrow
    handle = page.locator(".bmv-slice .noUi-handle").first
    text = viewer.step("keyboard", lambda: (handle.focus(), page.keyboard.press("ArrowRight")))
    assert _slice(text) == _slice(first) + 1

    # mouse: drag the same handle to the right
    def drag(locator, dx):
        box = locator.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + dx, y, steps=8)
        page.mouse.up()

    before = _slice(text)
    text = viewer.step("mouse", lambda: drag(handle, 60))
    assert _slice(text) > before

    text = viewer.step("view", lambda: page.locator(".bmv-view select").select_option(label="coronal"))
    assert text.startswith("coronal")
    text = viewer.step("three-plane", lambda: page.locator(".bmv-view select").select_option(label="three-plane"))
    assert text.startswith("three-plane")

    opacity = page.locator(".bmv-opacity .noUi-handle").first
    text = viewer.step("opacity", lambda: drag(opacity, 50))
    assert "overlay 50%" not in text

    text = viewer.step("modality", lambda: page.locator(".bmv-modality select").select_option(label="T2"))
    assert "T2 =" in text
    preset = page.locator(".bmv-preset select").evaluate("el => el.options[el.selectedIndex].text")
    assert preset.replace("\xa0", " ") == "1-99 %", "the window preset must survive a modality switch untouched"

    # the same voxel under the crosshair, drawn mirrored: the picture changes, the readout not
    viewer.step("convention", lambda: page.get_by_role("button", name="radiological").click(),
                readout_changes=False)
    page.screenshot(path=str(artifacts_dir / "viewer_browser.png"), full_page=True)
    print(f"browser test: {time.monotonic() - started:.1f} s")
    page.close()


def test_offline_html_copy_shows_the_static_figure(tmp_path, browser, artifacts_dir):
    executed = series.execute(FIXTURE, tmp_path / FIXTURE.name, cell_timeout=120)
    html = series.export_html(executed)
    page = browser.new_page()
    blocked: list[str] = []

    def only_local(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(html.as_uri())
    figures = page.locator("img[src^='data:image/png']")
    assert figures.count() == 1
    size = figures.first.evaluate("img => [img.naturalWidth, img.naturalHeight, img.complete]")
    box = figures.first.bounding_box()
    page.screenshot(path=str(artifacts_dir / "viewer_offline_html.png"), full_page=True)
    assert size[2] and size[0] >= 800 and size[1] >= 300, size
    assert box and box["width"] > 400 and box["height"] > 150, box
    # nbconvert's template links require.js and MathJax on a CDN (blocked here, harmless for
    # the figure); what must not be needed is widget JavaScript
    widget_js = [url for url in blocked if "widget" in url or "unpkg" in url]
    assert not widget_js, f"the HTML copy asked the network for widget code: {widget_js}"
    page.close()
