"""The demo's HTML report: a summary table and line/bar charts as inline SVG (no plotting library).

>>> chart = line_chart("AUC", {"model": ([0, 1, 2], [0.5, 0.6, 0.7])}, x_label="events", y_label="AUC")
>>> chart.startswith("<svg") and "model" in chart
True
>>> html = render_report("demo", {"events": 100}, [chart])
>>> "<table" in html and html.count("<svg") == 1
True
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
WIDTH, HEIGHT, MARGIN = 640, 320, 56


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _frame(title: str, x_range: tuple[float, float], y_range: tuple[float, float], x_label: str,
           y_label: str, x_ticks: bool = True) -> tuple[list[str], callable, callable]:
    (x0, x1), (y0, y1) = x_range, y_range
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    sx = lambda x: MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)  # noqa: E731
    sy = lambda y: HEIGHT - MARGIN + (y0 - y) / (y1 - y0) * (HEIGHT - 2 * MARGIN)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#333"/>',
             f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#333"/>',
             f'<text x="{WIDTH / 2}" y="{HEIGHT - 14}" text-anchor="middle" font-size="12">{html.escape(x_label)}</text>',
             f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" font-size="12" '
             f'transform="rotate(-90 14 {HEIGHT / 2})">{html.escape(y_label)}</text>']
    for y in _ticks(y0, y1):
        parts.append(f'<line x1="{MARGIN - 4}" y1="{sy(y):.1f}" x2="{WIDTH - MARGIN}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                     f'<text x="{MARGIN - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10">{_fmt(y)}</text>')
    if x_ticks:
        for x in _ticks(x0, x1):
            parts.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - MARGIN + 14}" text-anchor="middle" font-size="10">{_fmt(x)}</text>')
    return parts, sx, sy


def line_chart(title: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               x_label: str = "", y_label: str = "", y_range: tuple[float, float] | None = None) -> str:
    """One SVG line chart; ``series`` maps a legend name to (xs, ys). Non-finite points are skipped."""
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
              for name, (xs, ys) in series.items()}
    xs = [x for pts in points.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in points.values() for _, y in pts] or [0.0, 1.0]
    if y_range is None:
        pad = (max(ys) - min(ys)) * 0.05 or 0.05
        y_range = (min(ys) - pad, max(ys) + pad)
    parts, sx, sy = _frame(title, (min(xs), max(xs)), y_range, x_label, y_label)
    for i, (name, pts) in enumerate(points.items()):
        colour = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in pts if len(pts) <= 1 else []:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<rect x="{WIDTH - MARGIN - 150}" y="{MARGIN + 16 * i - 9}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{WIDTH - MARGIN - 135}" y="{MARGIN + 16 * i}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(title: str, values: Mapping[str, float], *, y_label: str = "",
              errors: Mapping[str, float] | None = None) -> str:
    """One SVG bar chart of named values (with optional symmetric error bars)."""
    errors = errors or {}
    top = max([v + errors.get(k, 0.0) for k, v in values.items()] + [0.0])
    parts, _, sy = _frame(title, (0, 1), (0.0, top * 1.1 or 1.0), "", y_label, x_ticks=False)
    n = max(len(values), 1)
    slot = (WIDTH - 2 * MARGIN) / n
    for i, (name, value) in enumerate(values.items()):
        x = MARGIN + i * slot + slot * 0.15
        colour = PALETTE[i % len(PALETTE)]
        parts.append(f'<rect x="{x:.1f}" y="{sy(value):.1f}" width="{slot * 0.7:.1f}" '
                     f'height="{sy(0) - sy(value):.1f}" fill="{colour}"/>'
                     f'<text x="{x + slot * 0.35:.1f}" y="{HEIGHT - MARGIN + 14}" text-anchor="middle" font-size="11">'
                     f'{html.escape(name)}</text>'
                     f'<text x="{x + slot * 0.35:.1f}" y="{sy(value) - 4:.1f}" text-anchor="middle" font-size="10">{_fmt(value)}</text>')
        if name in errors:
            cx = x + slot * 0.35
            lo, hi = sy(value - errors[name]), sy(value + errors[name])
            parts.append(f'<line x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" y2="{hi:.1f}" stroke="#000"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_report(title: str, summary: Mapping[str, object], charts: Sequence[str], notes: Sequence[str] = ()) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in summary.items())
    body = "\n".join(f'<figure>{chart}</figure>' for chart in charts)
    paragraphs = "\n".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{padding:4px 12px;border-bottom:1px solid #ddd;text-align:left}}
figure{{display:inline-block;margin:8px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table class="summary">{rows}</table>
{paragraphs}
{body}
</body></html>
"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(path: Path, title: str, summary: Mapping[str, object], charts: Sequence[str],
                 notes: Sequence[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(title, summary, charts, notes), encoding="utf-8")
    return path
