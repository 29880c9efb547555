"""The Pareto front of (size, perplexity) points and the markdown table of a trade-off report.

Both coordinates are minimised: a point *dominates* another when it is no larger and no worse,
and strictly better in at least one of the two. The front is every point that nothing dominates,
so the question "what is the smallest model that still meets our perplexity bar" is answered by
walking the front. Identical points do not dominate each other: both stay on the front (a tie is
not a reason to hide a method). Points with a missing or non-finite coordinate (a failed run, a
perplexity that overflowed) take no part: they can neither be on the front nor push others off.

A report row is a plain dict; the keys used here are ``label``, ``method``, ``bits``, ``budget``,
``status`` (``succeeded``, ``reused``, ``failed``), ``perplexity``, ``size_mb``,
``bits_per_weight``, ``wall_s``, ``quantize_s``, ``error``, ``measured_base`` (the run also
measured the base model: its wall time is marked ``*``), ``reference`` (the base model's row) and
``pareto`` (set by ``mark_front``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Point = tuple[float, float]


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` is at least as small and as good as ``b``, and strictly better in one."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def _usable(point: tuple[Any, Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in point)


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the non-dominated points, ordered by size (then perplexity, then index).

    Quadratic on purpose: a batch has tens of points, and the pairwise definition is the one a
    reader can check by eye.
    """
    usable = [i for i, p in enumerate(points) if _usable(p)]
    front = [i for i in usable
             if not any(dominates(points[j], points[i]) for j in usable if j != i)]  # type: ignore[arg-type]
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


def is_candidate(row: dict[str, Any]) -> bool:
    """Rows that may be on the front: measured quantized points (not the reference, not failed)."""
    return (not row.get("reference") and row.get("status") != "failed"
            and _usable((row.get("size_mb"), row.get("perplexity"))))


def mark_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with ``pareto`` set: True on the front of the candidate rows."""
    candidates = [i for i, row in enumerate(rows) if is_candidate(row)]
    points = [(rows[i]["size_mb"], rows[i]["perplexity"]) for i in candidates]
    on_front = {candidates[k] for k in pareto_front(points)}
    return [{**row, "pareto": i in on_front} for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for missing, fixed decimals for floats, ``inf``/``nan`` spelled out."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` holds ``l`` or ``r`` per column (default left)."""
    align = list(align or ["l"] * len(headers))
    if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
        raise ValueError("every row and the alignment must have one entry per header")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


TRADEOFF_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, row key, alignment)
    ("point", "label", "l"),
    ("method", "method", "l"),
    ("bits", "bits", "r"),
    ("perplexity", "perplexity", "r"),
    ("size MB", "size_mb", "r"),
    ("bits/weight", "bits_per_weight", "r"),
    ("wall s", "wall_s", "r"),
    ("quantize s", "quantize_s", "r"),
    ("Pareto", "pareto", "l"),
    ("status", "status", "l"),
)


def tradeoff_cells(row: dict[str, Any]) -> list[str]:
    """One report row as the strings of ``TRADEOFF_COLUMNS`` (shared by markdown and the CLI)."""
    bits = row.get("bits")
    if row.get("budget") is not None:
        bits = f"avg {fmt(float(row['budget']), 1)}"
    status = row.get("status") or "-"
    if status == "failed" and row.get("error"):
        status = f"failed: {row['error']}"
    cells = {
        "label": str(row.get("label", "")),
        "method": str(row.get("method") or "-"),
        "bits": fmt(bits),
        "perplexity": fmt(row.get("perplexity")),
        "size_mb": fmt(row.get("size_mb"), 1),
        "bits_per_weight": fmt(row.get("bits_per_weight")),
        "wall_s": fmt(row.get("wall_s"), 1) + (" *" if row.get("measured_base") else "")
        + (" †" if row.get("reused_sensitivity") else ""),
        "quantize_s": fmt(row.get("quantize_s"), 1),
        "pareto": "yes" if row.get("pareto") else "",
        "status": status,
    }
    return [cells[key] for _, key, _ in TRADEOFF_COLUMNS]


def tradeoff_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The report table: one line per row, in the given order (put the reference first)."""
    return markdown_table([h for h, _, _ in TRADEOFF_COLUMNS],
                          [tradeoff_cells(row) for row in rows],
                          [a for _, _, a in TRADEOFF_COLUMNS])
