"""End to end in a real browser: JupyterLab (started here, on 127.0.0.1) and headless Chromium.

One notebook, as a user would run it: two sweeps of the same model (one setting diverges), the
run table, then `%%amp_train --background`. The test checks what is visible:
- the sweep cell keeps its height from one run to the next;
- `%amp_runs` lists every run under its own name (`sweep[...]` and `sweep2[...]`);
- the live dashboard draws and grows; its Stop button ends the run and a static snapshot
  replaces the widgets; the cell's "started ..." notice now says how the run ended;
- the charts' axes follow the current run, with the diverged sweep runs drawn faded under it;
- at 370 px nothing of the dashboard is cut off;
- saved, then reopened untrusted (written by nbformat, unsigned, as a colleague would receive
  it) and in the dark theme: every chart is an image that loaded, no chart text runs into the
  page, and the faded earlier runs keep a visible contrast against the dark background.
It saves a screenshot of the training cell (to the test's tmp folder; with UPDATE_SCREENSHOT=1
to docs/dashboard.png, the picture in the README, so a plain test run leaves the repository
untouched) and of the untrusted dark reopen (tmp folder).

Needs Debian's Chromium at /usr/bin/chromium plus the `playwright` and `jupyterlab` packages
(the `test` extra); it skips only when one of those is missing, and fails instead where
AMP_MAGICS_BROWSER=required (CI). Playwright's own browser download is not used. Each
scenario is its own test, in order, on one lab and one page: a failing one names itself, and
the ones that need it are skipped with its name. Every process started here (the lab server and its kernels, the browser)
is stopped by its handle, pass or fail.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
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
SHARED = "shared_with_me.ipynb"  # the executed notebook, rewritten unsigned: opens untrusted
VIEWPORT = {"width": 1280, "height": 1400}
NARROW = 370  # pixels: a phone, or a notebook beside a wide editor

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
sweep_loader = train_loader[10:]
train_loader[5] = (train_loader[5][0] * 1e6, train_loader[5][1])  # overflows fp16: a skipped step
"""
# lr=30 diverges: its loss reaches ~1e29 within a few steps, then NaN; lr=0.05 trains.
SWEEP = """\
%%amp_train --dtype bf16 --steps 40 --refresh 0.1 --data sweep_loader --sweep "lr=0.05,30"
time.sleep(0.02)
x, y = batch
loss = F.cross_entropy(model(x), y)"""
DIVERGED = ("import amp_magics, math\n"
            "top = max(r['loss'] for run in amp_magics.runs() for r in run.history\n"
            "          if math.isfinite(r['loss']))\n"
            "print(f'largest loss so far: {top:.3g}')")
CONTROL = ("from IPython.display import HTML  # inline SVG: what a sanitiser strips\n"
           "HTML('<div class=\"amp-control\"><svg width=\"90\" height=\"14\">"
           "<text y=\"12\">inline-svg-kept</text></svg></div>')")
TRAIN = """\
%%amp_train --dtype fp16 --epochs 1000 --background --refresh 0.3 -o run
time.sleep(0.01)
x, y = batch
loss = F.cross_entropy(model(x), y)"""
CELLS = ["%load_ext amp_magics", SETUP, SWEEP, SWEEP, "%amp_runs", DIVERGED, CONTROL, TRAIN]
SWEEP_CELLS, RUNS_CELL, DIVERGED_CELL, CONTROL_CELL, TRAIN_CELL = (2, 3), 4, 5, 6, 7


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    for module, package in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"),
                            ("nbformat", "nbformat")):
        if importlib.util.find_spec(module) is None:
            return f"the Python package {package} is not installed (pip install -e '.[test]')"
    return None


# --- the lab server ----------------------------------------------------------------------------

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

    def start(self):
        """Start the server on a port it picks itself (port 0) and read which from its
        runtime file: no port is chosen here that another program could take meanwhile."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--port=0",
             "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
             f"--IdentityProvider.token={self.token}", "--allow-root",
             f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        runtime = Path(self.env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{self.proc.pid}.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self.port = json.loads(runtime.read_text())["port"]
                self.api("GET", "/api")
                return
            except (OSError, ValueError, KeyError, urllib.error.URLError):
                time.sleep(0.2)
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

# A chart of a dashboard as an SVG element: drawn inline by the live widget, an <img> with an
# SVG data URI in the snapshot (decoded here, as the browser decoded it to draw it).
CHART = """(out, title) => {
    const inline = out.querySelector(`svg[aria-label="${title}"]`);
    if (inline) return inline;
    const img = out.querySelector(`img.amp-chart[alt="${title} chart"]`);
    if (!img) return null;
    const bytes = Uint8Array.from(atob(img.getAttribute('src').split(',')[1]), c => c.charCodeAt(0));
    const doc = new DOMParser().parseFromString(new TextDecoder().decode(bytes), 'image/svg+xml');
    return doc.documentElement;
}"""

# The training cell's output, and what its dashboard shows, in one evaluation.
READ_DASHBOARD = f"""(cell) => {{
    const chart = {CHART};
    const out = cell.querySelector('.jp-OutputArea-output .amp-dashboard');
    if (!out) return null;
    const area = out.closest('.jp-OutputArea');
    const loss = chart(out, 'Loss');
    const path = loss && loss.querySelector('path.series[data-series="loss"]');
    const scale = chart(out, 'Loss scale');
    const bar = out.querySelector('.amp-progress');
    const summary = out.querySelector('table.amp-summary');
    const rows = {{}};
    if (summary) for (const tr of summary.querySelectorAll('tr'))
        rows[tr.querySelector('th').textContent] = tr.querySelector('td').textContent;
    const series = (svg) => svg ? [...svg.querySelectorAll('path.series')].map(
        p => p.getAttribute('data-series')) : [];
    return {{
        text: out.textContent,
        loss_d: path ? path.getAttribute('d') : null,
        smoothed_d: loss && loss.querySelector('path.series[data-series="smoothed"]')
            ? loss.querySelector('path.series[data-series="smoothed"]').getAttribute('d') : null,
        loss_series: series(loss),
        x_ticks: loss ? [...loss.querySelectorAll('text.xtick')].map(t => t.textContent) : [],
        y_ticks: loss ? [...loss.querySelectorAll('text.ytick')].map(t => t.textContent) : [],
        skipped_marks: scale ? scale.querySelectorAll('path.mark').length : 0,
        scale_d: scale && scale.querySelector('path.series[data-series="loss scale"]')
            ? scale.querySelector('path.series[data-series="loss scale"]').getAttribute('d') : null,
        fraction: bar ? parseFloat(bar.dataset.fraction) : null,
        summary: summary ? rows : null,
        images: out.querySelectorAll('img.amp-chart').length,
        inline_svgs: out.querySelectorAll('svg').length,
        buttons: [...area.querySelectorAll('.widget-button')].map(b => b.textContent.trim()),
        widgets: area.querySelectorAll('.jupyter-widgets').length,
        area_text: area.innerText,
    }};
}}"""

# Every dashboard on the page: is anything cut off (wider than its box, or past the right edge
# of the output area)? Are its chart images loaded and shown?
READ_LAYOUT = """() => [...document.querySelectorAll('.jp-OutputArea-output .amp-dashboard')].map(d => {
    const area = d.closest('.jp-OutputArea-output').getBoundingClientRect();
    const cut = [];
    for (const e of [d, ...d.querySelectorAll('.amp-runs, .amp-header, .amp-stats, .amp-charts, '
                                             + '.amp-charts > div, table.amp-summary')]) {
        const r = e.getBoundingClientRect();
        if (e.scrollWidth > e.clientWidth + 1 || r.right > area.right + 1)
            cut.push(`${e.className || e.tagName}: scrollWidth ${e.scrollWidth} > clientWidth `
                     + `${e.clientWidth}, right ${r.right} > ${area.right}`);
    }
    const images = [...d.querySelectorAll('img.amp-chart')].map(img => {
        const r = img.getBoundingClientRect();
        return {alt: img.alt, loaded: img.complete && img.naturalWidth > 0, width: r.width,
                height: r.height, natural: img.naturalWidth};
    });
    const header = d.querySelector('.amp-header');
    return {cut, images, header_width: header ? header.getBoundingClientRect().width : 0,
            area_width: area.width,
            font_px: parseFloat(getComputedStyle(d).fontSize)};
})"""


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


# --- colours -------------------------------------------------------------------------------------

def _rgb(text: str) -> tuple[float, float, float]:
    """'#EE7733' or 'rgb(17, 17, 17)' -> (r, g, b) in 0..255."""
    if text.startswith("#"):
        return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
    return tuple(float(v) for v in re.findall(r"[\d.]+", text)[:3])


def _luminance(rgb) -> float:
    def channel(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = map(channel, rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a, b) -> float:
    """WCAG contrast ratio of two colours."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _over(rgb, alpha: float, background):
    """`rgb` drawn at `alpha` over `background`: the colour the eye gets."""
    return tuple(alpha * c + (1 - alpha) * g for c, g in zip(rgb, background))


# Faded lines (earlier runs) must stay visible in the dark theme: at least 2:1 against the page
# behind them. The current run's lines and the chart text get 3:1, WCAG 1.4.11's floor for
# graphics needed to read the chart; earlier runs are context, deliberately weaker, but at 2:1
# they are still plainly seen (the old 0.35 opacity gave 1.5-1.8:1: "almost vanish").
FADED_MIN_CONTRAST = 2.0
BOLD_MIN_CONTRAST = 3.0


# --- the journey: one lab, one browser page, one notebook, scenario after scenario --------------

class Journey:
    """What the scenarios share: the lab, the page, the notebook's cells, what each scenario
    read, and which scenarios passed (a scenario needs the ones before it)."""

    def __init__(self, lab: Lab, page, session: dict, folder: Path, clock: Clock):
        self.lab, self.page, self.session, self.folder, self.clock = (lab, page, session,
                                                                      folder, clock)
        self.passed: list[str] = []
        self.cells = self.train = None
        self.first = self.second = None

    @contextlib.contextmanager
    def scenario(self, name: str, needs: str | None = None):
        """Run one scenario; on failure keep a screenshot and the server's log."""
        if needs is not None and needs not in self.passed:
            pytest.skip(f"needs the scenario {needs!r}, which did not pass")
        try:
            yield
        except BaseException:
            failure = self.folder / f"failure_{name}.png"
            with contextlib.suppress(Exception):  # the original error matters more
                self.page.screenshot(path=str(failure), full_page=True)
                print(f"screenshot of the failure: {failure}")
            print(f"lab server log:\n{self.lab.log_tail()}")
            raise
        self.passed.append(name)
        self.clock.mark(name)


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    reason = _missing()
    if reason and os.environ.get("AMP_MAGICS_BROWSER") == "required":  # CI: never skip
        pytest.fail(f"the browser test is required here and cannot run: {reason}")
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    folder = tmp_path_factory.mktemp("browser")
    clock = Clock()
    root = folder / "notebooks"
    root.mkdir()
    _write_notebook(root / NOTEBOOK)
    lab = Lab(root, folder / "jupyter")
    try:
        lab.start()
        session = lab.start_kernel_session(NOTEBOOK)
        clock.mark("lab and kernel started")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=CHROMIUM_ARGS)
            try:
                yield Journey(lab, browser.new_page(viewport=VIEWPORT), session, folder, clock)
            finally:
                browser.close()
    finally:
        lab.stop()
        clock.mark("stopped")
        print(clock)


def test_sweeps_keep_their_height_and_every_run_is_listed(journey):
    with journey.scenario("sweeps"):
        _open_and_run(journey)
        _check_sweeps(journey)


def test_the_live_dashboard_grows_with_skips_marked_and_earlier_runs_faded(journey):
    with journey.scenario("live", needs="sweeps"):
        _check_live(journey)


def test_nothing_is_cut_off_at_370px_while_live(journey):
    with journey.scenario("narrow live", needs="live"):
        _assert_nothing_cut_off(journey.page, "live")


def test_the_status_bar_shows_the_host_and_the_run_as_it_trains(journey):
    with journey.scenario("status bar", needs="live"):
        _check_status_bar(journey)


def test_the_status_bar_setting_hides_it_without_a_gpu(journey):
    with journey.scenario("status bar settings", needs="status bar"):
        _check_status_bar_settings(journey)


def test_the_status_bar_reads_every_gpu_the_server_reports(journey, monkeypatch):
    with journey.scenario("status bar with GPUs", needs="status bar"):
        _check_status_bar_with_gpus(journey, monkeypatch)


def test_stop_leaves_a_static_snapshot_and_the_notice_says_how_it_ended(journey):
    with journey.scenario("stopped", needs="live"):
        _check_stopped(journey)


def test_the_snapshot_fits_at_370px_and_is_saved(journey):
    with journey.scenario("saved", needs="stopped"):
        _assert_nothing_cut_off(journey.page, "snapshot")
        screenshot = (README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT")
                      else journey.folder / "dashboard.png")
        _screenshot(journey.page, journey.cells, journey.train, screenshot)
        _save(journey.page, journey.lab)


def test_shared_untrusted_in_the_dark(journey):
    with journey.scenario("shared", needs="saved"):
        _reopen_shared(journey.page, journey.lab, journey.lab.root, journey.clock,
                       journey.folder / "shared_dark.png")


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


def _open_notebook(page, lab: Lab, session: dict, path: str = NOTEBOOK):
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
            page.goto(f"{lab.base}/lab/tree/{path}?reset&token={lab.token}")
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
            train.locator(".jp-OutputArea-output .amp-dashboard").wait_for(timeout=60_000)
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


# Heights of each sweep cell's live dashboard widget, recorded by the page itself at every layout
# change (a poll from here could miss a run boundary between two reads). The progress panel
# above it grows by a row per setting, as a table should; the dashboard must not jump.
WATCH_HEIGHTS = """(cells) => {
    window.__ampHeights = cells.map(() => []);
    cells.forEach((cell, i) => {
        const area = cell.querySelector('.jp-Cell-outputArea') || cell;
        new ResizeObserver(() => {
            const live = area.querySelector('.jupyter-widgets .amp-dashboard');
            if (live) window.__ampHeights[i].push({
                height: live.closest('.jupyter-widgets').getBoundingClientRect().height,
                alarms: live.querySelectorAll('.amp-alarm').length,
                text: live.querySelector('.amp-header')?.textContent || ''});
        }).observe(area);
    });
}"""


def _open_and_run(journey: Journey):
    from playwright.sync_api import expect

    page, lab = journey.page, journey.lab
    tracker = lab.api("GET", "/lab/api/settings/@jupyterlab/notebook-extension:tracker")
    assert tracker["settings"]["windowingMode"] == "none", tracker["settings"]
    page.set_default_timeout(30_000)
    _open_notebook(page, lab, journey.session)
    _close_left_sidebar(page)
    cells = journey.cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    expect(cells).to_have_count(len(CELLS))
    journey.train = cells.nth(TRAIN_CELL)
    page.evaluate(WATCH_HEIGHTS, [cells.nth(i).element_handle() for i in SWEEP_CELLS])
    journey.clock.mark("notebook open, kernel idle")
    _run_all(page, lab, cells, journey.train)


def _check_sweeps(journey: Journey):
    """The sweep cells' dashboards kept their height from one run to the next (no summary
    table between runs, a one-line legend): each size it took was recorded, and without an
    alarm (the diverged run's adds its box) they differ by at most a line. Above each, the
    progress panel says where the sweep stands. `%amp_runs` lists four sweep runs, every one
    under its own name."""
    page, cells = journey.page, journey.cells
    heights = page.evaluate("() => window.__ampHeights")
    for samples in heights:
        calm = [s["height"] for s in samples if s["alarms"] == 0]
        assert calm and max(calm) - min(calm) <= 24, samples
    for i in SWEEP_CELLS:
        assert "setting 2 of 2 · best" in cells.nth(i).inner_text()
    table = cells.nth(RUNS_CELL).locator(".jp-OutputArea-output table").inner_text()
    names = re.findall(r"(sweep\d*\[lr=[\d.]+\])", table)
    assert names == ["sweep[lr=0.05]", "sweep[lr=30]", "sweep2[lr=0.05]", "sweep2[lr=30]"], table
    assert "4 runs this session" in table
    assert "lr=30" in table.split("sweep[lr=30]")[1].splitlines()[0]  # the flags column too
    largest = float(re.search(r"largest loss so far: ([\d.e+]+)",
                              cells.nth(DIVERGED_CELL).inner_text()).group(1))
    assert largest > 1e6  # one setting diverged
    assert cells.nth(CONTROL_CELL).locator(".amp-control svg").count() == 1  # trusted: kept


def _check_live(journey: Journey):
    """The live view: widgets, the Stop button, and charts drawn from the first refreshes;
    it grows while the cell that started the run has long returned."""
    page, train = journey.page, journey.train
    train.locator(".jp-OutputArea-output .widget-button", has_text="Stop").wait_for()
    page.wait_for_function(f"(cell) => ({READ_DASHBOARD})(cell)?.loss_d?.length > 0",
                           arg=train.element_handle())
    first = journey.first = train.evaluate(READ_DASHBOARD)
    assert first["widgets"] > 0 and first["summary"] is None
    assert first["fraction"] is not None and 0 <= first["fraction"] < 1
    step1 = _step(first)
    assert _points(first["loss_d"]) >= 2, first["loss_d"]
    assert "started at" in first["area_text"]  # the cell's notice, while it runs
    page.wait_for_timeout(1500)
    page.wait_for_function(
        f"([cell, step]) => {{ const s = ({READ_DASHBOARD})(cell);"
        r" const m = s && s.text.match(/step ([\d,]+)/);"
        " return m && parseInt(m[1].replace(/,/g, '')) > step; }",
        arg=[train.element_handle(), step1], timeout=15_000)
    second = journey.second = train.evaluate(READ_DASHBOARD)
    assert _step(second) > step1
    assert second["loss_d"] != first["loss_d"]
    assert _points(second["loss_d"]) > _points(first["loss_d"]), (first["loss_d"], second["loss_d"])
    assert second["smoothed_d"] and _points(second["smoothed_d"]) >= 2
    assert second["fraction"] >= first["fraction"]
    # fp16 has a loss scale; the overflowing batch (step 6) shows as a skipped step.
    assert _points(second["scale_d"]) >= 2
    assert second["skipped_marks"] >= 1, second["text"][:400]
    assert re.search(r"[1-9]\d* skipped steps?", second["text"]), second["text"][:400]
    # The sweep runs trained this very model: drawn faded under it; the legend is one line.
    earlier = [s for s in second["loss_series"] if s.startswith("sweep")]
    assert len(earlier) >= 4, second["loss_series"]
    _assert_axes_follow_the_current_run(second)


def _check_status_bar(journey: Journey):
    """The JupyterLab half: the status bar item reads the server extension (no GPU here: the
    host's RAM) and counts the background run, its tooltip names it; a click opens a panel
    with %gpu_status's table and the run's step, which advances with the next polls."""
    page = journey.page
    item = page.locator(".amp-magics-status")
    item.wait_for(timeout=15_000)
    page.wait_for_function(
        "() => /· 1 AMP run$/.test(document.querySelector('.amp-magics-status').textContent)",
        timeout=15_000)
    # the kernel's file says step 0 and no loss until its first rewrite after the run's first
    # steps (at most once a second), read at the next poll
    with contextlib.suppress(Exception):  # the assertion below says what was there instead
        page.wait_for_function(
            r"() => /run\d+: step \d+\/\d+, loss [\d.]+ \(running\)/"
            ".test(document.querySelector('.amp-magics-status').title)", timeout=15_000)
    text, tooltip = item.inner_text(), item.get_attribute("title")
    assert re.fullmatch(r"(no GPU · RAM [\d.]+/[\d.]+ GiB|GPUs? .+ GiB) · 1 AMP run", text), text
    assert re.search(r"run\d+: step \d+/\d+, loss [\d.]+ \(running\)", tooltip), tooltip
    item.click()
    panel = page.locator(".amp-magics-panel")
    panel.wait_for(timeout=10_000)
    # the table is the server's %gpu_status HTML: one table, escaped there, no inline SVG
    assert panel.locator("table").count() >= 1 and panel.locator("svg").count() == 0
    step_in = r"/run\d+: step (\d+)/.exec(document.querySelector('.amp-magics-panel').innerText)"
    first = int(page.evaluate(f"() => {step_in}[1]"))
    page.wait_for_function(f"() => parseInt({step_in}[1]) > {first}", timeout=15_000)
    assert "(running) · kernel " + journey.session["kernel"]["id"][:8] in panel.inner_text()
    page.locator(".lm-TabBar-tab", has_text="GPU status").locator(
        ".lm-TabBar-tabCloseIcon").click()
    panel.wait_for(state="detached", timeout=10_000)
    journey.train.scroll_into_view_if_needed()


def _check_status_bar_settings(journey: Journey):
    """The settings registry drives the item: with hideWhenNoGpu set (this machine has no GPU)
    a page loaded afterwards polls the server but shows no item; a page reads its settings
    at load, so the check opens its own page, in a workspace of its own."""
    lab, plugin = journey.lab, "/lab/api/settings/amp-magics:plugin"
    lab.api("PUT", plugin, {"raw": json.dumps({"hideWhenNoGpu": True})})
    context = journey.page.context.browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        with page.expect_response(lambda r: "/api/amp_magics/v1/status" in r.url and r.ok,
                                  timeout=30_000):
            page.goto(f"{lab.base}/lab/workspaces/settings-check?reset&token={lab.token}")
        page.wait_for_selector(".jp-StatusBar-Widget")
        item = page.locator(".amp-magics-status")
        page.wait_for_function(
            "() => { const e = document.querySelector('.amp-magics-status');"
            " return e !== null && e.textContent.startsWith('no GPU')"
            " && e.closest('.lm-mod-hidden') !== null; }", timeout=15_000)
        assert not item.is_visible()
    finally:
        context.close()
        lab.api("PUT", plugin, {"raw": "{}"})
    assert journey.page.locator(".amp-magics-status").is_visible()  # the first page: as it was


def _check_status_bar_with_gpus(journey: Journey, monkeypatch):
    """No GPU here: the server's answer for two GPUs (made by the server's own code from the
    faked NVML the server tests use) is routed to a page of its own, so the item's GPU text,
    its tooltip and the panel's table are drawn by the front end as a machine with GPUs
    would draw them."""
    from amp_magics.lab.status import payload
    from amp_magics.system import gpu
    from fake_nvml import FakeNvml, a100, h100

    monkeypatch.setattr(gpu, "_nvml_state", (FakeNvml([a100(utilization=43), h100(
        utilization=37)]), None))
    answer = json.dumps(payload(gpu.probe(), {}))
    lab = journey.lab
    context = journey.page.context.browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        page.route("**/api/amp_magics/v1/status*", lambda route: route.fulfill(
            status=200, content_type="application/json", body=answer))
        page.goto(f"{lab.base}/lab/workspaces/gpu-check?reset&token={lab.token}")
        item = page.locator(".amp-magics-status")
        page.wait_for_function("() => document.querySelector('.amp-magics-status')"
                               "?.textContent.startsWith('2 GPUs')", timeout=30_000)
        assert item.inner_text() == "2 GPUs 40% · 24.0/160 GiB", item.inner_text()
        tooltip = item.get_attribute("title").splitlines()
        assert tooltip == ["GPU 0 NVIDIA A100-SXM4-80GB: 43%, 12.0/80.0 GiB, 54 °C, 250/400 W",
                           "GPU 1 NVIDIA H100 80GB HBM3: 37%, 12.0/80.0 GiB, 54 °C, 250/700 W"]
        item.click()
        panel = page.locator(".amp-magics-panel")
        panel.wait_for(timeout=10_000)
        table = panel.locator("table").first.inner_text()
        assert "NVIDIA A100-SXM4-80GB" in table and "NVIDIA H100 80GB HBM3" in table
    finally:
        context.close()


def _check_stopped(journey: Journey):
    """Stop: the run ends and a static snapshot replaces the widgets (no Stop button left);
    the notice the cell returned says how the run ended."""
    page, train, second = journey.page, journey.train, journey.second
    # A fuller picture for the README: up to ~100 steps, if they come within a few seconds.
    with contextlib.suppress(Exception):  # only the picture is poorer
        page.wait_for_function(
            f"(cell) => /step (\\d{{3,}}|[\\d,]{{4,}})/.test(({READ_DASHBOARD})(cell).text)",
            arg=train.element_handle(), timeout=4_000)
    train.locator(".jp-OutputArea-output .widget-button", has_text="Stop").click()
    train.locator(".jp-OutputArea-output table.amp-summary").wait_for(timeout=30_000)
    page.wait_for_function(
        "(cell) => cell.querySelectorAll('.jp-OutputArea .jupyter-widgets').length === 0"
        " && cell.querySelectorAll('.jp-OutputArea .widget-button').length === 0",
        arg=train.element_handle(), timeout=15_000)
    page.wait_for_function("(cell) => !cell.innerText.includes('started at')",
                           arg=train.element_handle(), timeout=15_000)
    final = train.evaluate(READ_DASHBOARD)
    assert final["summary"]["status"] == "interrupted", final["summary"]
    assert final["buttons"] == []
    assert final["images"] == 3 and final["inline_svgs"] == 0  # what the saved notebook keeps
    steps_done = int(final["summary"]["steps"].split()[0])
    assert steps_done >= _step(second)
    assert _step(final) == steps_done
    assert _points(final["loss_d"]) >= _points(second["loss_d"])
    _assert_axes_follow_the_current_run(final)
    assert re.search(rf"Run run\d+ interrupted: {steps_done:,} steps", final["area_text"]), \
        final["area_text"][-400:]
    assert "Stop it with" not in final["area_text"]
    # One number, one format: the header's rates are the summary's.
    header = re.search(r"samples/s ([\d,.]+).*?steps/s ([\d,.]+)", final["text"]).groups()
    assert final["summary"]["throughput (mean over the run)"] == \
        f"{header[0]} samples/s, {header[1]} steps/s"
    assert page.locator(".jp-Dialog").count() == 0


def _assert_axes_follow_the_current_run(state: dict):
    """The diverged sweep runs (loss ~1e29) are drawn faded, yet the loss axis spans only the
    current run's loss (cross-entropy of 10 classes: about 2.3 and falling, below 1 in a long
    run)."""
    ticks = [float(t) for t in state["y_ticks"]]
    assert ticks and 0 <= ticks[0] and ticks[-1] < 5, state["y_ticks"]
    assert all("⁰" not in t and "¹" not in t for t in state["y_ticks"])  # a linear axis


def _assert_nothing_cut_off(page, what: str):
    page.set_viewport_size({"width": NARROW, "height": VIEWPORT["height"]})
    try:
        page.wait_for_timeout(300)  # let the lab lay out again
        for dashboard in page.evaluate(READ_LAYOUT):
            assert dashboard["cut"] == [], (what, dashboard)
            assert dashboard["header_width"] <= dashboard["area_width"] + 1, (what, dashboard)
            for image in dashboard["images"]:
                assert image["loaded"] and image["width"] <= dashboard["area_width"] + 1, image
    finally:
        page.set_viewport_size(VIEWPORT)
        page.wait_for_timeout(200)


def _save(page, lab: Lab):
    """Save the notebook (Ctrl+S) and wait until the file on disk has the training cell's
    snapshot."""
    before = lab.api("GET", f"/api/contents/{NOTEBOOK}?content=0")["last_modified"]
    page.locator(".jp-NotebookPanel .jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 20
    while True:
        model = lab.api("GET", f"/api/contents/{NOTEBOOK}?content=0")
        if model["last_modified"] != before:
            content = lab.api("GET", f"/api/contents/{NOTEBOOK}")["content"]
            outputs = json.dumps(content["cells"][TRAIN_CELL]["outputs"])
            if "amp-dashboard" in outputs and "interrupted" in outputs:
                return
        assert time.monotonic() < deadline, "the notebook was not saved"
        time.sleep(0.2)


def _reopen_shared(page, lab: Lab, root: Path, clock: Clock, screenshot: Path):
    """The executed notebook as a colleague receives it: written by nbformat, unsigned (so
    JupyterLab opens it untrusted and sanitises its HTML), opened in the dark theme."""
    import nbformat
    from nbformat.sign import NotebookNotary

    nb = nbformat.read(root / NOTEBOOK, as_version=4)
    nb.metadata["shared_by"] = "a colleague"  # new content: no stored signature matches it
    nbformat.write(nb, root / SHARED)
    assert not NotebookNotary(data_dir=lab.env["JUPYTER_DATA_DIR"]).check_signature(
        nbformat.read(root / SHARED, as_version=4))
    lab.api("PUT", "/lab/api/settings/@jupyterlab/apputils-extension:themes",
            {"raw": json.dumps({"theme": "JupyterLab Dark"})})
    session = lab.start_kernel_session(SHARED)
    _open_notebook(page, lab, session, SHARED)
    _close_left_sidebar(page)
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'")
    cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    train = cells.nth(TRAIN_CELL)
    train.locator(".jp-OutputArea-output .amp-dashboard").wait_for()
    # Untrusted: the sanitiser removed the control's inline SVG (and would have the charts').
    assert cells.nth(CONTROL_CELL).locator(".amp-control").count() == 1
    assert cells.nth(CONTROL_CELL).locator(".amp-control svg").count() == 0
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.amp-chart')].every(i => i.complete)")
    dashboards = page.locator(".jp-OutputArea-output .amp-dashboard")
    assert dashboards.count() == 3  # two sweeps and the training run
    for i in range(dashboards.count()):
        text = dashboards.nth(i).inner_text()
        # The charts are images: none of their text runs into the page.
        for chart_text in ("smoothed", "skipped step (", "Losslosssmoothed"):
            assert chart_text not in text, (chart_text, text[:500])
        titles = {"Loss", "Loss scale", "Throughput", "Memory"} & set(text.splitlines())
        assert not titles, (titles, text[:500])
    layout = page.evaluate(READ_LAYOUT)
    for dashboard in layout:
        assert len(dashboard["images"]) == 3, dashboard
        for image in dashboard["images"]:
            assert image["loaded"] and image["width"] > 200 and image["height"] > 130, image
            assert image["width"] <= image["natural"] + 0.5  # never scaled up: text stays 11 px
    # Unique names, visible in the reopened table.
    table = cells.nth(RUNS_CELL).inner_text()
    assert "sweep[lr=30]" in table and "sweep2[lr=30]" in table
    # The run that ended: no stale notice, even untrusted.
    assert "started at" not in train.inner_text() and "interrupted" in train.inner_text()
    final = train.evaluate(READ_DASHBOARD)
    _assert_axes_follow_the_current_run(final)
    _assert_readable_in_the_dark(train)
    _assert_nothing_cut_off(page, "untrusted reopen")
    clock.mark("reopened untrusted, dark")
    train.scroll_into_view_if_needed()
    train.screenshot(path=str(screenshot), animations="disabled")


# The colours a chart draws with, and the page behind it.
READ_COLOURS = f"""(cell) => {{
    const chart = {CHART};
    const out = cell.querySelector('.jp-OutputArea-output .amp-dashboard');
    const img = out.querySelector('img.amp-chart');
    let e = img, bg = 'rgba(0, 0, 0, 0)';
    while (e && /rgba\\(0, 0, 0, 0\\)|transparent/.test(bg)) {{
        bg = getComputedStyle(e).backgroundColor; e = e.parentElement; }}
    const svg = chart(out, 'Loss');
    const series = [...svg.querySelectorAll('path.series')].map(p => ({{
        name: p.getAttribute('data-series'), stroke: p.getAttribute('stroke'),
        opacity: parseFloat(p.getAttribute('stroke-opacity') || '1'),
        style: p.getAttribute('stroke-dasharray')}}));
    return {{background: bg, ink: svg.getAttribute('fill'), series}};
}}"""


def _assert_readable_in_the_dark(cell):
    """Against the dark page behind the chart image: text, the current run's smoothed line and
    every faded earlier run reach their contrast floors."""
    found = cell.evaluate(READ_COLOURS)
    background = _rgb(found["background"])
    assert _luminance(background) < 0.05, found["background"]  # the dark theme, really
    assert _contrast(_rgb(found["ink"]), background) >= BOLD_MIN_CONTRAST, found
    by_name = {s["name"]: s for s in found["series"]}
    smoothed = by_name["smoothed"]
    assert _contrast(_over(_rgb(smoothed["stroke"]), smoothed["opacity"], background),
                     background) >= BOLD_MIN_CONTRAST
    faded = [s for s in found["series"] if s["name"].startswith("sweep") and s["name"].endswith(" loss")]
    assert len(faded) >= 4, found["series"]
    for line in faded:
        seen = _over(_rgb(line["stroke"]), line["opacity"], background)
        assert _contrast(seen, background) >= FADED_MIN_CONTRAST, (line, found["background"])


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
