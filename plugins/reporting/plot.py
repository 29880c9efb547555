"""Perplexity against size as a PNG, every point labelled, the Pareto front drawn as a line.

When a few points are far off (2-bit RTN reaches millions), the full view squeezes the useful
ones into a corner where their labels overlap; a second, linear panel then shows the points
within ``ZOOM_FACTOR`` of the best perplexity, so the front where decisions are made can be read.

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend):
the report is drawn inside flows and worker threads with no display, and setting a process-wide
backend would change the behaviour of a user's notebook. The function returns what it actually
drew, read back from the artists, so a test can check the plot's content without its pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quantmill.plugins.reporting.pareto import is_candidate, mark_front

#: colours and markers per method; other methods get the next free colour
STYLES: dict[str, tuple[str, str]] = {
    "rtn": ("tab:orange", "o"),
    "gptq": ("tab:blue", "s"),
    "clustering": ("tab:green", "^"),
    "mixed_precision": ("tab:purple", "D"),
}
_SPARE = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
#: perplexities spanning more than this factor are drawn on a log axis
LOG_SPREAD = 8.0
#: the zoom panel shows the points with perplexity at most this factor times the lowest one
#: (the reference included); drawn when some point lies above that and two or more below
ZOOM_FACTOR = 1.6


@dataclass(frozen=True)
class PlottedData:
    """What the figure shows, read back from its artists."""

    points: list[tuple[str, float, float]]  # (label, size MB, perplexity) of every point drawn
    front: list[tuple[float, float]]        # the front line's vertices, by size
    reference: tuple[float, float] | None   # the reference marker (size MB, perplexity)
    log_y: bool
    left_out: list[str]                     # rows not drawn (failed, or no finite measure)
    zoomed: list[str]                       # labels in the zoom panel (empty: no panel)


def _group(row: dict[str, Any]) -> str:
    """The legend group: mixed-precision rows by their allocator, others by their method."""
    return "mixed_precision" if row.get("budget") is not None else str(row.get("method"))


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, title: str) -> PlottedData:
    """Draw ``rows`` (report rows, see ``pareto``) into the PNG at ``path``.

    A row with ``reference`` set is drawn as a star with a dotted line at its perplexity, outside
    the front; failed rows and rows without a finite size and perplexity are left out and named
    under the title.
    """
    rows = mark_front(rows)
    drawn = [r for r in rows if is_candidate(r)]
    reference = next((r for r in rows if r.get("reference")
                      and _finite(r.get("size_mb"), r.get("perplexity"))), None)
    left_out = [str(r["label"]) for r in rows if not r.get("reference") and not is_candidate(r)]

    ys = [r["perplexity"] for r in drawn] + ([reference["perplexity"]] if reference else [])
    cap = min(ys) * ZOOM_FACTOR if ys else math.inf
    zoomed = [r for r in drawn if r["perplexity"] <= cap]
    zoom = len(zoomed) >= 2 and len(zoomed) < len(drawn)
    fig = Figure(figsize=(16, 6.5) if zoom else (10, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1) if zoom else fig.add_subplot()
    log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > LOG_SPREAD
    if log_y:
        ax.set_yscale("log")
    _draw(ax, drawn, reference, star=True)
    ax.set_xlabel("size (MB): checkpoint on disk" + ("; reference at 16 bits per parameter"
                                                     if reference is not None else ""))
    ax.set_ylabel("perplexity" + (" (log scale)" if log_y else ""))
    subtitle = f"\nnot drawn: {', '.join(left_out)}" if left_out else ""
    ax.set_title(title + subtitle, fontsize=10)
    if drawn or reference is not None:
        ax.legend(fontsize=8, loc="upper right")
    if zoom:
        detail = fig.add_subplot(1, 2, 2)
        _draw(detail, zoomed, reference, star=False)
        sizes = [r["size_mb"] for r in zoomed]
        margin = max((max(sizes) - min(sizes)) * 0.08, 0.5)
        detail.set_xlim(min(sizes) - margin, max(sizes) + margin * 2)
        detail.set_xlabel("size (MB): checkpoint on disk")
        detail.set_ylabel("perplexity")
        detail.set_title(f"zoom: perplexity at most {ZOOM_FACTOR:g}x the lowest "
                         f"({cap:.2f}); linear", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return _read_back(ax, log_y, left_out,
                      [str(r["label"]) for r in zoomed] if zoom else [])


def _draw(ax: Any, drawn: list[dict[str, Any]], reference: dict[str, Any] | None,
          star: bool) -> None:
    """Points by group, their labels, the front through them, the reference (its star only
    when ``star``: in the zoom panel it would stretch the size axis; its line stays)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in drawn:
        groups.setdefault(_group(row), []).append(row)
    spare = iter(_SPARE)
    for group, members in groups.items():
        colour, marker = STYLES.get(group) or (next(spare, "black"), "o")
        ax.scatter([r["size_mb"] for r in members], [r["perplexity"] for r in members],
                   color=colour, marker=marker, s=46, zorder=3, label=group, gid="points")
        for r in members:
            ax.annotate(str(r["label"]), (r["size_mb"], r["perplexity"]), xytext=(5, 4),
                        textcoords="offset points", fontsize=7.5, gid="point-label")
    front = sorted((r for r in drawn if r["pareto"]), key=lambda r: (r["size_mb"],
                                                                     r["perplexity"]))
    if front:
        ax.plot([r["size_mb"] for r in front], [r["perplexity"] for r in front], color="black",
                linewidth=1.2, linestyle="--", marker="o", markersize=11, fillstyle="none",
                zorder=2, label="Pareto front", gid="front")
    if reference is not None:
        if star:
            ax.scatter([reference["size_mb"]], [reference["perplexity"]], marker="*", s=160,
                       color="crimson", zorder=4, label=str(reference["label"]),
                       gid="reference")
        ax.axhline(reference["perplexity"], color="crimson", linewidth=0.8, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _read_back(ax: Any, log_y: bool, left_out: list[str], zoomed: list[str]) -> PlottedData:
    """The plotted data as matplotlib holds it (scatter offsets, annotations, line vertices)."""
    labels = {(round(t.xy[0], 9), round(t.xy[1], 9)): [] for t in ax.texts}
    for t in ax.texts:
        if t.get_gid() == "point-label":
            labels[(round(t.xy[0], 9), round(t.xy[1], 9))].append(t.get_text())
    points: list[tuple[str, float, float]] = []
    reference = None
    for collection in ax.collections:
        offsets = [(float(x), float(y)) for x, y in collection.get_offsets()]
        if collection.get_gid() == "reference":
            reference = offsets[0]
        elif collection.get_gid() == "points":
            for x, y in offsets:
                names = labels.get((round(x, 9), round(y, 9))) or ["?"]
                points.append((names.pop(0), x, y))
    front: list[tuple[float, float]] = []
    for line in ax.lines:
        if line.get_gid() == "front":
            front = [(float(x), float(y)) for x, y in zip(*line.get_data(), strict=True)]
    return PlottedData(points, front, reference, log_y, left_out, zoomed)
