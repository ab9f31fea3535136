"""The dashboard's pure rendering: reduction, charts, escaping and empty states."""
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from amp_magics.views.charts import (
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
    assert float(paths["old run"].get("stroke-opacity")) == pytest.approx(0.35)
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


def svgs(page: str) -> list[ET.Element]:
    """The page's charts: each outermost <svg> element, parsed."""
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


def test_dashboard_without_scaler_says_so():
    page = dashboard_html(view(scaler=False, current=trace("run3", scale=[])))
    _, scale, _ = svgs(page)
    assert "no scaler" in "".join(scale.itertext())
    assert by_class(scale, "mark") == []
    assert {p.get("data-series") for p in by_class(scale, "series")} == {
        "run1 loss scale", "run2 loss scale"}


def test_dashboard_before_the_first_step_and_with_one_step():
    empty = dashboard_html(DashboardView(current=RunTrace("run1")))
    assert len(svgs(empty)) == 3 and "no data yet" in empty
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
        page = dashboard_html(view(current=current, earlier=[trace(bad, flags=bad)], status=bad,
                                   alarms=[bad], summary=[(bad, bad)]))
        assert "<script" not in page and "<img" not in page
        assert page.count("<svg") == page.count("</svg>")  # no element broken out of
        for chart in svgs(page):
            assert chart.tag == SVG + "svg"
        assert html_escaped(bad) in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;").replace("'", "&#x27;")
