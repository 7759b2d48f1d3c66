"""A grouped bar chart (PNG) drawn with PIL: one group per bench column, one bar per model.

matplotlib is not a dependency of the project; the chart is simple enough to draw directly.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((214, 39, 40), (127, 127, 127), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189))


def bar_chart(path: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
              *, title: str, y_max: float = 100.0) -> None:
    """series: (label, one value per group; None = no bar). Values are percentages."""
    width, height = 960, 540
    left, right, top, bottom = 70, 20, 50, 120
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 15), title, fill="black", font=font)
    plot_w, plot_h = width - left - right, height - top - bottom
    base = top + plot_h
    for tick in range(0, int(y_max) + 1, 20):  # y grid
        y = base - plot_h * tick / y_max
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 30, y - 6), f"{tick:>3d}", fill="black", font=font)
    draw.line([(left, top), (left, base), (width - right, base)], fill="black")
    group_w = plot_w / max(len(groups), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    for g, name in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, (_, values) in enumerate(series):
            value = values[g]
            if value is None:
                continue
            x = x0 + s * bar_w
            y = base - plot_h * min(max(value, 0.0), y_max) / y_max
            draw.rectangle([x, y, x + bar_w - 2, base], fill=PALETTE[s % len(PALETTE)])
            draw.text((x, y - 12), f"{value:.1f}", fill="black", font=font)
        draw.text((x0 + group_w * 0.3, base + 6), name, fill="black", font=font)
    for s, (label, _) in enumerate(series):  # legend
        y = base + 30 + 16 * s
        draw.rectangle([left, y, left + 12, y + 10], fill=PALETTE[s % len(PALETTE)])
        draw.text((left + 18, y - 1), label, fill="black", font=font)
    img.save(path, format="PNG")
