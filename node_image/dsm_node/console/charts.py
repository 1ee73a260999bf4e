"""The System Information graphs as SVG: pure functions from counts to markup.

Server-rendered SVG needs no script and no charting library, works air-gapped, and is testable
by reading numbers: every bar, segment and node carries its values in ``data-*`` attributes
(``data-node``, ``data-type``, ``data-count``), a ``<title>`` a screen reader and a tooltip
show, and the chart a ``<desc>`` summing it up. Colour never carries meaning alone: bars have
their numbers written beside them, series have a legend in the same order as the segments, and
node statuses are written out with an icon.

Text widths are estimated (no font metrics on the server): labels longer than their column are
cut with an ellipsis, and the full text stays in the ``<title>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup

from dsm_node.console.views import ICON_PATHS, TONE_COLOURS, StatusView

WIDTH = 720
FONT_SIZE = 13
CHAR_WIDTH = 7.2  # an estimate of the average advance of the console's sans-serif at 13 px
BAR_COLOUR = "#2f6fd0"
# Okabe and Ito's palette, distinguishable with the common colour-vision deficiencies
# (yellow left out: too light on white)
SERIES_COLOURS = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#d55e00",
    "#000000",
    "#7f7f7f",
)


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    colour: str = BAR_COLOUR


@dataclass(frozen=True)
class MapNode:
    name: str
    status: StatusView
    jobs: int
    activity: Sequence[int] = ()  # jobs per minute over the last hour, oldest first


def series_colour(index: int) -> str:
    return SERIES_COLOURS[index % len(SERIES_COLOURS)]


def nice_ticks(maximum: int, count: int = 5) -> list[int]:
    """Axis ticks from 0 to at least ``maximum`` in steps of 1, 2 or 5 times a power of ten."""
    if maximum <= 0:
        return [0, 1]
    raw = maximum / count
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(1, int(step))
    top = math.ceil(maximum / step) * step
    return list(range(0, top + 1, step))


def fit(text: str, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels (estimated)."""
    chars = max(1, int(width / CHAR_WIDTH))
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def _f(x: float) -> str:
    """Coordinates with at most one decimal."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _svg(
    chart_id: str, title: str, desc: str, height: float, body: list[Markup], top: float = 0.0
) -> Markup:
    head = Markup(
        '<svg class="chart" id="{id}" viewBox="0 {top} {w} {h}" width="{w}" height="{h}" '
        'role="img" aria-labelledby="{id}-title {id}-desc" font-size="{fs}" '
        'preserveAspectRatio="xMinYMin meet">'
        '<title id="{id}-title">{title}</title><desc id="{id}-desc">{desc}</desc>'
    ).format(id=chart_id, top=_f(top), w=WIDTH, h=_f(height), fs=FONT_SIZE, title=title, desc=desc)
    return head + Markup("").join(body) + Markup("</svg>")


def _summary(pairs: Sequence[tuple[str, int]], unit: str) -> str:
    if not pairs:
        return f"No {unit} in the last hour."
    return "; ".join(f"{label}: {value} {unit}" for label, value in pairs) + "."


def _empty(y: float, text: str = "No jobs ran in the last hour.") -> Markup:
    return Markup(
        '<text class="empty" x="{x}" y="{y}" text-anchor="middle" fill="#4b5563">{text}</text>'
    ).format(x=WIDTH / 2, y=_f(y), text=text)


def _axis(ticks: list[int], x0: float, x1: float, top: float, bottom: float) -> list[Markup]:
    """Vertical grid lines with their numbers above the plot."""
    out = []
    for t in ticks:
        x = x0 + (x1 - x0) * t / ticks[-1]
        out.append(
            Markup(
                '<line class="grid" x1="{x}" x2="{x}" y1="{t}" y2="{b}" stroke="#d9dee5"/>'
                '<text class="tick" x="{x}" y="{ty}" text-anchor="middle" fill="#4b5563" '
                'font-size="11">{v}</text>'
            ).format(x=_f(x), t=_f(top), b=_f(bottom), ty=_f(top - 6), v=t)
        )
    return out


LABEL_WIDTH = 168.0
ROW = 30.0
TOP = 26.0


def bar_chart(
    bars: Sequence[Bar], *, chart_id: str, title: str, key: str, unit: str = "jobs"
) -> Markup:
    """Horizontal bars, one per label, the value written at each bar's end. ``key`` names the
    data attribute of the label (``node`` or ``type``)."""
    height = TOP + max(1, len(bars)) * ROW + 10
    body: list[Markup] = []
    x0, x1 = LABEL_WIDTH + 8, WIDTH - 56
    ticks = nice_ticks(max((b.value for b in bars), default=0))
    body += _axis(ticks, x0, x1, TOP, height - 10)
    if not bars or all(b.value == 0 for b in bars):
        body.append(_empty(TOP + max(1, len(bars)) * ROW / 2 + 4))
    for i, b in enumerate(bars):
        y = TOP + i * ROW
        w = (x1 - x0) * b.value / ticks[-1]
        body.append(
            Markup(
                '<g class="bar" data-{key}="{label}" data-count="{v}">'
                "<title>{label}: {v} {unit}</title>"
                '<text class="label" x="{lx}" y="{ty}" text-anchor="end" fill="#1f2937">'
                "{short}</text>"
                '<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="2" fill="{c}"/>'
                '<text class="value" x="{vx}" y="{ty}" fill="#1f2937">{v}</text></g>'
            ).format(
                key=key,
                label=b.label,
                short=fit(b.label, LABEL_WIDTH - 4),
                v=b.value,
                unit=unit,
                lx=_f(LABEL_WIDTH),
                ty=_f(y + ROW / 2 + 4.5),
                x=_f(x0),
                y=_f(y + 5),
                w=_f(w),
                h=_f(ROW - 10),
                c=b.colour,
                vx=_f(x0 + w + 6),
            )
        )
    desc = _summary([(b.label, b.value) for b in bars], unit)
    return _svg(chart_id, title, desc, height, body)


def stacked_chart(
    rows: Sequence[str],
    series: Sequence[str],
    values: Mapping[tuple[str, str], int],
    *,
    chart_id: str,
    title: str,
    unit: str = "jobs",
) -> Markup:
    """One horizontal bar per row (node) split into segments per series (job type), with a
    legend above in series order and each row's total at its end."""
    body: list[Markup] = []
    # the legend, wrapped into lines
    legend_y, x = 14.0, 8.0
    for i, name in enumerate(series):
        w = 22 + min(len(name), 24) * CHAR_WIDTH + 18
        if x + w > WIDTH and x > 8:
            legend_y += 20
            x = 8.0
        body.append(
            Markup(
                '<g class="legend" data-type="{name}"><rect x="{x}" y="{y}" width="14" '
                'height="14" rx="2" fill="{c}"/><text x="{tx}" y="{ty}" fill="#1f2937">{short}'
                "</text></g>"
            ).format(
                name=name,
                short=fit(name, 24 * CHAR_WIDTH),
                x=_f(x),
                y=_f(legend_y - 11),
                c=series_colour(i),
                tx=_f(x + 20),
                ty=_f(legend_y),
            )
        )
        x += w
    top = (legend_y + 16 + TOP) if series else TOP
    height = top + max(1, len(rows)) * ROW + 10
    x0, x1 = LABEL_WIDTH + 8, WIDTH - 56
    totals = {r: sum(values.get((r, s), 0) for s in series) for r in rows}
    ticks = nice_ticks(max(totals.values(), default=0))
    body += _axis(ticks, x0, x1, top, height - 10)
    if not rows or all(v == 0 for v in totals.values()):
        body.append(_empty(top + max(1, len(rows)) * ROW / 2 + 4))
    for r_i, row in enumerate(rows):
        y = top + r_i * ROW
        parts = [
            Markup(
                '<text class="label" x="{lx}" y="{ty}" text-anchor="end" fill="#1f2937">'
                "<title>{row}</title>{short}</text>"
            ).format(
                lx=_f(LABEL_WIDTH), ty=_f(y + ROW / 2 + 4.5), row=row, short=fit(row, LABEL_WIDTH)
            )
        ]
        x = x0
        for s_i, s in enumerate(series):
            v = values.get((row, s), 0)
            if v == 0:
                continue
            w = (x1 - x0) * v / ticks[-1]
            parts.append(
                Markup(
                    '<g class="segment" data-node="{row}" data-type="{s}" data-count="{v}">'
                    "<title>{row}, {s}: {v} {unit}</title>"
                    '<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{c}" stroke="#fff" '
                    'stroke-width="1"/></g>'
                ).format(
                    row=row,
                    s=s,
                    v=v,
                    unit=unit,
                    x=_f(x),
                    y=_f(y + 5),
                    w=_f(w),
                    h=_f(ROW - 10),
                    c=series_colour(s_i),
                )
            )
            if w >= len(str(v)) * CHAR_WIDTH + 6:  # the count inside the segment when it fits
                parts.append(
                    Markup(
                        '<text class="inside" x="{x}" y="{ty}" text-anchor="middle" '
                        'fill="{fg}" font-size="11" aria-hidden="true">{v}</text>'
                    ).format(
                        x=_f(x + w / 2),
                        ty=_f(y + ROW / 2 + 4),
                        fg=_text_on(series_colour(s_i)),
                        v=v,
                    )
                )
            x += w
        parts.append(
            Markup('<text class="value" x="{x}" y="{ty}" fill="#1f2937">{t}</text>').format(
                x=_f(x + 6), ty=_f(y + ROW / 2 + 4.5), t=totals[row]
            )
        )
        body.append(
            Markup('<g class="row" data-node="{row}" data-total="{t}">').format(
                row=row, t=totals[row]
            )
            + Markup("").join(parts)
            + Markup("</g>")
        )
    desc = " ".join(
        f"{row}: {totals[row]} {unit}"
        + (
            " ("
            + ", ".join(f"{s} {values[(row, s)]}" for s in series if values.get((row, s)))
            + ")."
            if totals[row]
            else "."
        )
        for row in rows
    ) or _summary([], unit)
    return _svg(chart_id, title, desc, height, body)


def _text_on(colour: str) -> str:
    """Black or white, whichever reads better on ``colour`` (relative luminance)."""
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)
    return "#000" if luminance > 0.22 else "#fff"


CARD_W, CARD_H = 176.0, 100.0
SPARK_H = 22.0


def _sparkline(series: Sequence[int], x: float, y: float, width: float, scale: int) -> Markup:
    """Jobs per minute as thin bars on a baseline, heights relative to ``scale`` (the busiest
    minute of any node, so that nodes compare); a minute without jobs draws no bar."""
    if not series:
        return Markup("")
    step = width / len(series)
    bars = [
        Markup(
            '<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{c}"><title>{n} jobs, {ago}'
            "</title></rect>"
        ).format(
            x=_f(x + i * step),
            y=_f(y + SPARK_H - max(1.0, SPARK_H * n / scale)),
            w=_f(max(1.0, step - 0.6)),
            h=_f(max(1.0, SPARK_H * n / scale)),
            c=BAR_COLOUR,
            n=n,
            ago=f"{len(series) - 1 - i} min ago" if i < len(series) - 1 else "this minute",
        )
        for i, n in enumerate(series)
        if n and scale
    ]
    return (
        Markup('<g class="sparkline" data-minutes="{m}" data-counts="{c}">').format(
            m=len(series), c=",".join(map(str, series))
        )
        + Markup('<line x1="{x}" x2="{x2}" y1="{y}" y2="{y}" stroke="#cbd5e1"/>').format(
            x=_f(x), x2=_f(x + width), y=_f(y + SPARK_H + 0.5)
        )
        + Markup("").join(bars)
        + Markup("</g>")
    )


def map_height(count: int) -> float:
    return 420.0 + 56.0 * max(0, count - 8)


def network_map(nodes: Sequence[MapNode], *, chart_id: str, title: str) -> Markup:
    """Every node around the shared database: its status (icon and words) and its activity over
    the last hour, as a bar relative to the busiest node and the number of jobs it ran."""
    height = map_height(len(nodes))
    cx, cy = WIDTH / 2, height / 2
    rx, ry = WIDTH / 2 - CARD_W / 2 - 8, height / 2 - CARD_H / 2 - 8
    busiest = max((n.jobs for n in nodes), default=0)
    busiest_minute = max((m for n in nodes for m in n.activity), default=0)
    total = sum(n.jobs for n in nodes)
    links: list[Markup] = []
    cards: list[Markup] = []
    card_tops: list[float] = []
    for i, n in enumerate(nodes):
        angle = -math.pi / 2 + 2 * math.pi * i / max(1, len(nodes))
        x, y = cx + rx * math.cos(angle), cy + ry * math.sin(angle)
        colour = TONE_COLOURS[n.status.tone]
        links.append(
            Markup(
                '<line class="link" x1="{x}" y1="{y}" x2="{cx}" y2="{cy}" stroke="{c}" '
                'stroke-width="2"{dash}/>'
            ).format(
                x=_f(x),
                y=_f(y),
                cx=_f(cx),
                cy=_f(cy),
                c=colour,
                dash=Markup("") if n.status.tone == "ok" else Markup(' stroke-dasharray="6 5"'),
            )
        )
        share = n.jobs / busiest if busiest else 0.0
        percent = round(100 * n.jobs / total) if total else 0
        left, top = x - CARD_W / 2, y - CARD_H / 2
        card_tops.append(top)
        bar_w = CARD_W - 24
        cards.append(
            Markup(
                '<g class="map-node" data-node="{name}" data-status="{status}" '
                'data-count="{jobs}"><title>{name}: {status}; {jobs} jobs in the last hour '
                "({pct}% of all)</title>"
                '<rect x="{l}" y="{t}" width="{w}" height="{h}" rx="8" fill="#fff" '
                'stroke="{c}" stroke-width="2"/>'
                '<text x="{tx}" y="{ny}" font-weight="600" fill="#111827">{short}</text>'
                '<g transform="translate({ix} {iy})"><circle cx="8" cy="8" r="8" fill="{c}"/>'
                '<path d="{icon}" fill="none" stroke="#fff" stroke-width="2" '
                'stroke-linecap="round" stroke-linejoin="round"/></g>'
                '<text x="{sx}" y="{sy}" fill="{c}" font-size="12">{status}</text>'
                "{spark}"
                '<rect class="activity-track" x="{tx}" y="{by}" width="{bw}" height="5" rx="2.5" '
                'fill="#e5e7eb"/>'
                '<rect class="activity" x="{tx}" y="{by}" width="{aw}" height="5" rx="2.5" '
                'fill="{bar}"/>'
                '<text x="{tx}" y="{jy}" fill="#374151" font-size="11">{jobs} jobs · {pct}%</text>'
                "</g>"
            ).format(
                name=n.name,
                short=fit(n.name, CARD_W - 24),
                status=n.status.text,
                jobs=n.jobs,
                pct=percent,
                l=_f(left),
                t=_f(top),
                w=_f(CARD_W),
                h=_f(CARD_H),
                c=colour,
                tx=_f(left + 12),
                ny=_f(top + 19),
                ix=_f(left + 12),
                iy=_f(top + 25),
                icon=ICON_PATHS[n.status.icon],
                sx=_f(left + 33),
                sy=_f(top + 38),
                spark=_sparkline(n.activity, left + 12, top + 46, bar_w, busiest_minute),
                by=_f(top + 73),
                bw=_f(bar_w),
                aw=_f(bar_w * share),
                bar=BAR_COLOUR,
                jy=_f(top + 91),
            )
        )
    hub = Markup(
        '<g class="database"><title>The shared PostgreSQL database</title>'
        '<ellipse cx="{cx}" cy="{top}" rx="34" ry="9" fill="#e8eef8" stroke="#6b7280"/>'
        '<path d="M{l} {top}v34a34 9 0 0 0 68 0v-34" fill="#e8eef8" stroke="#6b7280"/>'
        '<text x="{cx}" y="{ly}" text-anchor="middle" fill="#374151" font-size="11">'
        "database</text></g>"
    ).format(cx=_f(cx), top=_f(cy - 17), l=_f(cx - 34), ly=_f(cy + 34))
    body = [*links, hub, *cards]
    if not nodes:
        body.append(_empty(cy - 40, "No manager nodes."))
    desc = (
        " ".join(f"{n.name}: {n.status.text}, {n.jobs} jobs in the last hour." for n in nodes)
        or "No manager nodes."
    )
    # draw only the part that holds something (three nodes leave the bottom empty)
    top = min([cy - 60.0, *card_tops]) - 8
    bottom = max([cy + 60.0, *(t + CARD_H for t in card_tops)]) + 8
    return _svg(chart_id, title, desc, bottom - top, body, top)
