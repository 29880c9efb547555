"""The Pareto front of (size, perplexity), the report's markdown table and its PNG plot."""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import pytest

from quantmill.plugins.reporting.pareto import (
    TRADEOFF_COLUMNS,
    dominates,
    mark_front,
    markdown_table,
    pareto_front,
    tradeoff_markdown,
)
from quantmill.plugins.reporting.plot import plot_tradeoff


def test_front_on_hand_made_points() -> None:
    points = [
        (100.0, 30.0),   # 0 front
        (120.0, 30.0),   # 1 same perplexity, larger: dominated by 0
        (90.0, 40.0),    # 2 front (smallest so far)
        (100.0, 35.0),   # 3 same size as 0, worse: dominated by 0
        (150.0, 25.0),   # 4 front (best perplexity)
        (150.0, 25.0),   # 5 identical to 4: a tie, both stay
        (200.0, 26.0),   # 6 dominated by 4
        (95.0, 29.0),    # 7 front: dominates 0 and 3? smaller and better than 0
        (None, 10.0),    # 8 failed run: no size
        (80.0, math.inf),  # 9 overflowed perplexity: not usable
        (85.0, math.nan),  # 10
    ]
    front = pareto_front(points)
    assert front == [2, 7, 4, 5]  # ordered by size; 0 fell to 7, ties kept in index order
    assert dominates((95.0, 29.0), (100.0, 30.0))
    assert not dominates((150.0, 25.0), (150.0, 25.0))  # identical points do not dominate
    assert not dominates((90.0, 40.0), (100.0, 30.0))  # a trade-off, not a domination
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


@pytest.mark.parametrize("seed", range(40))
def test_front_properties_on_random_points(seed: int) -> None:
    rng = random.Random(seed)
    # a coarse grid forces many ties in size, in perplexity, and identical points
    points = [(float(rng.randint(1, 12)), float(rng.randint(1, 12)))
              for _ in range(rng.randint(1, 40))]
    front = pareto_front(points)
    rest = [i for i in range(len(points)) if i not in front]
    assert front, "a non-empty set always has a non-dominated point"
    for i in front:  # no front point is dominated by any point
        assert not any(dominates(p, points[i]) for p in points)
    for i in rest:  # every other point is dominated by a point on the front
        assert any(dominates(points[j], points[i]) for j in front)
    sizes = [points[i] for i in front]
    assert sizes == sorted(sizes)  # by size, and perplexity never rises along the front
    assert all(b[1] <= a[1] for a, b in zip(sizes, sizes[1:], strict=False))


def _rows() -> list[dict]:
    return [
        {"label": "base model", "reference": True, "status": "reference",
         "size_mb": 270.0, "perplexity": 25.0, "bits": 16},
        {"label": "rtn-w4", "method": "rtn", "bits": 4, "status": "succeeded",
         "size_mb": 116.0, "perplexity": 32.0, "bits_per_weight": 4.21, "wall_s": 12.5,
         "quantize_s": 2.0, "measured_base": True},
        {"label": "gptq-w4", "method": "gptq", "bits": 4, "status": "reused",
         "size_mb": 116.0, "perplexity": 27.4, "bits_per_weight": 4.21},
        {"label": "gptq-w3", "method": "gptq", "bits": 3, "status": "succeeded",
         "size_mb": 103.0, "perplexity": 34.1},
        {"label": "rtn-w2", "method": "rtn", "bits": 2, "status": "succeeded",
         "size_mb": 90.0, "perplexity": 5000.0},
        {"label": "gptq-mixed-3.5", "method": "gptq", "budget": 3.5, "status": "succeeded",
         "size_mb": 110.0, "perplexity": 29.9, "quantize_s": 95.0, "wall_s": 40.0,
         "reused_sensitivity": True},
        {"label": "rtn-mixed-1", "method": "rtn", "budget": 1.0, "status": "failed",
         "error": "ConfigError: budget | too small"},
        {"label": "clustering-w2", "method": "clustering", "bits": 2, "status": "succeeded",
         "size_mb": 88.0, "perplexity": math.inf},
    ]


def test_mark_front_leaves_out_reference_failed_and_unmeasured_rows() -> None:
    marked = {r["label"]: r["pareto"] for r in mark_front(_rows())}
    assert marked == {"base model": False, "rtn-w4": False, "gptq-w4": True,
                      "gptq-w3": True, "rtn-w2": True, "gptq-mixed-3.5": True,
                      "rtn-mixed-1": False, "clustering-w2": False}


def test_markdown_table() -> None:
    text = tradeoff_markdown(mark_front(_rows()))
    lines = text.splitlines()
    assert len(lines) == 2 + len(_rows())
    assert lines[0] == "| " + " | ".join(h for h, _, _ in TRADEOFF_COLUMNS) + " |"
    assert all(line.count(" | ") == len(TRADEOFF_COLUMNS) - 1 for line in lines[2:])
    gptq4 = next(line for line in lines if line.startswith("| gptq-w4 "))
    assert "| 27.40 |" in gptq4 and "| 116.0 |" in gptq4 and "| yes |" in gptq4
    mixed = next(line for line in lines if "gptq-mixed-3.5" in line)
    assert "| avg 3.5 |" in mixed and "| 95.0 |" in mixed and "| 40.0 † |" in mixed
    assert "†" not in "".join(line for line in lines if "gptq-mixed" not in line)
    assert "12.5 *" in next(line for line in lines if line.startswith("| rtn-w4 "))
    failed = next(line for line in lines if "rtn-mixed-1" in line)
    assert "failed: ConfigError: budget \\| too small" in failed  # the pipe is escaped
    assert "| inf |" in next(line for line in lines if "clustering-w2" in line)
    with pytest.raises(ValueError, match="one entry per header"):
        markdown_table(["a", "b"], [["1"]])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_plot_draws_every_measured_point_and_the_front(tmp_path: Path) -> None:
    rows = _rows()
    path = tmp_path / "sub" / "tradeoff.png"
    plotted = plot_tradeoff(rows, path, "test batch")
    width, height = _png_size(path)
    assert width > 300 and height > 200 and path.stat().st_size > 1000

    measured = {r["label"]: (r["size_mb"], r["perplexity"]) for r in mark_front(rows)
                if not r.get("reference") and r["status"] != "failed"
                and math.isfinite(r["perplexity"])}
    assert len(plotted.points) == len(measured) == 5
    assert {label: (x, y) for label, x, y in plotted.points} == measured
    front = sorted((r["size_mb"], r["perplexity"]) for r in mark_front(rows) if r["pareto"])
    assert plotted.front == front
    assert plotted.reference == (270.0, 25.0)
    assert plotted.left_out == ["rtn-mixed-1", "clustering-w2"]
    assert plotted.log_y  # 25 .. 5000 spans far more than the linear threshold
    # rtn-w2 (5000) squeezes the rest: a linear panel shows those within 1.6x of the best (25)
    assert sorted(plotted.zoomed) == sorted(label for label, (_, ppl) in measured.items()
                                            if ppl <= 25.0 * 1.6) == [
        "gptq-mixed-3.5", "gptq-w3", "gptq-w4", "rtn-w4"]
    # without the outlier every point is in view: one panel, narrower
    single = plot_tradeoff([r for r in rows if r["label"] != "rtn-w2"], tmp_path / "close.png",
                           "close")
    assert single.zoomed == [] and width > 1.4 * _png_size(tmp_path / "close.png")[0]


def test_plot_of_close_points_is_linear_and_handles_no_reference(tmp_path: Path) -> None:
    rows = [{"label": f"p{i}", "method": "rtn", "status": "succeeded", "size_mb": 10.0 + i,
             "perplexity": 20.0 - i} for i in range(3)]
    plotted = plot_tradeoff(rows, tmp_path / "p.png", "linear")
    _png_size(tmp_path / "p.png")
    assert not plotted.log_y and plotted.reference is None and plotted.zoomed == []
    assert len(plotted.points) == 3 and len(plotted.front) == 3  # each is a trade-off
