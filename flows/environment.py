"""What software this process runs: recorded with every run, compared between machines.

A run's numbers depend on the library versions that computed them (a transformers update once
moved the benchmark's reference perplexity), so every run records the versions that matter most,
the hash of the project's lock file (``requirements.lock``, which ``make setup`` installs from)
and an *environment hash*: the sha256 of every installed distribution's name and version plus the
quantmill source commit. A deployment pins the deployer's record; a worker compares its own with
it before running the job (``check_skew``), and warns or refuses by ``QUANTMILL_ENVIRONMENT_SKEW``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path
from typing import Any, Literal

from quantmill.plugins.errors import ConfigError

SOURCE_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = SOURCE_ROOT / "requirements.lock"
SKEW_POLICY_ENV = "QUANTMILL_ENVIRONMENT_SKEW"
#: the distributions whose versions a run lists by name (the rest are in the environment hash)
KEY_DISTRIBUTIONS = ("quantmill", "torch", "transformers", "safetensors", "prefect")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
log = logging.getLogger(__name__)

SkewPolicy = Literal["warn", "refuse"]


class EnvironmentSkew(ConfigError):
    """This machine's software differs from the software a deployment was made with."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version_text: str) -> str:
    """The version without its local label (``2.13.0+cpu`` -> ``2.13.0``), as a pin matches it."""
    return version_text.split("+", 1)[0]


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a pip constraints file."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


def _source_commit() -> str | None:
    """The git commit of quantmill's source tree, when it runs from a checkout."""
    if not (SOURCE_ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


@dataclass(frozen=True)
class Environment:
    """The installed distributions, the lock file's hash and the source commit of one process."""

    packages: dict[str, str]
    lock_sha256: str | None
    source_commit: str | None

    @property
    def sha256(self) -> str:
        document = {"packages": self.packages, "source_commit": self.source_commit}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What a deployment pins and a run records: hashes and the key versions."""
        return {
            "environment_sha256": self.sha256,
            "lock_sha256": self.lock_sha256,
            "source_commit": self.source_commit,
            "versions": {name: self.packages.get(name, "not installed")
                         for name in KEY_DISTRIBUTIONS},
            "python": platform.python_version(),
        }

    def lock_deviations(self, pins: dict[str, str]) -> list[str]:
        """Installed distributions whose version is not the lock's (local labels ignored)."""
        found = []
        for name, pinned in sorted(pins.items()):
            installed = self.packages.get(name)
            if installed is None:
                found.append(f"{name} not installed (lock {pinned})")
            elif _public(installed) != _public(pinned):
                found.append(f"{name} {installed} (lock {pinned})")
        return found


@lru_cache(maxsize=1)
def current_environment() -> Environment:
    packages = {_canonical(d.metadata["Name"]): d.version for d in distributions()
                if d.metadata["Name"]}
    lock = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest() if LOCK_FILE.is_file() else None
    return Environment(dict(sorted(packages.items())), lock, _source_commit())


def software_versions() -> dict[str, str]:
    """The versions that decide what a run computed, recorded with every run."""
    env = current_environment()
    versions = {name: _version(name) for name in KEY_DISTRIBUTIONS}
    return {**versions, "python": platform.python_version(),
            "environment_sha256": env.sha256, "lock_sha256": env.lock_sha256 or "no lock file"}


def skew(expected: dict[str, Any], actual: Environment) -> list[str]:
    """How ``actual`` differs from a pinned ``record()``; empty when the environments match."""
    if expected.get("environment_sha256") == actual.sha256:
        return []
    here = actual.record()
    differences = [f"{name} {want} here {here['versions'].get(name)}"
                   for name, want in sorted(expected.get("versions", {}).items())
                   if here["versions"].get(name) != want]
    for key, label in (("lock_sha256", "lock file"), ("source_commit", "quantmill source")):
        if expected.get(key) != here[key]:
            differences.append(f"{label} {str(expected.get(key))[:12]} here {str(here[key])[:12]}")
    if expected.get("python") != here["python"]:
        differences.append(f"python {expected.get('python')} here {here['python']}")
    return differences or ["other installed packages differ (environment hash "
                           f"{str(expected.get('environment_sha256'))[:12]} here "
                           f"{actual.sha256[:12]})"]


def skew_policy() -> SkewPolicy:
    value = os.environ.get(SKEW_POLICY_ENV, "warn").strip().lower()
    if value not in ("warn", "refuse"):
        raise ConfigError(f"{SKEW_POLICY_ENV} must be 'warn' or 'refuse', not {value!r}")
    return value  # type: ignore[return-value]


def check_skew(expected: dict[str, Any] | None, what: str) -> list[str]:
    """Compare this process with the environment ``what`` (a deployment) was made in.

    Returns the differences (also logged as a warning); raises ``EnvironmentSkew`` instead when
    the policy is ``refuse``.
    """
    if not expected:
        return []
    differences = skew(expected, current_environment())
    if not differences:
        return []
    message = (f"this machine's software differs from the environment {what} was made with: "
               + "; ".join(differences))
    if skew_policy() == "refuse":
        raise EnvironmentSkew(message + f" ({SKEW_POLICY_ENV}=refuse)")
    log.warning("%s; results may not be reproducible (set %s=refuse to stop such runs)",
                message, SKEW_POLICY_ENV)
    return differences
