"""Guards for the one-package layout (DESIGN.md section 1).

The top-level folders install as ``quantmill.*`` through an explicit ``packages`` list and a
``package-dir`` mapping. Editable installs hide a package missing from that list; a wheel drops it
silently. These tests fail instead.
"""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("flows", "plugins", "registry", "storage", "alembic")
#: Listed packages that deliberately have no __init__.py (it would shadow the alembic library).
NO_INIT_PACKAGES = {"quantmill.migrations"}
REQUIRED_IN_WHEEL = (
    "quantmill/migrations/env.py",
    "quantmill/migrations/script.py.mako",
    "quantmill/migrations/versions/0001_initial.py",
    "quantmill/registry/__init__.py",
)


def _setuptools_config() -> tuple[list[str], dict[str, str]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return list(config["packages"]), dict(config["package-dir"])


def _package_name(folder: Path, package_dir: dict[str, str]) -> str:
    """The dotted name ``folder`` installs as, through the package-dir mapping."""
    relative = folder.relative_to(REPO).as_posix()
    for package, directory in package_dir.items():
        if relative == directory or relative.startswith(directory + "/"):
            rest = relative[len(directory) :].strip("/")
            return ".".join([package, *rest.split("/")]) if rest else package
    raise AssertionError(f"{relative} is not under any package-dir entry")


def _package_folder(package: str, package_dir: dict[str, str]) -> Path:
    """The folder a listed package comes from (longest mapped prefix wins)."""
    for mapped in sorted(package_dir, key=len, reverse=True):
        if package == mapped or package.startswith(mapped + "."):
            rest = package[len(mapped) :].strip(".")
            return REPO / package_dir[mapped] / rest.replace(".", "/")
    raise AssertionError(f"{package} is not under any package-dir entry")


def _source_folders() -> list[Path]:
    folders = []
    for root in SOURCE_ROOTS:
        for folder in [REPO / root, *sorted((REPO / root).rglob("*"))]:
            if folder.is_dir() and "__pycache__" not in folder.parts:
                folders.append(folder)
    return folders


def test_every_package_folder_is_listed() -> None:
    packages, package_dir = _setuptools_config()
    missing = []
    for folder in _source_folders():
        holds_code = (folder / "__init__.py").is_file() or any(folder.glob("*.py"))
        if holds_code and _package_name(folder, package_dir) not in packages:
            missing.append(f"{folder.relative_to(REPO)} -> {_package_name(folder, package_dir)}")
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_listed_package_exists() -> None:
    packages, package_dir = _setuptools_config()
    for package in packages:
        folder = _package_folder(package, package_dir)
        assert folder.is_dir(), f"{package}: {folder} does not exist"
        if package not in NO_INIT_PACKAGES:
            assert (folder / "__init__.py").is_file(), f"{package}: no __init__.py in {folder}"


def test_alembic_folder_does_not_shadow_the_library() -> None:
    assert not (REPO / "alembic" / "__init__.py").exists()
    assert (REPO / "alembic" / "versions" / "__init__.py").is_file()
    # `python -c` run from the repo root puts the root on sys.path: the worst case.
    found = subprocess.run(
        [sys.executable, "-c", "import alembic, alembic.command; print(alembic.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found and not Path(found).resolve().is_relative_to(REPO.resolve() / "alembic"), found

    import alembic

    assert not Path(alembic.__file__).resolve().is_relative_to(REPO / "alembic")


def _copy_sources(target: Path) -> None:
    """Copy what a build reads, so stale build/ or *.egg-info/ in the checkout cannot leak in."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for root in SOURCE_ROOTS:
        shutil.copytree(REPO / root, target / root, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, target / name)


def test_wheel_holds_only_the_quantmill_package(tmp_path: Path) -> None:
    source, out = tmp_path / "src", tmp_path / "dist"
    _copy_sources(source)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out)],
        cwd=source,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            "wheel build failed (dev tools missing? `.venv/bin/pip install -q 'setuptools>=70' "
            f"wheel build`):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    (wheel,) = out.glob("quantmill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    strays = [n for n in names if not (n.startswith("quantmill/") or n.startswith(dist_info + "/"))]
    assert not strays, f"files outside quantmill/ in the wheel: {strays}"
    assert not any(n == "quantmill/__init__.py" for n in names), "quantmill must stay a namespace"
    for required in REQUIRED_IN_WHEEL:
        assert required in names, f"{required} missing from the wheel"
    registry_modules = {p.name for p in (REPO / "registry").glob("*.py")}
    assert registry_modules <= {Path(n).name for n in names if n.startswith("quantmill/registry/")}
