"""The overview's chart: callbacks delivered and failed per minute over the last hour, drawn as
SVG on the server (no chart library, nothing fetched by the browser)."""

from __future__ import annotations

from html import escape

WIDTH = 600
HEIGHT = 160
PAD = 24
COLOURS = {"delivered": "#1a7f37", "failed": "#cf222e"}


def chart_svg(series: dict[str, list[int]]) -> str:
    peak = max([1, *(value for values in series.values() for value in values)])
    step = (WIDTH - 2 * PAD) / 59
    lines = []
    for name, values in series.items():
        points = " ".join(
            f"{PAD + i * step:.1f},{HEIGHT - PAD - value / peak * (HEIGHT - 2 * PAD):.1f}"
            for i, value in enumerate(values)
        )
        lines.append(
            f'<polyline fill="none" stroke="{COLOURS.get(name, "#555")}" stroke-width="2" '
            f'points="{points}"><title>{escape(name)}: {sum(values)} in the last hour</title>'
            "</polyline>"
        )
    totals = ", ".join(f"{sum(values)} {escape(name)}" for name, values in series.items())
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="chart-title" class="chart">'
        f'<title id="chart-title">Callbacks per minute, last hour: {totals}</title>'
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
        'stroke="#999"/>'
        f'<text x="{PAD}" y="{PAD - 8}" font-size="11">peak {peak}/min</text>'
        f'<text x="{PAD}" y="{HEIGHT - 6}" font-size="11">60 min ago</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 6}" font-size="11" text-anchor="end">now</text>'
        + "".join(lines)
        + "</svg>"
    )
