"""The lock file, the environment record and the skew check between deployer and worker."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

import pytest
from packaging.requirements import Requirement

from quantmill.flows import environment
from quantmill.flows.environment import (
    LOCK_FILE,
    Environment,
    EnvironmentSkew,
    check_skew,
    current_environment,
    read_lock,
    skew,
    software_versions,
)


def _required_closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """Every distribution ``root[extras]`` needs on this platform, transitively."""
    seen: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
                continue
            key = environment._canonical(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_the_lock_pins_every_dependency_at_the_installed_version():
    pins = read_lock()
    needed = _required_closure("quantmill", ("dev",))
    assert {"torch", "prefect", "prefect-dask", "boto3"} <= needed
    unpinned = sorted(needed - set(pins))
    assert not unpinned, f"dependencies missing from {LOCK_FILE.name} (run make lock): {unpinned}"
    deviations = current_environment().lock_deviations({k: pins[k] for k in needed})
    assert not deviations, f"installed versions differ from the lock (make lock): {deviations}"


def test_a_run_records_the_lock_and_environment_hashes():
    versions = software_versions()
    env = current_environment()
    assert versions["environment_sha256"] == env.sha256
    assert versions["lock_sha256"] == env.lock_sha256 and len(env.lock_sha256) == 64
    assert env.packages["torch"].startswith(versions["torch"].split("+")[0])


def test_lock_deviations_ignore_local_labels_and_name_missing_packages():
    env = Environment({"torch": "2.13.0+cpu", "numpy": "2.0.0"}, None, None)
    found = env.lock_deviations({"torch": "2.13.0", "numpy": "2.1.0", "boto3": "1.0"})
    assert found == ["boto3 not installed (lock 1.0)", "numpy 2.0.0 (lock 2.1.0)"]


def _changed(env: Environment, **packages: str) -> Environment:
    return Environment({**env.packages, **packages}, env.lock_sha256, env.source_commit)


def test_skew_names_what_differs_and_is_empty_for_the_same_environment():
    here = current_environment()
    assert skew(here.record(), here) == []
    other = _changed(here, transformers="0.0.1")
    differences = skew(other.record(), here)
    assert any(d.startswith("transformers 0.0.1 here ") for d in differences), differences
    minor = _changed(here, pyyaml="0.0.1")  # not a key package: the hash still tells
    assert "other installed packages differ" in skew(minor.record(), here)[0]


def test_check_skew_warns_by_default_and_refuses_when_told(monkeypatch, caplog):
    expected = _changed(current_environment(), torch="1.0.0").record()
    monkeypatch.delenv(environment.SKEW_POLICY_ENV, raising=False)
    with caplog.at_level("WARNING"):
        differences = check_skew(expected, "deployment d")
    assert differences and "deployment d" in caplog.text and "torch 1.0.0" in caplog.text
    monkeypatch.setenv(environment.SKEW_POLICY_ENV, "refuse")
    with pytest.raises(EnvironmentSkew, match="torch 1.0.0 here"):
        check_skew(expected, "deployment d")
    monkeypatch.setenv(environment.SKEW_POLICY_ENV, "sometimes")
    with pytest.raises(Exception, match="must be 'warn' or 'refuse'"):
        check_skew(expected, "deployment d")
    assert check_skew(current_environment().record(), "deployment d") == []
