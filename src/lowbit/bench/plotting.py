"""What the bench plots share: labels placed where they overlap nothing already drawn, rows
beyond a clipped y range marked at the top edge with their values, and compact numbers.

Placement works in display pixels once the axes' limits are final: each label tries a few
offsets around its point and takes the first whose box overlaps no other label and no marker
(greedy, in the order given; no dependency beyond matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

OFFSETS = ((5, 4), (5, -11), (-6, 4), (-6, -11), (5, 13), (5, -20), (-6, 13), (-6, -20))  # points, right/left


def compact(v: float) -> str:
    """A value in at most four characters or so: 481, 1.1k, 198k, 2.3M."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            x = v / div
            return f"{x:.1f}{unit}" if x < 10 else f"{x:.0f}{unit}"
    return f"{v:.3g}"


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], colors: Sequence[str] | None = None,
                 fontsize: float = 7.0, marker_px: float = 4.0) -> list[tuple[float, float]]:
    """Annotate each data point with its text at the first offset (points) whose box hits no
    marker and no label placed before it; the offsets chosen. Set the axes' limits first."""
    fig = ax.figure
    px = fig.dpi / 72  # pixels per point
    at = [tuple(ax.transData.transform(p)) for p in points]
    taken = [(x - marker_px, y - marker_px, x + marker_px, y + marker_px) for x, y in at]
    chosen = []
    for i, ((x, y), text) in enumerate(zip(at, texts)):
        w, h = 0.6 * fontsize * px * len(text), fontsize * px
        best = OFFSETS[0]
        for dx, dy in OFFSETS:
            x0 = x + dx * px - (w if dx < 0 else 0)
            box = (x0, y + dy * px, x0 + w, y + dy * px + h)
            if not any(_overlaps(box, t) for j, t in enumerate(taken) if j != i):
                best = (dx, dy)
                break
        dx, dy = best
        x0 = x + dx * px - (w if dx < 0 else 0)
        taken.append((x0, y + dy * px, x0 + w, y + dy * px + h))
        ax.annotate(text, points[i], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="right" if dx < 0 else "left", va="bottom",
                    color=colors[i] if colors else "black")
        chosen.append(best)
    return chosen


def mark_above(ax, xs: Sequence[float], values: Sequence[float], colors: Sequence[str], top: float,
               names: Sequence[str] | None = None, fontsize: float = 6.5, stacks: bool = True) -> list[list[int]]:
    """Rows whose value is above the y range `top`: an arrow at the top edge at each row's x, and
    (with `stacks`) below the arrows a stack of "<value> <name> @<x>" per cluster of nearby rows
    (value compact, in the row's colour; rows by x, then value). The clusters, as lists of row
    indices; without `stacks` the caller lists the rows elsewhere (see list_above)."""
    px = ax.figure.dpi / 72
    texts = [f"{compact(v)}" + (f" {names[i]}" if names else "") + f" @{xs[i]:.2f}" for i, v in enumerate(values)]
    width = 0.6 * fontsize * px * max(map(len, texts))
    order = sorted(range(len(xs)), key=lambda i: (xs[i], values[i]))
    clusters: list[list[int]] = []
    for i in order:
        x = ax.transData.transform((xs[i], top))[0]
        if clusters and x - ax.transData.transform((xs[clusters[-1][0]], top))[0] < width + 4 * px:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for i in order:
        ax.annotate("", (xs[i], top), xytext=(0, -14), textcoords="offset points",
                    arrowprops={"arrowstyle": "-|>", "color": colors[i], "lw": 1.0}, annotation_clip=False)
    for stack in clusters if stacks else ():
        for k, i in enumerate(stack):
            ax.annotate(texts[i], (xs[stack[0]], top), xytext=(-2, -18 - (k + 0.5) * (fontsize + 1.5)),
                        textcoords="offset points", fontsize=fontsize, color=colors[i], ha="left", va="center",
                        annotation_clip=False)
    return clusters


def list_above(ax, lines: Sequence[str], colors: Sequence[str], title: str, fontsize: float = 6.5) -> None:
    """`lines` (one per row above the y range) listed to the right of the axes from its bottom up,
    each in its colour, under `title`."""
    step = fontsize + 2
    for k, (text, c) in enumerate([(title, "black"), *zip(lines, colors)]):
        ax.annotate(text, (1.02, 0), xycoords="axes fraction", xytext=(0, (len(lines) - k) * step),
                    textcoords="offset points", fontsize=fontsize, color=c, va="bottom", ha="left",
                    weight="bold" if k == 0 else "normal", annotation_clip=False)
