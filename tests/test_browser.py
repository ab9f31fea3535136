"""End to end in a real browser: JupyterLab (started here, on 127.0.0.1) and headless Chromium.

A notebook runs `%%amp_train --background`; the test waits for the dashboard, checks that its
charts are drawn and grow while the run trains, clicks the dashboard's Stop button, sees the
live widgets replaced by the static snapshot of an interrupted run, and saves a screenshot of
the cell (to the test's tmp folder; with UPDATE_SCREENSHOT=1 to docs/dashboard.png, the
picture in the README, so a plain test run leaves the repository untouched).

Needs Debian's Chromium at /usr/bin/chromium plus the `playwright` and `jupyterlab` packages
(the `test` extra); the test skips only when one of those is missing. Playwright's own browser
download is not used. Every process started here (the lab server and its kernel, the browser)
is stopped by its handle, pass or fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
NOTEBOOK = "amp_dashboard.ipynb"
VIEWPORT = {"width": 1280, "height": 1000}

SETUP = """\
import time
import torch, torch.nn.functional as F
torch.set_num_threads(1)  # leave the other core to the browser and the lab server
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                            torch.nn.Linear(256, 256), torch.nn.ReLU(),
                            torch.nn.Linear(256, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
w = torch.randn(64, 10)
train_loader = []
for _ in range(200):
    x = torch.randn(64, 64)
    train_loader.append((x, (x @ w).argmax(1)))
train_loader[5] = (train_loader[5][0] * 1e6, train_loader[5][1])  # overflows fp16: a skipped step
"""
TRAIN = """\
%%amp_train --dtype fp16 --epochs 1000 --background --refresh 0.3 -o run
time.sleep(0.01)
x, y = batch
loss = F.cross_entropy(model(x), y)"""
CELLS = ["%load_ext amp_magics", SETUP, TRAIN]
TRAIN_CELL = 2


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    for module, package in (("playwright", "playwright"), ("jupyterlab", "jupyterlab")):
        if importlib.util.find_spec(module) is None:
            return f"the Python package {package} is not installed (pip install -e '.[test]')"
    return None


# --- the lab server ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on 127.0.0.1 with its own config, data, runtime, settings and
    workspace directories, serving `root`."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.token = secrets.token_hex(16)
        self.proc = None
        self.port = None
        self.log_path = home / "lab.log"
        self.env = dict(os.environ)
        for var, name in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                          ("JUPYTER_RUNTIME_DIR", "runtime"),
                          ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                          ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
            (home / name).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(home / name)
        self.env.pop("JUPYTER_TOKEN", None)
        self.env["PYTHONUNBUFFERED"] = "1"
        settings = home / "settings" / "@jupyterlab"
        # All cells attached to the page (4.x may leave off-screen cells out of the DOM), and no
        # "fetch Jupyter news?" toast over the bottom right corner.
        self._write_settings(settings / "notebook-extension" / "tracker.jupyterlab-settings",
                             {"windowingMode": "none"})
        self._write_settings(settings / "apputils-extension" / "notification.jupyterlab-settings",
                             {"fetchNews": "false", "checkForUpdates": False})

    @staticmethod
    def _write_settings(path: Path, values: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3):
        for _ in range(attempts):
            self.port = _free_port()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}",
                 "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
                 f"--IdentityProvider.token={self.token}", "--allow-root",
                 f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=",
                 "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.api("GET", "/api")
                    return
                except (OSError, urllib.error.URLError):
                    time.sleep(0.2)
            self.stop()  # the port was taken meanwhile, or the server hung: try another
        raise AssertionError(f"JupyterLab did not start:\n{self.log_tail()}")

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        request = urllib.request.Request(
            self.base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            return json.loads(text) if text else None

    def start_kernel_session(self, path: str) -> dict:
        """Create the notebook's session (and python3 kernel) through the REST API, so the page
        finds it rather than asking to select a kernel. The server reports the kernel as
        "starting" until a client asks it for its info: the page waits for "idle"."""
        session = self.api("POST", "/api/sessions", {
            "path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}},
            timeout=60)
        state = self.api("GET", f"/api/kernels/{session['kernel']['id']}")["execution_state"]
        assert state != "dead", f"the kernel died at start:\n{self.log_tail()}"
        return session

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:  # kernels first, so none outlives the server
                for session in self.api("GET", "/api/sessions"):
                    self.api("DELETE", f"/api/sessions/{session['id']}", timeout=20)
            except (OSError, urllib.error.URLError, ValueError):
                pass
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
                proc.wait(timeout=10)


# --- reading the page ----------------------------------------------------------------------------

# The training cell's output, and what its dashboard shows, in one evaluation.
READ_DASHBOARD = """(cell) => {
    const out = cell.querySelector('.jp-OutputArea-output .amp-dashboard');
    if (!out) return null;
    const area = out.closest('.jp-OutputArea');
    const loss = out.querySelector('svg[aria-label="Loss"]');
    const path = loss && loss.querySelector('path.series[data-series="loss"]');
    const scale = out.querySelector('svg[aria-label="Loss scale"]');
    const bar = out.querySelector('.amp-progress');
    const summary = out.querySelector('table.amp-summary');
    const rows = {};
    if (summary) for (const tr of summary.querySelectorAll('tr'))
        rows[tr.querySelector('th').textContent] = tr.querySelector('td').textContent;
    return {
        text: out.textContent,
        loss_d: path ? path.getAttribute('d') : null,
        smoothed_d: loss && loss.querySelector('path.series[data-series="smoothed"]')
            ? loss.querySelector('path.series[data-series="smoothed"]').getAttribute('d') : null,
        x_ticks: loss ? [...loss.querySelectorAll('text.xtick')].map(t => t.textContent) : [],
        skipped_marks: scale ? scale.querySelectorAll('path.mark').length : 0,
        scale_d: scale && scale.querySelector('path.series[data-series="loss scale"]')
            ? scale.querySelector('path.series[data-series="loss scale"]').getAttribute('d') : null,
        fraction: bar ? parseFloat(bar.dataset.fraction) : null,
        summary: summary ? rows : null,
        buttons: [...area.querySelectorAll('.widget-button')].map(b => b.textContent.trim()),
        widgets: area.querySelectorAll('.jupyter-widgets').length,
    };
}"""


def _points(d: str | None) -> int:
    return len(re.findall(r"-?\d+(?:\.\d+)?,-?\d+(?:\.\d+)?", d or ""))


def _step(state: dict) -> int:
    match = re.search(r"step ([\d,]+)", state["text"])
    assert match, f"no step count in the dashboard text: {state['text'][:300]!r}"
    return int(match.group(1).replace(",", ""))


def _write_notebook(path: Path):
    import nbformat  # here, not at the top: `pytest -m "not browser"` must collect without it

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nbformat.write(nb, path)


# --- the test ----------------------------------------------------------------------------------

def test_dashboard_live_in_jupyterlab_and_stop_button(tmp_path):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    clock = Clock()
    root = tmp_path / "notebooks"
    root.mkdir()
    _write_notebook(root / NOTEBOOK)
    lab = Lab(root, tmp_path / "jupyter")
    failure_png = tmp_path / "failure.png"
    try:
        lab.start()
        session = lab.start_kernel_session(NOTEBOOK)
        clock.mark("lab and kernel started")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                try:
                    screenshot = (README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT")
                                  else tmp_path / "dashboard.png")
                    _drive(page, lab, session, clock, screenshot)
                except BaseException:
                    try:
                        page.screenshot(path=str(failure_png))
                        print(f"screenshot of the failure: {failure_png}")
                    except Exception:  # noqa: BLE001 - the original error matters more
                        pass
                    print(f"lab server log:\n{lab.log_tail()}")
                    raise
            finally:
                browser.close()
    finally:
        lab.stop()
        clock.mark("stopped")
        print(clock)


class Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.marks = []

    def mark(self, what: str):
        now = time.perf_counter()
        self.marks.append(f"{what} +{now - self.last:.1f} s")
        self.last = now

    def __str__(self):
        return (f"browser test: {self.last - self.start:.1f} s ("
                + ", ".join(self.marks) + ")")


def _open_notebook(page, lab: Lab, session: dict):
    """Load the notebook until the page is connected to the session's kernel and it is idle;
    reload once if not.

    The toolbar's execution indicator says idle even before the page has found the session
    (the toolbar still reads "No Kernel" then), and a cell run at that moment makes the page
    start a second kernel and shut down the first, mid-run. So wait on the server's view of the
    kernel (a connection, idle) and on the toolbar's kernel name as well.
    """
    kernel_id = session["kernel"]["id"]
    spec = lab.api("GET", "/api/kernelspecs")["kernelspecs"]["python3"]["spec"]
    for attempt in range(2):
        if attempt == 0:
            page.goto(f"{lab.base}/lab/tree/{NOTEBOOK}?reset&token={lab.token}")
        else:
            _dismiss_dialog(page)
            page.reload()
        try:
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell .jp-InputArea-editor")
            page.wait_for_function(
                "(name) => [...document.querySelectorAll("
                "'.jp-NotebookPanel .jp-Toolbar-kernelName')].some(e => e.textContent.trim() === name)",
                arg=spec["display_name"])
            deadline = time.monotonic() + 30
            while True:
                kernel = lab.api("GET", f"/api/kernels/{kernel_id}")
                if kernel["connections"] >= 1 and kernel["execution_state"] == "idle":
                    break
                assert time.monotonic() < deadline, f"the page did not connect: {kernel}"
                time.sleep(0.1)
            page.wait_for_selector(
                '.jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status="idle"]')
            return
        except Exception:  # noqa: BLE001 - e.g. a "Select Kernel" dialog: reload once
            if attempt:
                raise


def _kernel_ids(lab: Lab) -> list[str]:
    return sorted(k["id"] for k in lab.api("GET", "/api/kernels"))


def _run_all(page, lab: Lab, cells, train):
    """Shift+Enter in each cell, until the dashboard shows; once more if nothing started or
    the kernel was swapped under the run."""
    for attempt in range(2):
        _dismiss_dialog(page)
        kernels = _kernel_ids(lab)
        cells.nth(0).locator(".jp-InputArea-editor").click()
        for _ in CELLS:
            page.keyboard.press("Shift+Enter")
        try:
            train.locator(".jp-OutputArea-output .amp-dashboard").wait_for(timeout=45_000)
            assert _kernel_ids(lab) == kernels, "the kernel changed while the cells ran"
            return
        except Exception:  # noqa: BLE001
            prompt = cells.nth(0).locator(".jp-InputPrompt").inner_text()
            started = re.search(r"\[[\d*]+\]", prompt)
            swapped = _kernel_ids(lab) != kernels
            print(f"run attempt {attempt + 1} failed: started={bool(started)} swapped={swapped}")
            if attempt or (started and not swapped and not page.locator(".jp-Dialog").count()):
                raise AssertionError(
                    "no dashboard appeared; prompts and outputs: " + " | ".join(
                        page.locator(".jp-Cell .jp-InputPrompt, .jp-OutputArea").all_inner_texts()))


def _drive(page, lab: Lab, session: dict, clock: Clock, screenshot: Path):
    from playwright.sync_api import expect

    tracker = lab.api("GET", "/lab/api/settings/@jupyterlab/notebook-extension:tracker")
    assert tracker["settings"]["windowingMode"] == "none", tracker["settings"]
    page.set_default_timeout(30_000)
    _open_notebook(page, lab, session)
    _close_left_sidebar(page)
    cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    expect(cells).to_have_count(len(CELLS))
    train = cells.nth(TRAIN_CELL)
    clock.mark("notebook open, kernel idle")

    _run_all(page, lab, cells, train)
    clock.mark("dashboard shown")

    # The live view: widgets, the Stop button, and charts drawn from the first refreshes.
    stop = train.locator(".jp-OutputArea-output .widget-button", has_text="Stop")
    stop.wait_for()
    page.wait_for_function(f"(cell) => ({READ_DASHBOARD})(cell)?.loss_d?.length > 0",
                           arg=train.element_handle())
    first = train.evaluate(READ_DASHBOARD)
    assert first["widgets"] > 0 and first["summary"] is None
    assert first["fraction"] is not None and 0 <= first["fraction"] < 1
    step1 = _step(first)
    assert _points(first["loss_d"]) >= 2, first["loss_d"]

    # It grows, while the cell that started the run has long returned: more steps, more points.
    page.wait_for_timeout(1500)
    page.wait_for_function(
        f"([cell, step]) => {{ const s = ({READ_DASHBOARD})(cell);"
        r" const m = s && s.text.match(/step ([\d,]+)/);"
        " return m && parseInt(m[1].replace(/,/g, '')) > step; }",
        arg=[train.element_handle(), step1], timeout=15_000)
    second = train.evaluate(READ_DASHBOARD)
    step2 = _step(second)
    assert step2 > step1
    assert second["loss_d"] != first["loss_d"]
    assert _points(second["loss_d"]) > _points(first["loss_d"]), (first["loss_d"], second["loss_d"])
    assert second["smoothed_d"] and _points(second["smoothed_d"]) >= 2
    assert second["fraction"] >= first["fraction"]
    # fp16 has a loss scale; the overflowing batch (step 6) shows as a skipped step.
    assert _points(second["scale_d"]) >= 2
    assert second["skipped_marks"] >= 1, second["text"][:400]
    assert re.search(r"[1-9]\d* skipped steps?", second["text"]), second["text"][:400]
    clock.mark(f"grew from step {step1} to {step2}")

    # A fuller picture for the README: up to ~100 steps, if they come within a few seconds.
    try:
        page.wait_for_function(
            f"(cell) => /step (\\d{{3,}}|[\\d,]{{4,}})/.test(({READ_DASHBOARD})(cell).text)",
            arg=train.element_handle(), timeout=4_000)
    except Exception:  # noqa: BLE001 - only the picture is poorer
        pass

    # Stop: the run ends and a static snapshot replaces the widgets (no Stop button left).
    stop.click()
    train.locator(".jp-OutputArea-output table.amp-summary").wait_for(timeout=30_000)
    page.wait_for_function(
        "(cell) => cell.querySelectorAll('.jp-OutputArea .jupyter-widgets').length === 0"
        " && cell.querySelectorAll('.jp-OutputArea .widget-button').length === 0",
        arg=train.element_handle(), timeout=15_000)
    final = train.evaluate(READ_DASHBOARD)
    assert final["summary"]["status"] == "interrupted", final["summary"]
    assert final["buttons"] == []
    steps_done = int(final["summary"]["steps"].split()[0])
    assert steps_done >= step2
    assert _step(final) == steps_done
    assert _points(final["loss_d"]) >= _points(second["loss_d"])
    assert page.locator(".jp-Dialog").count() == 0
    clock.mark(f"stopped at step {steps_done}, snapshot shown")

    _screenshot(page, cells, train, screenshot)
    clock.mark("screenshot")

def _close_left_sidebar(page):
    """Collapse the file browser so the dashboard gets the page's width."""
    current = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if current.count():
        current.first.click()
        page.wait_for_selector("#jp-left-stack", state="hidden")


def _dismiss_dialog(page):
    """A "Select Kernel" dialog has been seen although the kernel exists: accept its default."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        dialog.locator(".jp-mod-accept").first.click()
        dialog.wait_for(state="detached")


def _screenshot(page, cells, cell, path):
    """The training cell (the magic and the final dashboard), for the README: no toast, no
    hover or active-cell highlight on it."""
    for close in page.locator(".Toastify__toast .Toastify__close-button").all():
        close.click()
    # Clicking Stop made the training cell the active one: select the empty cell that
    # Shift+Enter added below it instead.
    if cells.count() > len(CELLS):
        cells.last.locator(".jp-InputPrompt").click()
        expect_inactive = cell.evaluate("c => !c.classList.contains('jp-mod-active')")
        assert expect_inactive
    page.mouse.move(1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=str(path), animations="disabled")
    assert path.stat().st_size > 10_000
