"""What every benchmark result records about the machine: the CPU, its vector and hash
extensions (float results and hashing speed depend on them), and Python."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_int8", "sha_ni")


def cpu_facts() -> dict[str, Any]:
    model, flags = platform.processor(), ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line
    return {"cpu": model, "cpus": os.cpu_count(),
            "isa": [f for f in ISA_FLAGS if f" {f}" in flags],
            "python": platform.python_version()}


def write_results(out: Path, report: dict[str, Any], text: str) -> None:
    """``out``.json and ``out``.md side by side, and the markdown on stdout."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
