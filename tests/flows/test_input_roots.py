"""Inputs a job may read: regular files only, and under the roots of a shared worker."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.flows.input_roots import ROOTS_ENV, InputRoots, check_readable_input
from quantmill.flows.recipe import load_job
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import ConfigError
from quantmill.plugins.manager import get_plugin_manager

runner = CliRunner()


def _load(path: Path, roots: InputRoots | None = None):
    from quantmill.flows.recipe import load_recipe_file, resolve_job

    recipe, text = load_recipe_file(path)
    return resolve_job(recipe, text, path, Catalog(get_plugin_manager()), roots)


def test_roots_parse_local_and_s3_and_refuse_nonsense(tmp_path: Path):
    roots = InputRoots.parse([str(tmp_path), " s3://bucket/models ", ""])
    assert roots.local == (tmp_path.resolve(),) and roots.s3 == ("s3://bucket/models/",)
    assert roots.allows_uri("s3://bucket/models/a.gguf")
    assert not roots.allows_uri("s3://bucket/modelsX/a.gguf")
    assert not roots.allows_uri("s3://other/models/a.gguf")
    assert roots.allows_path(tmp_path / "x" / "y") and not roots.allows_path(Path("/etc/passwd"))
    for bad, message in (("relative/dir", "not an absolute path"), ("http://x/y", "neither"),
                         ("s3:///key", "names no bucket")):
        with pytest.raises(ConfigError, match=message):
            InputRoots.parse([bad])


def test_a_link_inside_a_root_to_a_file_outside_is_refused(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "passwd.txt").symlink_to("/etc/passwd")
    roots = InputRoots.parse([str(root)])
    with pytest.raises(ConfigError, match="outside the input roots"):
        roots.check_path(root / "passwd.txt", "calibration")


def test_etc_passwd_as_calibration_is_refused_under_roots(tiny_recipe, tiny_model_dir: Path,
                                                          wikitext_dir: Path):
    path = tiny_recipe(calibration={"path": "/etc/passwd"})
    roots = InputRoots.parse([str(tiny_model_dir), str(wikitext_dir)])
    with pytest.raises(ConfigError, match=r"'calibration': /etc/passwd is outside the input "
                                          r"roots of this worker"):
        _load(path, roots)
    assert _load(tiny_recipe(), roots).calibration is not None  # the same recipe, inside


def test_the_environment_bounds_the_cli_too(tiny_recipe, tiny_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch, quantmill_home):
    monkeypatch.setenv(ROOTS_ENV, str(tiny_model_dir))
    result = runner.invoke(app, ["validate", str(tiny_recipe())])
    assert result.exit_code == 2
    assert "'calibration':" in result.stderr and "outside the input roots" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("special", ["/proc/self/environ", "/dev/zero", "fifo", "socket"])
def test_special_files_are_refused_as_inputs(tiny_recipe, tmp_path: Path, special: str):
    if special == "fifo":
        special = str(tmp_path / "pipe")
        os.mkfifo(special)
    elif special == "socket":
        special = str(tmp_path / "sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(special)
    with pytest.raises(ConfigError, match=r"'calibration': .*(pseudo-file|a FIFO|a socket)"):
        load_job(tiny_recipe(calibration={"path": special}), Catalog(get_plugin_manager()))


def test_regular_files_and_directories_pass(tmp_path: Path):
    (tmp_path / "f.txt").write_text("x")
    check_readable_input(tmp_path / "f.txt", "calibration")
    check_readable_input(tmp_path, "model.path")
