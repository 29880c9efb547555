"""The registry sits below the plugins and the flows: importing it must not pull them in."""

import subprocess
import sys

FORBIDDEN = ("prefect", "quantmill.plugins", "quantmill.flows", "torch", "transformers",
             "fastapi")
MODULES = ("lineage", "migrate", "chain", "verify", "queries", "export", "tokens", "remote")


def test_registry_imports_no_plugins_flows_or_prefect() -> None:
    code = (
        "import sys, importlib, quantmill.registry\n"
        f"for name in {MODULES!r}: importlib.import_module('quantmill.registry.' + name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}"
        f" or m.startswith({FORBIDDEN!r}))\n"
        "print(','.join(bad))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"quantmill.registry imported: {loaded}"
