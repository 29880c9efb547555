"""Which files a job may read: only regular files, and on a shared worker only under its roots.

A worker runs other people's recipes with its own file system and credentials. Without a bound a
recipe naming ``/etc/passwd`` as calibration data would have the worker tokenize it and store it
as a calibration-set artifact in shared storage. So a worker (and ``submit``/``deploy``, which
refuse such a recipe before it is queued) reads inputs only under configured roots: local
directories and ``s3://bucket/prefix`` locations, given as ``QUANTMILL_INPUT_ROOTS`` (comma-
separated) or ``quantmill worker --input-root``. Paths are compared after resolving symlinks, so a
link inside a root that points outside it is refused too.

Independently of roots, an input must be a regular file or a directory: ``/proc``, ``/sys`` and
``/dev`` files, sockets and FIFOs are refused (``/proc/self/environ`` reads as a 0-byte regular
file and would ingest the process's secrets).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from quantmill.plugins.errors import ConfigError
from quantmill.plugins.home import quantmill_home

ROOTS_ENV = "QUANTMILL_INPUT_ROOTS"
SOURCE_DATA = Path(__file__).resolve().parents[1] / "data"
_PSEUDO_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def default_roots() -> list[str]:
    """Roots of a worker nobody configured: the models and data under ``$QUANTMILL_HOME`` and the
    sample data shipped with quantmill's source (the demo recipe's)."""
    home = quantmill_home()
    return [str(home / "models"), str(home / "data"), str(SOURCE_DATA)]


@dataclass(frozen=True)
class InputRoots:
    local: tuple[Path, ...]
    s3: tuple[str, ...]

    @classmethod
    def parse(cls, values: Iterable[str]) -> InputRoots:
        local: list[Path] = []
        s3: list[str] = []
        for raw in values:
            value = raw.strip()
            if not value:
                continue
            if value[:5].lower() == "s3://":
                bucket = value[5:].split("/", 1)[0]
                if not bucket:
                    raise ConfigError(f"input root {value!r} names no bucket")
                s3.append("s3://" + value[5:].rstrip("/") + "/")
            elif "://" in value:
                raise ConfigError(f"input root {value!r} is neither a directory nor s3://")
            else:
                path = Path(os.path.expanduser(value))
                if not path.is_absolute():
                    raise ConfigError(f"input root {value!r} is not an absolute path")
                local.append(path.resolve())
        return cls(tuple(local), tuple(s3))

    @classmethod
    def from_environment(cls) -> InputRoots | None:
        """The roots ``QUANTMILL_INPUT_ROOTS`` sets, or None when it is unset (no bound)."""
        value = os.environ.get(ROOTS_ENV)
        return None if value is None else cls.parse(value.split(","))

    @classmethod
    def for_service(cls) -> InputRoots:
        """The roots a worker enforces: the environment's, else the defaults."""
        return cls.from_environment() or cls.parse(default_roots())

    def to_env(self) -> str:
        return ",".join([*map(str, self.local), *self.s3])

    def describe(self) -> str:
        return ", ".join([*map(str, self.local), *self.s3]) or "(none)"

    def allows_uri(self, uri: str) -> bool:
        normalized = "s3://" + uri[5:]
        return any(normalized.startswith(prefix) or normalized + "/" == prefix
                   for prefix in self.s3)

    def allows_path(self, path: Path) -> bool:
        real = path.resolve()
        return any(real == root or real.is_relative_to(root) for root in self.local)

    def check_uri(self, uri: str, where: str) -> None:
        if not self.allows_uri(uri):
            raise ConfigError(f"'{where}': {uri} is outside the input roots of this worker "
                              f"({self.describe()}; set {ROOTS_ENV})")

    def check_path(self, path: Path, where: str) -> None:
        if not self.allows_path(path):
            raise ConfigError(f"'{where}': {path} is outside the input roots of this worker "
                              f"({self.describe()}; set {ROOTS_ENV})")


def check_readable_input(path: Path, where: str) -> None:
    """Refuse an input that is not a regular file or directory (special and pseudo files)."""
    real = path.resolve()
    if any(real == fs or real.is_relative_to(fs) for fs in _PSEUDO_FILE_SYSTEMS):
        raise ConfigError(f"'{where}': {path} is a system pseudo-file ({real.parts[1]}), not "
                          "input data")
    try:
        mode = real.stat().st_mode
    except OSError:
        return  # missing: the plugin's own check names it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise ConfigError(f"'{where}': {path} is {kind}, not a regular file")
