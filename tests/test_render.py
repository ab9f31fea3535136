"""The dashboard's pure rendering: reduction, charts, escaping and empty states; what a saved
notebook keeps (charts as SVG images), axes, legends, labels and numbers that agree."""
import base64
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import amp_magics

from amp_magics.views.run_summary import summary_rows
from amp_magics.views.charts import (
    FADED_OPACITY,
    DashboardView,
    RunTrace,
    Series,
    dashboard_html,
    downsample,
    line_chart_svg,
    smooth,
    summary_table_html,
)

SVG = "{http://www.w3.org/2000/svg}"
SUPERSCRIPT = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")
HOSTILE = ["<img src=x onerror=alert(1)>", "</svg><script>alert(2)</script>", "a\"b'c&d"]


def parse(svg: str) -> ET.Element:
    """The chart as XML: also proves it is well-formed, so nothing leaked out of an attribute."""
    return ET.fromstring(svg)


def by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == cls]


def path_points(d: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in re.findall(r"(-?[\d.]+),(-?[\d.]+)", d)]


def trace(name="run1", n=200, **kw) -> RunTrace:
    steps = np.arange(1, n + 1, dtype=float)
    defaults = dict(steps=steps, loss=2.0 / np.sqrt(steps), scale=np.full(n, 2.0 ** 16),
                    memory_time=np.arange(1, n + 1) * 0.5,
                    memory={"allocated": np.full(n, 3 * 2 ** 30)})
    return RunTrace(name, **{**defaults, **kw})


# --- downsample ----------------------------------------------------------------------------------

def test_downsample_keeps_extremes_and_ends_and_bounds_the_point_count():
    rng = np.random.default_rng(0)
    n = 100_000
    xs = np.arange(n, dtype=float)
    ys = rng.normal(size=n)
    ys[31_337], ys[77_777] = 50.0, -40.0
    x, y = downsample(xs, ys, max_points=1000)
    assert len(x) <= 1000 + 2
    assert len(x) > 900  # the budget is used, not wasted
    points = set(zip(x.tolist(), y.tolist()))
    for i in (0, n - 1, 31_337, 77_777):
        assert (xs[i], ys[i]) in points
    assert np.all(np.diff(x) > 0)
    # Every bucket's extremes survive: the reduced envelope matches the data's at coarse scale.
    for chunk in np.array_split(np.arange(n), 50):
        inside = (x >= chunk[0]) & (x <= chunk[-1])
        assert y[inside].max() == ys[chunk].max()
        assert y[inside].min() == ys[chunk].min()


def test_downsample_accepts_lists_and_leaves_short_series_alone():
    x, y = downsample([1, 2, 3], [0.5, None, 0.25])
    assert x.tolist() == [1, 2, 3]
    assert y[0] == 0.5 and math.isnan(y[1]) and y[2] == 0.25
    with pytest.raises(ValueError):
        downsample([1, 2], [1.0])


@pytest.mark.parametrize("n", [0, 1, 2, 999, 1000, 1001, 10_007])
def test_downsample_edge_lengths(n):
    x, y = downsample(np.arange(n), np.arange(n) * 1.5, max_points=1000)
    assert len(x) == len(y) <= 1002
    if n:
        assert (x[0], x[-1]) == (0, n - 1)


def test_downsample_keeps_non_finite_values_visible():
    n = 100_000
    ys = np.linspace(1, 0, n)
    ys[[500, 50_000, 50_001, 99_998]] = [np.nan, np.inf, -np.inf, np.nan]
    ys[60_000:70_000] = np.nan  # a diverged stretch
    x, y = downsample(np.arange(n), ys, max_points=1000)
    assert len(x) <= 1002
    bad = set(x[~np.isfinite(y)].tolist())
    assert {500, 50_000, 99_998} <= bad  # the second in the same bucket may share its mark
    assert any(60_000 <= b < 70_000 for b in bad)
    assert y[0] == 1 and y[-1] == 0


# --- smooth --------------------------------------------------------------------------------------

def test_smooth_reduces_noise_ignores_nan_and_bounds_points():
    rng = np.random.default_rng(1)
    n = 100_000
    xs = np.arange(n, dtype=float)
    truth = 1 + np.exp(-xs / 20_000)
    ys = truth + rng.normal(0, 0.3, n)
    ys[::997] = np.nan
    sx, sy = smooth(xs, ys, max_points=400)
    assert len(sx) == 400 and np.all(np.isfinite(sy))
    # An EMA lags a falling curve a little; it must still track it far better than the noise.
    assert np.max(np.abs(sy - np.interp(sx, xs, truth))[5:]) < 0.1
    assert smooth([], [])[0].size == 0
    assert smooth([1, 2], [np.nan, None])[0].size == 0
    one_x, one_y = smooth([7], [0.5])
    assert one_x.tolist() == [7] and one_y.tolist() == [0.5]  # debiased: no pull towards 0


# --- charts --------------------------------------------------------------------------------------

def test_each_series_is_a_named_path_and_earlier_runs_are_faded():
    xs = np.arange(100)
    svg = line_chart_svg("Loss", [Series("old run", xs, xs * 2.0, "#111111", faded=True),
                                  Series("loss", xs, xs * 1.0, "#222222", "faint"),
                                  Series("smoothed", xs, xs * 1.0, "#222222")])
    paths = {p.get("data-series"): p for p in by_class(parse(svg), "series")}
    assert set(paths) == {"old run", "loss", "smoothed"}
    assert float(paths["old run"].get("stroke-opacity")) == pytest.approx(FADED_OPACITY)
    assert paths["smoothed"].get("stroke-opacity") is None  # the current run is bold
    assert len(path_points(paths["loss"].get("d"))) >= 2
    legend = [t.text for t in parse(svg).iter(SVG + "text")]
    assert "loss" in legend and "smoothed" in legend and "old run" not in legend


def test_series_are_reduced_before_drawing():
    n = 100_000
    svg = line_chart_svg("Loss", [Series("loss", np.arange(n), np.sin(np.arange(n) / 7), "#000")])
    (path,) = by_class(parse(svg), "series")
    assert len(path_points(path.get("d"))) <= 1002
    assert len(svg) < 40_000


def test_skipped_steps_are_marked_at_their_x_positions():
    steps = np.arange(1, 10_001)
    skipped = [2000, 4000, 5000, 8000]
    svg = line_chart_svg("Loss scale", [Series("loss scale", steps, np.full(10_000, 2.0 ** 16),
                                               "#000")], y_scale="log2", marks=skipped)
    root = parse(svg)
    marks = by_class(root, "mark")
    assert [float(m.get("data-x")) for m in marks] == skipped
    apex = {float(m.get("data-x")): path_points(m.get("d"))[0][0] + 3.5 for m in marks}
    # Each triangle's apex sits where the x axis puts that step: on its tick where there is one.
    ticks = {t.text: float(t.get("x")) for t in by_class(root, "xtick")}
    for step, label in ((2000, "2k"), (4000, "4k"), (8000, "8k")):
        assert apex[step] == pytest.approx(ticks[label], abs=0.6)
    assert apex[5000] == pytest.approx((ticks["4k"] + ticks["6k"]) / 2, abs=0.6)
    assert "skipped step (4)" in svg


def test_marks_in_one_pixel_column_share_one_triangle():
    skipped = list(range(100, 200))  # 100 steps of 100,000 fall in one or two pixel columns
    svg = line_chart_svg("Loss scale", [Series("s", [0, 100_000], [1.0, 2.0], "#000")],
                         y_scale="log2", marks=skipped)
    assert 1 <= len(by_class(parse(svg), "mark")) <= 2
    assert "skipped step (100)" in svg


def test_log2_axis_ticks_are_powers_of_two():
    steps = np.arange(5000)
    scale = 2.0 ** (8 + (steps // 400) % 12)
    svg = line_chart_svg("Loss scale", [Series("s", steps, scale, "#000")], y_scale="log2")
    labels = [t.text for t in by_class(parse(svg), "ytick")]
    assert len(labels) >= 3
    exponents = [int(label[1:].translate(SUPERSCRIPT)) for label in labels]
    assert all(label.startswith("2") for label in labels)
    assert exponents == sorted(exponents) and 8 <= exponents[0] and exponents[-1] <= 20
    assert len(set(np.diff(exponents))) == 1  # evenly spaced powers


def test_bytes_axis_uses_binary_units():
    svg = line_chart_svg("Memory", [Series("allocated", [0, 1, 2], [0, 2 ** 30, 3 * 2 ** 30],
                                           "#000")], y_scale="bytes", x_scale="seconds")
    labels = [t.text for t in by_class(parse(svg), "ytick")]
    assert labels[0] == "0" and all(label.endswith(" GiB") for label in labels[1:])
    assert "3 GiB" in labels
    small = line_chart_svg("Memory", [Series("rss", [0, 1], [0, 3 * 2 ** 20], "#000")],
                           y_scale="bytes", x_scale="seconds")
    assert [t.text for t in by_class(parse(small), "ytick")][-1].endswith(" MiB")


def test_non_finite_values_are_shown_and_counted():
    ys = np.linspace(1, 0, 500)
    ys[[100, 300]] = [np.nan, np.inf]
    svg = line_chart_svg("Loss", [Series("loss", np.arange(500), ys, "#000")])
    marks = by_class(parse(svg), "nonfinite")
    assert sorted(float(m.get("data-x")) for m in marks) == [100, 300]
    assert "NaN/inf (2)" in svg
    (path,) = by_class(parse(svg), "series")
    assert path.get("d").count("M") == 3  # the line breaks at both


def test_an_overflowed_batch_does_not_flatten_the_loss_curve():
    rng = np.random.default_rng(2)
    steps = np.arange(1, 1201)
    loss = 1.1 + rng.normal(0, 0.05, 1200)
    loss[800] = 8e22  # a finite bf16 overflow, as seen in a real run
    sx, sy = smooth(steps, loss)
    assert sy.max() < 1.5  # clipped before smoothing: the line stays on the data

    def chart(**kw):
        root = parse(line_chart_svg("Loss", [Series("loss", steps, loss, "#000", "faint"),
                                             Series("smoothed", sx, sy, "#000")], **kw))
        return root, [float(t.text) for t in by_class(root, "ytick")]

    root, ticks = chart(ignore_outliers=True)
    assert 0.8 < ticks[0] and ticks[-1] < 2  # the axis spans the real loss, not the spike
    assert "off scale (1)" in "".join(root.itertext())
    _, ticks = chart()
    assert ticks[-1] > 1e22  # without it, the spike sets the axis


def test_a_diverged_loss_gets_a_log10_axis():
    steps = np.arange(1, 1001)
    loss = np.where(steps < 800, 1.1, 1e20 / steps)  # the model blew up and stayed blown up
    root = parse(line_chart_svg("Loss", [Series("loss", steps, loss, "#000")], y_scale="auto",
                                ignore_outliers=True))
    labels = [t.text for t in by_class(root, "ytick")]
    assert labels[0] in ("1", "10") and labels[-1].startswith("10")
    exponents = [0 if t == "1" else 1 if t == "10" else int(t[2:].translate(SUPERSCRIPT))
                 for t in labels]
    assert exponents[-1] >= 16  # both the healthy loss and the divergence are on the axis
    negative = parse(line_chart_svg("Loss", [Series("loss", steps, loss - 2, "#000")],
                                    y_scale="auto"))
    for tick in by_class(negative, "ytick"):  # log needs positive values: a linear axis
        float(tick.text)


def test_all_nan_and_empty_charts_render():
    for series in ([], [Series("loss", [], [], "#000")],
                   [Series("loss", [0, 1], [None, np.nan], "#000")],
                   [Series("loss", [3], [0.5], "#000")]):
        root = parse(line_chart_svg("Loss", series))
        assert root.tag == SVG + "svg"
    lone = parse(line_chart_svg("Loss", [Series("loss", [3], [0.5], "#000")]))
    assert by_class(lone, "series")[0].get("d").endswith("h0")  # a single point shows as a dot


def test_hostile_text_is_escaped_in_every_svg_slot():
    for bad in HOSTILE:
        svg = line_chart_svg(bad, [Series(bad, [0, 1], [np.nan, 1.0], "#000")], x_label=bad,
                             marks=[0.5], marks_label=bad, note=bad)
        root = parse(svg)  # well-formed: no element or attribute was broken out of
        assert "<script" not in svg and "<img" not in svg
        assert [e.tag for e in root.iter() if "script" in e.tag or "img" in e.tag] == []
        assert bad in [t.text for t in root.iter(SVG + "text")]  # shown, as text
        assert by_class(root, "series")[0].get("data-series") == bad


# --- the dashboard -------------------------------------------------------------------------------

def view(**kw) -> DashboardView:
    current = trace("run3", skipped=[4, 120], val_steps=[100, 200], val_loss=[0.3, 0.25])
    defaults = dict(current=current, earlier=[trace("run1", flags="lr=0.1"), trace("run2")],
                    scaler=True, step=200, total_steps=400, epoch=1, epochs=2,
                    samples_per_s=1234.5, steps_per_s=40.2, lr=3e-4, elapsed=125, eta=3725,
                    status="cpu · fp16 · 2 skipped")
    return DashboardView(**{**defaults, **kw})


IMAGE = re.compile(r'<img class="amp-chart" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"')


def svgs(page: str) -> list[ET.Element]:
    """The page's charts, parsed: decoded from its SVG images, or (the live widget's inline
    markup) each outermost <svg> element."""
    images = IMAGE.findall(page)
    if images:
        return [parse(base64.b64decode(data).decode()) for data in images]
    charts, depth = [], 0
    for tag in re.finditer(r"<(/?)svg\b", page):
        if not tag.group(1):
            depth += 1
            if depth == 1:
                start = tag.start()
        else:
            depth -= 1
            if depth == 0:
                charts.append(parse(page[start:page.index(">", tag.end()) + 1]))
    return charts


def test_dashboard_has_three_charts_stats_progress_and_all_runs():
    page = dashboard_html(view())
    loss, scale, memory = svgs(page)
    assert {p.get("data-series") for p in by_class(loss, "series")} == {
        "run1 loss", "run1 val loss", "run2 loss", "run2 val loss", "loss", "smoothed", "val loss"}
    assert [m.get("data-x") for m in by_class(scale, "mark")] == ["4", "120"]
    assert {p.get("data-series") for p in by_class(memory, "series")} == {
        "run1 allocated", "run2 allocated", "allocated"}
    for text in (">1,234<", ">40.2<", ">0.0003<", "2m05s", "1h02m", "epoch 1/2", "step 200 / 400",
                 "50%", "cpu · fp16 · 2 skipped", "lr=0.1", "run3", "(this run)"):
        assert text in page, text
    assert 'data-fraction="0.5000"' in page and "amp-summary" not in page


def test_dashboard_without_scaler_shows_throughput_in_its_place():
    timed = dict(time=np.arange(1, 201) * 0.02, samples=np.full(200, 64.0))
    page = dashboard_html(view(scaler=False, current=trace("run3", scale=[], **timed),
                               earlier=[trace("run1", **timed)]))
    loss, middle, memory = svgs(page)
    assert middle.get("aria-label") == "Throughput" and "no scaler" not in page
    assert by_class(middle, "mark") == []
    assert {p.get("data-series") for p in by_class(middle, "series")} == {
        "run1 samples/s", "samples/s"}
    ticks = [t.text for t in by_class(middle, "ytick")]
    assert ticks[0] == "0" and any(t.endswith("k") for t in ticks)  # 3,200 samples/s
    # The same three chart sizes as with a scaler: a sweep over dtypes keeps its height.
    sizes = {(c.get("width"), c.get("height")) for c in (loss, middle, memory)}
    assert sizes == {(c.get("width"), c.get("height")) for c in svgs(dashboard_html(view()))}


def test_dashboard_before_the_first_step_and_with_one_step():
    empty = dashboard_html(DashboardView(current=RunTrace("run1")))
    assert len(svgs(empty)) == 3
    assert all("no data yet" in "".join(chart.itertext()) for chart in svgs(empty))
    one = dashboard_html(view(current=trace("run3", n=1), earlier=[], total_steps=None, step=1))
    assert len(svgs(one)) == 3 and "amp-progress" not in one  # no total: no bar to fill


def test_dashboard_shows_alarms_and_the_final_summary():
    rows = [("run", "run3"), ("final loss", "0.25")]
    page = dashboard_html(view(alarms=["loss is nan at step 7"], summary=rows, eta=None))
    assert "loss is nan at step 7" in page and "amp-alarm" in page
    assert summary_table_html(rows) in page
    assert re.search(r"ETA</span> <b[^>]*>—</b>", page)  # no ETA once finished


def test_hostile_text_is_escaped_everywhere_in_the_dashboard():
    for bad in HOSTILE:
        current = trace(bad, flags=bad, memory={bad: np.full(200, 1.0)})
        for inline in (False, True):
            page = dashboard_html(view(current=current, earlier=[trace(bad, flags=bad)],
                                       status=bad, alarms=[bad], summary=[(bad, bad)]),
                                  inline=inline)
            assert "<script" not in page
            images = re.findall(r"<img\b[^>]*>", page)  # only our three charts
            assert len(images) == (0 if inline else 3)
            assert all(IMAGE.match(image) for image in images)
            assert page.count("<svg") == page.count("</svg>")  # no element broken out of
            for chart in svgs(page):
                assert chart.tag == SVG + "svg"
                assert "<script" not in ET.tostring(chart, encoding="unicode")
            assert html_escaped(bad) in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;").replace("'", "&#x27;")


# --- what a saved notebook keeps -----------------------------------------------------------------

def test_the_snapshot_holds_no_inline_svg_only_chart_images_that_decode():
    page = dashboard_html(view(summary=[("run", "run3")]))
    assert "<svg" not in page  # the sanitiser of an untrusted notebook strips inline <svg>
    images = IMAGE.findall(page)
    assert len(images) == 3
    charts = []
    for data in images:
        svg = base64.b64decode(data).decode()
        assert "currentColor" not in svg  # an <img> inherits no text colour
        charts.append(parse(svg))
    texts = ["".join(chart.itertext()) for chart in charts]
    assert "Loss" in texts[0] and "smoothed" in texts[0] and "2k" not in texts[0]
    assert "Loss scale" in texts[1] and "skipped step (2)" in texts[1]
    assert "Memory" in texts[2] and "3 GiB" in texts[2]
    assert "smoothed" not in re.sub(r"<[^>]+>", "", page)  # no chart text left in the page
    # The live widget draws the same charts inline.
    live = svgs(dashboard_html(view(), inline=True))
    assert ["".join(c.itertext()) for c in live] == texts


def test_chart_text_never_grows_past_its_pixel_size():
    page = dashboard_html(view())
    images = re.findall(r"<img\b[^>]*>", page)
    for image, chart in zip(images, svgs(page)):
        width = chart.get("width")
        assert f'width="{width}"' in image and f"max-width:{width}px" in image
        assert chart.get("viewBox") == f"0 0 {width} {chart.get('height')}"
        assert float(chart.get("font-size")) <= 12


def test_the_axes_follow_the_current_run_not_a_diverged_earlier_one():
    n = 1000
    diverged = trace("sweep[lr=50]", n=n, loss=np.r_[np.linspace(2.3, 40, 300),
                                                     np.full(n - 300, 1e6)],
                     memory={"allocated": np.full(n, 40 * 2 ** 30)})
    current = trace("run3", n=200, loss=0.02 + 0.01 / np.sqrt(np.arange(1, 201)))
    loss, _, memory = svgs(dashboard_html(view(current=current, earlier=[diverged])))
    ticks = [float(t.text) for t in by_class(loss, "ytick")]
    assert 0.015 < ticks[0] and ticks[-1] < 0.04, ticks  # the current run's range
    x_ticks = [t.text for t in by_class(loss, "xtick")]
    assert x_ticks[-1] == "200", x_ticks  # the current run's steps, not the earlier 1000
    faded = {p.get("data-series"): p for p in by_class(loss, "series")}["sweep[lr=50] loss"]
    assert path_points(faded.get("d"))  # drawn, clipped to the plot
    memory_ticks = [t.text for t in by_class(memory, "ytick")]
    assert memory_ticks[-1] == "3 GiB", memory_ticks  # the current run's 3 GiB, not the 40


def test_the_runs_legend_stays_one_line_or_collapses():
    def legend(earlier):
        page = dashboard_html(view(earlier=earlier))
        block = re.search(r'<div class="amp-runs".*?</div>', page).group(0)
        return block, re.sub(r"<[^>]+>", "", block)

    one = [trace("sweep[lr=0.001]", flags="lr=0.001")]
    _, text = legend(one)
    assert "sweep[lr=0.001] lr=0.001" in text and "earlier run" not in text
    many = [trace(f"sweep[lr=0.00{i} momentum=0.9]", flags=f"lr=0.00{i} momentum=0.9 wd=0.01")
            for i in range(1, 7)]
    block, text = legend(many)
    assert re.search(r"\+\d earlier runs|\+\d more earlier runs", text), text
    assert len(text) <= 110, text  # about one line of body text at 1000 px
    assert "sweep[lr=0.001 momentum=0.9]" in block  # the collapsed ones, in the tooltip


def test_a_short_run_still_gets_time_ticks():
    svg = line_chart_svg("Memory", [Series("rss", [0.1, 0.2, 0.35], [1e6, 2e6, 2e6], "#000")],
                         x_scale="seconds", y_scale="bytes", x_label="time")
    labels = [t.text for t in by_class(parse(svg), "xtick")]
    assert len(labels) >= 2 and all(label.endswith("s") for label in labels), labels


def test_smoothing_follows_the_log_axis():
    rng = np.random.default_rng(3)
    steps = np.arange(1, 3001, dtype=float)
    loss = 10 ** (1 - 4 * steps / 3000) * np.exp(rng.normal(0, 1.0, 3000))  # 10 -> 1e-3
    typical = np.exp(np.mean(np.log(loss[-150:])))  # the raw line's middle on a log axis
    _, on_log = smooth(steps, loss, log=True)
    _, on_linear = smooth(steps, loss)
    assert 0.5 < on_log[-1] / typical < 2
    assert on_linear[-1] / typical > 2  # averaging raw values: far above the data on a log axis

    loss_chart = svgs(dashboard_html(view(current=trace("run3", n=3000, loss=loss))))[0]
    assert by_class(loss_chart, "ytick")[0].text.startswith("10")  # a log10 axis
    paths = {p.get("data-series"): path_points(p.get("d")) for p in by_class(loss_chart, "series")}
    raw_end = np.median([y for _, y in paths["loss"][-60:]])
    top, bottom = min(y for _, y in paths["loss"]), max(y for _, y in paths["loss"])
    assert abs(paths["smoothed"][-1][1] - raw_end) < 0.08 * (bottom - top)


# --- runs: names, labels, numbers ----------------------------------------------------------------

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


@pytest.fixture
def nb(ip):
    import torch
    import torch.nn.functional as F
    from recipes import make_data, make_model

    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(n=4), F=F, torch=torch)
    return ip


def finished_run(name, n=50, rate=2000.0, samples=64, **kw):
    from amp_magics.training.run import Run

    run = Run(name, **kw)
    run.history = [{"step": i, "epoch": 0, "loss": 1.0 / (i + 1), "scale": None,
                    "skipped": False, "lr": 0.1, "time": (i + 1) * samples / rate * (1 + i % 3),
                    "samples": samples} for i in range(n)]
    run.memory = [{"time": 0.2 * i, "step": i, "rss": 2 ** 28, "allocated": None,
                   "reserved": None, "peak": None} for i in range(5)]
    run.status, run.wall_time = "finished", run.history[-1]["time"] + 0.4
    return run


def test_names_are_unique_whatever_was_asked_for():
    from amp_magics.training import registry as runs_module

    made = []
    try:
        for name in ("first", "first", "sweep9[lr=0.1]", "sweep9[lr=0.1]", "model2", "model2"):
            made.append(finished_run(name))
            runs_module.register(made[-1])
        assert [r.name for r in made] == ["first", "first2", "sweep9[lr=0.1]",
                                          "sweep9-2[lr=0.1]", "model2", "model2-2"]
        assert runs_module.unique_group("sweep9") == "sweep9-3"
        assert runs_module.unique_group("never-used-group") == "never-used-group"
    finally:
        with runs_module._RUNS_LOCK:
            for run in made:
                runs_module._RUNS.remove(run)


def test_two_sweeps_get_unique_names_and_amp_runs_reaches_every_one(nb):
    before = len(nb.run("%amp_runs"))
    for _ in range(2):
        nb.run('%%amp_train --dtype fp32 --sweep "lr=0.001,0.01"\n' + BODY)
    table = nb.run("%amp_runs")
    names = [row["run"] for row in table.rows()][before:]
    assert len(names) == len(set(names)) == 4, names
    one, two = names[0].partition("[")[0], names[2].partition("[")[0]
    assert one != two and names[1].startswith(one) and names[3].startswith(two)
    assert [n.partition("[")[2] for n in names] == ["lr=0.001]", "lr=0.01]"] * 2
    assert f"{len(table)} runs this session" in table._repr_html_()
    picture = nb.run(f"%amp_runs --plot {names[0]} {names[2]}")  # the older one is reachable
    assert names[0] in repr(picture) and names[2] in repr(picture)
    # The flags column says what each sweep run set.
    assert [row["flags"] for row in table.rows()][before:] == [
        "dtype=fp32 lr=0.001", "dtype=fp32 lr=0.01"] * 2


def test_compare_and_sweep_runs_are_labelled_with_what_they_ran(nb):
    from amp_magics.tuning.showdown import LOSS_GAP, speed_words
    from amp_magics.views.dashboard import flags_that_differ
    from amp_magics.formatting import format_percent

    nb.run("%%amp_train --compare fp32,bf16 --steps 3 -o cmp\n" + BODY)
    showdown = nb.user_ns["cmp"]
    fp32, bf16 = showdown.runs.values()
    assert [fp32.flags_text(), bf16.flags_text()] == ["steps=3 dtype=fp32", "steps=3 dtype=bf16"]
    nb.run("%%amp_train --dtype fp32 --epochs 1 -o later\n" + BODY)
    later = nb.user_ns["later"]
    legend = flags_that_differ(bf16, later)
    assert legend == "dtype=bf16 steps=3", legend  # never dtype=auto, never epochs=-
    assert flags_that_differ(fp32, later) == "steps=3"

    # The loss gap: one number, one format, in the table and in the verdict.
    gap = format_percent(showdown.rows()[1][LOSS_GAP])
    assert f"<td style='text-align:left;padding:1px 14px 1px 0;vertical-align:middle'>{gap}</td>" \
        in showdown._repr_html_()
    assert f"final loss within {gap} of fp32" in showdown.verdicts()[0]
    assert "peak memory" not in showdown.rows()[0]  # it measured something else: named so
    assert speed_words(10.0, 10.3) == "about as fast as fp32 (3% slower)"
    assert speed_words(10.0, 9.8) == "about as fast as fp32 (2% faster)"
    assert (speed_words(10.0, 5.0), speed_words(10.0, 25.0)) == ("2x faster", "2.5x slower")

    nb.run('%%amp_train --dtype fp32 --sweep "lr=0.0001,0.001,0.01" -o sw\n' + BODY)
    sweep = nb.user_ns["sw"]
    cells = re.findall(r"<tr[^>]*><td[^>]*>([^<]*)</td>", sweep._repr_html_())
    assert cells == ["1e-04", "1e-03", "1e-02"]  # one format per column


def test_header_and_summary_show_the_same_rates_in_one_format():
    from amp_magics.views.dashboard import _Columns, build_view, overlay_html

    run = finished_run("rates", rate=23_390.0)
    page = overlay_html([run])
    header = re.search(r"samples/s</span> <b>([^<]+)</b>", page).group(1)
    per_step = re.search(r"steps/s</span> <b>([^<]+)</b>", page).group(1)
    assert "(mean over the run)" in page
    summary = dict(summary_rows(run))["throughput (mean over the run)"]
    assert summary == f"{header} samples/s, {per_step} steps/s"
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", header), header  # 11,695, not 1.17e+04
    live = build_view(run, _Columns(run).update(), [], final=False)
    assert (live.samples_per_s, live.steps_per_s) == run.rates(last=50)
    assert "peak memory" in dict(summary_rows(run))
    assert dict(summary_rows(run))["peak memory"].endswith("(process RSS, highest sample)")


def test_a_picture_reads_as_text_in_a_terminal():
    a, b = finished_run("a"), finished_run("b")
    b.precision = "bf16"
    text = repr(amp_magics.plot(a, b))
    lines = text.splitlines()
    assert lines[0] == "2 runs overlaid; the axes follow a:"
    assert lines[1].startswith("  <Run 'a' finished: 50 steps")
    assert lines[2].startswith("  <Run 'b' finished") and "(faded: dtype=bf16)" in lines[2]
    assert "<amp_magics" not in text and "IMAGE" not in text


def test_earlier_runs_are_those_of_the_same_model_object(nb):
    import gc

    import torch
    from recipes import make_model

    from amp_magics.magics.args import parse
    from amp_magics.training.run import Run

    net = nb.user_ns["model"]
    nb.run(f"%%amp_train --dtype fp32 --steps 2 -o mine\n{BODY}")
    mine = nb.user_ns["mine"]
    other = make_model(seed=5)  # another network under the same name
    nb.user_ns.update(model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    nb.run(f"%%amp_train --dtype fp32 --steps 2 -o theirs\n{BODY}")
    theirs = nb.user_ns["theirs"]
    magics = nb.magics_manager.registry["AmpMagics"]
    magics.view = "dashboard"
    try:
        args = parse(magics.amp_train, "--model model")
        assert theirs in magics._view(args, nb.user_ns["model"]).earlier_runs
        assert mine not in magics._view(args, nb.user_ns["model"]).earlier_runs
        nb.user_ns["model"] = net
        assert mine in magics._view(args, nb.user_ns["model"]).earlier_runs
        assert theirs not in magics._view(args, nb.user_ns["model"]).earlier_runs
    finally:
        magics.view = "text"
    gone = torch.nn.Linear(2, 2)
    run = Run("weak", model=gone)
    assert run.same_model(gone)
    del gone
    gc.collect()
    assert run._model() is None  # the run does not keep its model alive


def test_a_running_runs_notice_is_rewritten_when_it_ends(nb):
    from IPython.utils.capture import capture_output

    from amp_magics.views.dashboard import end_notices

    run = finished_run("bg")
    run.status = "running"
    nb.user_ns["bg"] = run
    with capture_output() as captured:
        nb.run("bg")  # what a --background cell returns
    (shown,) = captured.outputs
    assert "started at" in shown.data["text/html"] and "running" in shown.data["text/plain"]
    display_id = shown.transient["display_id"]
    run.status = "interrupted"
    with capture_output() as captured:
        end_notices(run)
    (ended,) = captured.outputs
    assert ended.update and ended.transient["display_id"] == display_id
    assert "interrupted: 50 steps" in ended.data["text/html"]
    assert "started" not in ended.data["text/html"] and "Stop" not in ended.data["text/html"]
    assert ended.data["text/plain"].startswith("<Run 'bg' interrupted: 50 steps")


def test_torch_threads_are_counted_in_words():
    from types import SimpleNamespace

    from amp_magics.views.status import _host_facts

    host = SimpleNamespace(cpu_model="cpu", logical_cpus=1, usable_cpus=1, bf16_flags=[],
                           fp16_flags=[], ram_total=None, ram_available=None, amx=None,
                           torch_threads=1, process_rss=None)
    assert dict(_host_facts(host))["torch"] == "1 thread"
    assert dict(_host_facts(SimpleNamespace(**{**vars(host), "torch_threads": 4})))["torch"] \
        == "4 threads"


def test_a_comparison_lists_runs_in_the_order_given_without_a_this_run():
    from amp_magics.views.dashboard import overlay_html

    a, b, c = finished_run("alpha"), finished_run("beta"), finished_run("gamma")
    empty = finished_run("empty")
    empty.history, empty.status = [], "failed"
    page = overlay_html([a, b, empty, c])
    legend = page.split('class="amp-runs"')[1].split("</div>")[0]
    assert "(this run)" not in legend
    assert legend.index("alpha") < legend.index("beta") < legend.index("gamma")
    assert "empty" not in legend  # a run with no step is never overlaid
    assert "empty" in repr(amp_magics.plot(a, empty)) and "not drawn" in repr(
        amp_magics.plot(a, empty))


def test_a_run_with_no_step_is_not_an_earlier_run_on_the_next_dashboard(nb):
    from amp_magics.magics.args import parse as parse_flags

    with pytest.raises(Exception):
        nb.run("%%amp_train --dtype fp32 -o failed\nraise RuntimeError('at once')\n" + BODY)
    assert nb.user_ns["failed"].history == []
    magics = nb.magics_manager.registry["AmpMagics"]
    magics.view = "dashboard"
    try:
        args = parse_flags(magics.amp_train, "")
        assert nb.user_ns["failed"] not in magics._view(args, nb.user_ns["model"]).earlier_runs
    finally:
        magics.view = "text"


def test_a_short_run_and_a_nan_run_still_draw_what_happened():
    one = line_chart_svg("Memory", [Series("rss", [0.4], [2.0 ** 28], "#123456")],
                         y_scale="bytes", x_scale="seconds")
    assert len(by_class(parse(one), "series")) == 1 and "<circle" in one  # a visible dot
    assert "no data yet" not in one
    nan = line_chart_svg("Loss", [Series("loss", [0, 1], [math.nan, math.inf], "#123456")])
    assert "no finite value (2 NaN/inf)" in nan and "no data yet" not in nan
    assert len(by_class(parse(nan), "nonfinite")) == 2  # marked where they happened


def test_earlier_runs_share_the_axis_when_comparable_and_sit_at_the_edge_when_not():
    steps = list(range(50))
    current = Series("loss", steps, [2.0 - i / 50 for i in steps], "#111111")
    near = Series("run1 loss", steps, [3.0 - i / 50 for i in steps], "#222222", faded=True)
    far = Series("run2 loss", steps, [1e6] * 50, "#333333", faded=True)
    svg = line_chart_svg("Loss", [near, far, current], ignore_outliers=True)
    root = parse(svg)
    ticks = [float(t.text) for t in by_class(root, "ytick")]
    assert max(ticks) >= 2.9 and max(ticks) < 10  # the near run is on the plot, the far one not
    assert "earlier run off scale, at the edge (1)" in svg
    paths = {p.get("data-series"): p.get("d") for p in by_class(root, "series")}
    ys = [float(v) for v in re.findall(r",(-?[\d.]+)", paths["run2 loss"])]
    top = min(float(y.get("y")) for y in by_class(root, "ytick")) - 20
    assert ys and min(ys) >= top  # drawn along the top edge, not far above it


def test_every_run_of_a_chart_has_a_colour_of_its_own_even_beyond_the_palette():
    """A sweep of 9 runs overlaid: nine colours, none repeated, none the skipped-step red;
    the current run's raw and smoothed loss share its colour (faint and solid), which the
    legend names."""
    from amp_magics.views.charts import ALERT, PALETTE, run_colors
    from amp_magics.views.dashboard import overlay_html

    assert run_colors(3) == list(PALETTE[:3])
    colors = run_colors(12)
    assert len(set(colors)) == 12 and ALERT not in colors
    runs = [finished_run(f"trial{i}") for i in range(9)]
    for k, run in enumerate(runs):  # apart on the axis, so none is off scale
        for record in run.history:
            record["loss"] += 0.01 * k
    loss_chart = svgs(overlay_html(runs))[0]
    by_series = {p.get("data-series"): p.get("stroke") for p in by_class(loss_chart, "series")}
    overlays = [by_series[f"trial{i} loss"] for i in range(1, 9)]
    current = {by_series["loss"], by_series["smoothed"]}
    assert len(set(overlays)) == 8 and len(current) == 1 and not current & set(overlays)
