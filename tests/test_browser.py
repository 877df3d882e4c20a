"""Notebook 04 in a real JupyterLab, driven by headless Chromium (Playwright).

Opens the notebook, runs every cell, waits for the widget's thumbnails, changes
the class filter and checks that the grid changed. Needs Debian's `chromium`
(/usr/bin/chromium) and the `playwright` Python package; skipped without them.
"""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from zoolib import bulkid

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_bulk_identify.ipynb"
# The notebook is open and its kernel has started and is idle (ready to run cells).
KERNEL_IDLE = ("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
               " const k = w && w.sessionContext && w.sessionContext.session"
               " && w.sessionContext.session.kernel;"
               " return !!k && k.status === 'idle' && k.connectionStatus === 'connected'; }")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="Debian's chromium is not installed "
                                       "(apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    """Start the notebook's kernel without the kernel dialog; no news pop-up."""
    for plugin, value in (("notebook-extension/tracker", {"autoStartDefaultKernel": True,
                                                          "windowingMode": "none"}),
                          ("apputils-extension/notification", {"fetchNews": "false"})):
        path = folder / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture
def lab(trained_ws, tmp_path):
    """JupyterLab on a free localhost port, serving a copy of notebook 04 whose default
    WORKSPACE (../build/demo-workspace) is a demo workspace holding a trained gen-0001."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks")
    shutil.copytree(trained_ws.root, root / "build" / "demo-workspace")
    _write_settings(tmp_path / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipy"),
           "JUPYTER_PLATFORM_DIRS": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root / 'notebooks'}", "--expose-app-in-browser",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp_path / "jupyter.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(tmp_path / 'jupyter.log').read_text()}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not answer within 60 s")
        yield url, token, root / "build" / "demo-workspace"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _captions(page) -> list[str]:
    """Text of the visible thumbnail tiles (hidden tiles have display: none)."""
    return page.eval_on_selector_all(
        ".zoolib-tile", "els => els.filter(e => e.offsetParent !== null)"
                        ".map(e => e.innerText.trim())")


def test_notebook_04_widget_in_jupyterlab(lab):
    url, token, ws_root = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/04_bulk_identify.ipynb?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            # Not awaited: the command's promise settles only when every cell has run.
            page.evaluate("() => { window.jupyterapp.commands.execute("
                          "'notebook:run-all-cells'); }")
            page.wait_for_selector(".zoolib-grid .zoolib-tile img", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('.zoolib-tile img')]"
                                   ".some(i => i.naturalWidth > 0)", timeout=30_000)
            before = _captions(page)
            assert before and len(before) <= 24

            # Pick a class that is not the first tile's, so the first page must change.
            # The widget shows the inbox and the library's Unknown folder in one table.
            results = bulkid.combine(*(bulkid.load_results(ws_root, run) for run in
                                       ("gen-0001-inbox", "gen-0001-unknown")))
            first = before[0].split()[0]
            counts = results["pred"].value_counts()
            cls = next(c for c in counts.index if c != first)
            page.select_option(".zoolib-class select", label=cls)
            page.wait_for_function(
                "cls => { const t = [...document.querySelectorAll('.zoolib-tile')]"
                ".filter(e => e.offsetParent !== null).map(e => e.innerText.trim());"
                " return t.length > 0 && t.every(s => s.startsWith(cls + ' ')); }",
                arg=cls, timeout=30_000)
            after = _captions(page)
            assert after != before
            assert len(after) == min(24, int(counts[cls]))
            assert all(c.startswith(f"{cls} ") for c in after)
            label = page.inner_text(".zoolib-page")
            assert f"{int(counts[cls])} images" in label
        finally:
            browser.close()
