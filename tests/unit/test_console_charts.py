"""The System Information graphs: pure functions from counts to SVG, read back as numbers."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from dsm_node.cluster.status import NodeStatus
from dsm_node.console import charts, views
from dsm_node.jobs.pool import MinuteCount

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ET.Element:
    """The chart as XML (it must be well-formed on its own)."""
    text = str(markup).replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    return ET.fromstring(text)


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == cls]


def test_bar_chart_carries_every_count_and_title() -> None:
    root = parse(
        charts.bar_chart(
            [charts.Bar("node-1", 35), charts.Bar("node-2", 0), charts.Bar("node-3", 7)],
            chart_id="c",
            title="Jobs by Node",
            key="node",
        )
    )
    bars = groups(root, "bar")
    assert [(b.get("data-node"), b.get("data-count")) for b in bars] == [
        ("node-1", "35"),
        ("node-2", "0"),
        ("node-3", "7"),
    ]
    assert root.find(f"{SVG}title").text == "Jobs by Node"  # type: ignore[union-attr]
    assert "node-1: 35 jobs; node-2: 0 jobs; node-3: 7 jobs." in root.find(f"{SVG}desc").text  # type: ignore[operator, union-attr]
    widths = [float(b.find(f"{SVG}rect").get("width")) for b in bars]  # type: ignore[arg-type, union-attr]
    assert widths[0] > widths[2] > widths[1] == 0
    # each bar's value is written beside it, not left to colour or length
    assert [b.findall(f"{SVG}text")[-1].text for b in bars] == ["35", "0", "7"]


def test_labels_and_titles_are_escaped() -> None:
    hostile = '<script>alert(1)</script>"&'
    markup = charts.bar_chart([charts.Bar(hostile, 1)], chart_id="c", title=hostile, key="type")
    assert "<script>" not in markup
    root = parse(markup)  # still well-formed
    (bar,) = groups(root, "bar")
    assert bar.get("data-type") == hostile
    markup = charts.network_map(
        [charts.MapNode(hostile, views.status_view(NodeStatus.ONLINE), 1)], chart_id="m", title="t"
    )
    assert "<script>" not in markup and parse(markup) is not None
    markup = charts.stacked_chart(
        [hostile], [hostile], {(hostile, hostile): 2}, chart_id="s", title="t"
    )
    assert "<script>" not in markup and parse(markup) is not None


def test_empty_charts_say_so() -> None:
    for markup in (
        charts.bar_chart([], chart_id="c", title="t", key="node"),
        charts.bar_chart([charts.Bar("a", 0)], chart_id="c", title="t", key="node"),
        charts.stacked_chart(["a"], [], {}, chart_id="s", title="t"),
    ):
        assert "No jobs ran in the last hour." in markup
        parse(markup)
    assert "No manager nodes." in charts.network_map([], chart_id="m", title="t")


def test_stacked_chart_segments_sum_to_row_totals() -> None:
    values = {("a", "noop"): 10, ("a", "sleep"): 5, ("b", "sleep"): 3, ("b", "clear_caches"): 1}
    root = parse(
        charts.stacked_chart(
            ["a", "b", "c"], ["clear_caches", "noop", "sleep"], values, chart_id="s", title="t"
        )
    )
    segments = {
        (g.get("data-node"), g.get("data-type")): int(g.get("data-count") or 0)
        for g in groups(root, "segment")
    }
    assert segments == values  # zero cells draw nothing
    totals = {g.get("data-node"): g.get("data-total") for g in groups(root, "row")}
    assert totals == {"a": "15", "b": "4", "c": "0"}
    legend = [g.get("data-type") for g in groups(root, "legend")]
    assert legend == ["clear_caches", "noop", "sleep"]  # in segment order
    # one colour per type, the same in the legend and in every segment
    colour = {
        g.get("data-type"): g.find(f"{SVG}rect").get("fill")  # type: ignore[union-attr]
        for g in groups(root, "legend")
    }
    for g in groups(root, "segment"):
        assert g.find(f"{SVG}rect").get("fill") == colour[g.get("data-type")]  # type: ignore[union-attr]


def test_network_map_shows_status_in_words_and_relative_activity() -> None:
    nodes = [
        charts.MapNode("n1", views.status_view(NodeStatus.ONLINE), 30),
        charts.MapNode("n2", views.status_view(NodeStatus.OFFLINE), 10),
        charts.MapNode("n3", views.status_view(NodeStatus.UPGRADE_REQUIRED), 0),
    ]
    root = parse(charts.network_map(nodes, chart_id="m", title="Network Map"))
    shown = groups(root, "map-node")
    assert [(g.get("data-node"), g.get("data-status"), g.get("data-count")) for g in shown] == [
        ("n1", "Online", "30"),
        ("n2", "Offline", "10"),
        ("n3", "Offline (Upgrade Required)", "0"),
    ]
    texts = [[t.text for t in g.iter(f"{SVG}text")] for g in shown]
    assert "Offline (Upgrade Required)" in texts[2]
    assert "30 jobs · 75%" in texts[0] and "10 jobs · 25%" in texts[1]
    activity = [
        float(r.get("width") or 0)
        for g in shown
        for r in g.iter(f"{SVG}rect")
        if r.get("class") == "activity"
    ]
    assert activity[0] == pytest.approx(3 * activity[1], abs=0.2) and activity[2] == 0


def test_network_map_grows_for_many_nodes() -> None:
    many = [charts.MapNode(f"n{i}", views.status_view(NodeStatus.ONLINE), i) for i in range(12)]
    root = parse(charts.network_map(many, chart_id="m", title="t"))
    assert float(root.get("height") or 0) == charts.map_height(12) > charts.map_height(8)
    assert len(groups(root, "map-node")) == 12
    # three nodes (one on top, two below the middle) leave the bottom out of the drawing
    few = parse(charts.network_map(many[:3], chart_id="m", title="t"))
    assert float(few.get("height") or 0) < charts.map_height(3)
    top = float((few.get("viewBox") or "").split()[1])
    cards = [float(r.get("y") or 0) for g in groups(few, "map-node") for r in g.iter(f"{SVG}rect")][
        ::3
    ]
    assert top <= min(cards) and max(cards) + charts.CARD_H <= top + float(few.get("height") or 0)


@pytest.mark.parametrize(
    ("maximum", "expected_top", "steps"),
    [(0, 1, 1), (1, 1, 1), (7, 8, 2), (35, 40, 10), (120, 150, 50), (999, 1000, 200)],
)
def test_nice_ticks(maximum: int, expected_top: int, steps: int) -> None:
    ticks = charts.nice_ticks(maximum)
    assert ticks[0] == 0 and ticks[-1] == expected_top >= maximum
    assert all(b - a == steps for a, b in itertools.pairwise(ticks))


def test_long_labels_are_cut_with_the_full_text_in_the_title() -> None:
    label = "a-very-long-node-name-that-does-not-fit-the-column.example.com"
    root = parse(charts.bar_chart([charts.Bar(label, 3)], chart_id="c", title="t", key="node"))
    (bar,) = groups(root, "bar")
    shown = next(t.text for t in bar.iter(f"{SVG}text") if t.get("class") == "label")
    assert shown is not None and shown.endswith("…") and len(shown) < len(label)
    assert bar.find(f"{SVG}title").text == f"{label}: 3 jobs"  # type: ignore[union-attr]


def test_activity_buckets_minutes_by_the_database_clock() -> None:
    import datetime as dt

    now = dt.datetime(2026, 5, 1, 12, 30, 41, tzinfo=dt.UTC)
    minute = dt.datetime(2026, 5, 1, 12, 30, tzinfo=dt.UTC)
    ago = [minute - dt.timedelta(minutes=m) for m in range(61)]
    rows = [
        MinuteCount(1, "a", ago[0], 4),  # this minute: the last bucket
        MinuteCount(1, "a", ago[1], 2),
        MinuteCount(1, "a", ago[59], 1),  # the first
        MinuteCount(1, "a", ago[60], 9),  # too old
        MinuteCount(2, "b", ago[3], 5),
    ]
    series = views.activity(rows, now)
    assert set(series) == {"a", "b"} and all(len(s) == 60 for s in series.values())
    assert series["a"][-1] == 4 and series["a"][-2] == 2 and series["a"][0] == 1
    assert sum(series["a"]) == 7 and series["b"][-4] == 5 and sum(series["b"]) == 5


def test_map_activity_graph_compares_nodes_minute_by_minute() -> None:
    busy = [0] * 58 + [10, 5]
    quiet = [0] * 59 + [5]
    root = parse(
        charts.network_map(
            [
                charts.MapNode("a", views.status_view(NodeStatus.ONLINE), 15, busy),
                charts.MapNode("b", views.status_view(NodeStatus.OFFLINE), 5, quiet),
            ],
            chart_id="m",
            title="t",
        )
    )
    lines = [g for g in root.iter(f"{SVG}g") if g.get("class") == "sparkline"]
    assert [g.get("data-counts") for g in lines] == [
        ",".join(map(str, busy)),
        ",".join(map(str, quiet)),
    ]
    heights = [[float(r.get("height") or 0) for r in g.iter(f"{SVG}rect")] for g in lines]
    # one scale for every node: b's busiest minute (5) is half as tall as a's (10)
    assert heights[0] == [charts.SPARK_H, charts.SPARK_H / 2]
    assert heights[1] == [charts.SPARK_H / 2]
