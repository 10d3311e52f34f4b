"""Small inline SVG charts for report.html: no plotting library, no external files, crisp at any zoom.

A chart is returned as `Markup`, so the page template puts it in unescaped: that is safe because every
text drawn here (labels, tooltips, the title) is escaped on the way in, and labels can be user data
(tags come from captions).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

__all__ = ["column_chart", "row_chart"]

_BAR = "#4c78a8"
_FLAG = "#e45756"
_TEXT = "#444"


def column_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    flagged: Sequence[bool] | None = None,
    title: str = "",
    width: int = 560,
    height: int = 180,
) -> Markup:
    """Vertical bars, one per label, flagged bars in red; the count sits above each bar and every bar has
    a tooltip. Labels are thinned out when they would overlap."""
    n = len(values)
    if n == 0:
        return Markup('<p class="muted">nothing to plot</p>')
    flagged = flagged or [False] * n
    top, bottom, left = 18, 34, 8
    plot_h = height - top - bottom
    slot = (width - 2 * left) / n
    peak = max(values) or 1
    every = max(1, round(n * 38 / width))  # about 38 px per shown label
    parts = [_svg_open(width, height, title)]
    for i, (label, value, bad) in enumerate(zip(labels, values, flagged, strict=True)):
        h = plot_h * value / peak
        x = left + i * slot
        y = top + plot_h - h
        tip = f"{label}: {value:g}"
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" height="{h:.1f}" '
            f'fill="{_FLAG if bad else _BAR}"><title>{escape(tip)}</title></rect>'
        )
        if value and slot >= 14:
            parts.append(_text(x + slot / 2, y - 4, f"{value:g}", size=10))
        if i % every == 0:
            parts.append(_text(x + slot / 2, height - bottom + 14, label, size=10))
    parts.append(
        f'<line x1="{left}" x2="{width - left}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#999"/>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


def row_chart(
    labels: Sequence[str], values: Sequence[float], *, title: str = "", width: int = 560, row: int = 18
) -> Markup:
    """Horizontal bars with the label on the left: for long names such as tags."""
    n = len(values)
    if n == 0:
        return Markup('<p class="muted">nothing to plot</p>')
    label_w = min(220, 12 + 7 * max(len(label) for label in labels))
    bar_w = width - label_w - 50
    peak = max(values) or 1
    height = n * row + 8
    parts = [_svg_open(width, height, title)]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 4 + i * row
        w = bar_w * value / peak
        short = label if len(label) <= 30 else label[:29] + "…"
        parts.append(_text(label_w - 6, y + row * 0.7, short, size=11, anchor="end"))
        parts.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{max(w, 1):.1f}" height="{row - 4}" fill="{_BAR}">'
            f"<title>{escape(label)}: {value:g}</title></rect>"
        )
        parts.append(_text(label_w + w + 4, y + row * 0.7, f"{value:g}", size=10, anchor="start"))
    parts.append("</svg>")
    return Markup("".join(parts))


def _svg_open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">'
    )


def _text(x: float, y: float, text: str, *, size: int, anchor: str = "middle") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{_TEXT}">'
        f"{escape(text)}</text>"
    )
