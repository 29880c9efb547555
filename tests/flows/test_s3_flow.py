"""Jobs on S3 (a real SeaweedFS server): a recipe whose inputs, storage and published copy are
all in a bucket runs end to end; lineage, ``artifacts show``, ``storage copy`` and
``registry verify --files`` work on it; the server dying in the middle of a multipart upload
fails the job cleanly and its rerun sends only the missing parts; bad S3 input is one line."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.plugins.hashing import sha256_path
from quantmill.registry import Registry

runner = CliRunner()
BUCKET = "quantmill-tests"
MIB = 1 << 20


def _cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def _ok(*args: str) -> str:
    code, out, err = _cli(*args)
    assert code == 0, f"{out}\n{err}"
    return out


def _client(server):
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required"))


def _upload_dir(client, local: Path, prefix: str) -> None:
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(file), BUCKET, f"{prefix}/{file.relative_to(local).as_posix()}")


def _storage(server, prefix: str, **extra) -> dict:
    return {"backend": "s3", "bucket": BUCKET, "prefix": prefix,
            "endpoint_url": server.endpoint, "max_attempts": 2, "connect_timeout": 2, **extra}


@pytest.mark.slow
def test_recipe_with_s3_inputs_storage_and_publish(s3_env, quantmill_home: Path,
                                                   tiny_model_dir: Path, wikitext_dir: Path,
                                                   tiny_recipe, tmp_path: Path) -> None:
    client = _client(s3_env)
    _upload_dir(client, tiny_model_dir, "e2e/inputs/tiny-llama")
    client.upload_file(str(wikitext_dir / "valid.txt"), BUCKET, "e2e/inputs/valid.txt")
    client.upload_file(str(wikitext_dir / "test.txt"), BUCKET, "e2e/inputs/test.txt")
    recipe = tiny_recipe(
        model={"path": f"s3://{BUCKET}/e2e/inputs/tiny-llama/", "source": "hf"},
        calibration={"path": f"s3://{BUCKET}/e2e/inputs/valid.txt"},
        evaluation=[{"evaluator": "perplexity", "dataset": f"s3://{BUCKET}/e2e/inputs/test.txt",
                     "seq_len": 64, "max_windows": 4, "batch_size": 2}, {"evaluator": "size"}],
        export={"format": "gptq", "publish": f"s3://{BUCKET}/e2e/models/tiny-rtn/"},
        storage=_storage(s3_env, "e2e/store"),
    )
    out = _ok("run", "--lineage", str(recipe))
    assert "calibration_set" in out

    with Registry.open() as reg:
        checkpoint = reg.list_artifacts(kind="checkpoint")[0]
        base = reg.list_artifacts(kind="model")[0]
        datasets = {a.name: a for a in reg.list_artifacts(kind="dataset")}
        calibration = reg.list_artifacts(kind="calibration_set")[0]
        locations = reg.locations(checkpoint.id)
    # inputs are registered under their S3 URIs with the same hash the local files have
    assert base.uri == f"s3://{BUCKET}/e2e/inputs/tiny-llama/"
    assert base.sha256 == sha256_path(tiny_model_dir)[0]
    assert datasets["valid.txt"].sha256 == sha256_path(wikitext_dir / "valid.txt")[0]
    assert datasets["test.txt"].uri == f"s3://{BUCKET}/e2e/inputs/test.txt"
    assert calibration.uri.startswith(f"s3://{BUCKET}/e2e/store/blobs/sha256/")
    assert checkpoint.uri == (f"s3://{BUCKET}/e2e/store/trees/sha256/"
                              f"{checkpoint.sha256[:2]}/{checkpoint.sha256}")
    assert [(loc.role, loc.uri) for loc in locations] == [
        ("stored", checkpoint.uri), ("published", f"s3://{BUCKET}/e2e/models/tiny-rtn/")]
    assert locations[0].details["endpoint_url"] == s3_env.endpoint
    published = client.list_objects_v2(Bucket=BUCKET, Prefix="e2e/models/tiny-rtn/")
    names = {item["Key"].rsplit("/", 1)[-1] for item in published["Contents"]}
    assert {"config.json", "model.safetensors", "quantize_config.json"} <= names

    shown = json.loads(_ok("artifacts", "show", str(checkpoint.id)))
    assert [loc["role"] for loc in shown["locations"]] == ["stored", "published"]
    assert "checkpoint" in _ok("lineage", str(checkpoint.id))
    verified = _ok("registry", "verify", "--files")
    assert "OK" in verified

    # a copy to local storage keeps one artifact id with one more location
    local_root = tmp_path / "local-store"
    copied = _ok("storage", "copy", str(checkpoint.id), "--to", str(local_root))
    assert f"artifact {checkpoint.id} copied" in copied
    with Registry.open() as reg:
        after = reg.locations(checkpoint.id)
        assert len(reg.list_artifacts(kind="checkpoint")) == 1
    assert [loc.role for loc in after] == ["stored", "published", "copy"]
    assert after[2].uri.startswith(local_root.resolve().as_uri())
    assert sha256_path(local_root / "objects" / "sha256" / checkpoint.sha256[:2]
                       / checkpoint.sha256)[0] == checkpoint.sha256
    assert "OK" in _ok("registry", "verify", "--files")

    # an object deleted behind quantmill's back: verify names it; a fetch still finds the
    # intact local copy
    manifest = client.get_object(Bucket=BUCKET, Key=checkpoint.uri.split(f"{BUCKET}/", 1)[1])
    weights = next(line.split()[0] for line in manifest["Body"].read().decode().splitlines()
                   if line.endswith("model.safetensors"))
    blob_key = f"e2e/store/blobs/sha256/{weights[:2]}/{weights}"
    client.delete_object(Bucket=BUCKET, Key=blob_key)
    code, out, _ = _cli("registry", "verify", "--files", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and len(problems) == 1, problems
    assert problems[0]["record"].startswith(f"artifacts #{checkpoint.id}")
    assert f"s3://{BUCKET}/{blob_key}" in problems[0]["detail"], problems
    shutil.rmtree(quantmill_home / "cache")  # no cached copy to fall back on
    code, out, err = _cli("storage", "fetch", str(checkpoint.id))
    assert code == 0, err
    assert sha256_path(Path(out.strip()))[0] == checkpoint.sha256
    assert f"skipped {checkpoint.uri}: stored object is missing: s3://{BUCKET}/{blob_key}" in err
    assert f"from s3://{BUCKET}/e2e/models/tiny-rtn/" in err  # the published copy served it


def _big_model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A random Llama whose 4-bit checkpoint is about 11 MiB: three 5 MiB upload parts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path / "bigger-llama"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_server_killed_mid_multipart_then_rerun_sends_only_missing_parts(
        s3_env, quantmill_home: Path, tiny_model_dir: Path, tiny_recipe, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from quantmill.storage import s3_transfer

    model = _big_model_dir(tmp_path, tiny_model_dir)
    recipe = tiny_recipe(model={"path": str(model), "source": "hf"},
                         evaluation=[{"evaluator": "size"}],
                         storage=_storage(s3_env, "crash", part_size_mb=5, max_concurrency=1))
    real = s3_transfer._read
    lock, calls = threading.Lock(), []

    def kill_before_second_part(fd, offset, length):
        with lock:
            calls.append(length)
            if length == 5 * MIB and calls.count(5 * MIB) == 2:
                s3_env.kill()  # the server dies with part 1 of the checkpoint stored
        return real(fd, offset, length)

    monkeypatch.setattr(s3_transfer, "_read", kill_before_second_part)
    try:
        code, _, err = _cli("run", str(recipe))
    finally:
        if s3_env.process is None:
            s3_env.start()
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # after Prefect's own log of the failed task
    assert last.startswith("error:") and f"cannot reach the S3 endpoint {s3_env.endpoint}" in last
    with Registry.open() as reg:
        assert reg.list_artifacts(kind="checkpoint") == []
        failed = reg.list_runs(kind="quantization")
        assert [r.status for r in failed] == ["failed"]

    monkeypatch.setattr(s3_transfer, "_read", real)
    _ok("run", str(recipe))
    with Registry.open() as reg:
        checkpoint = reg.list_artifacts(kind="checkpoint")[0]
        run = reg.list_runs(kind="quantization", status="succeeded")[0]
    upload = run.details["upload"]
    assert upload["parts_reused"] == 1 and upload["parts_sent"] >= 2
    # part 1 was not sent again: at most the checkpoint less one part, plus the tree's
    # manifest (small files may have gone up before the kill), and at least the weights' rest
    client = _client(s3_env)
    manifest = client.get_object(Bucket=BUCKET, Key=checkpoint.uri.split(f"{BUCKET}/", 1)[1])
    weights = max(int(line.split()[1]) for line in
                  manifest["Body"].read().decode().splitlines())
    assert weights - 5 * MIB <= upload["bytes_sent"] < checkpoint.size_bytes - 5 * MIB + 4096
    assert client.list_multipart_uploads(Bucket=BUCKET, Prefix="crash/").get("Uploads", []) == []
    assert "OK" in _ok("registry", "verify", "--files")


@pytest.mark.parametrize("label,overrides,message", [
    ("unknown bucket", lambda s: {"storage": {**_storage(s, "x"), "bucket": "no-such-bucket"}},
     "S3 bucket 'no-such-bucket' does not exist"),
    ("unreachable endpoint",
     lambda s: {"storage": {**_storage(s, "x"), "endpoint_url": "http://127.0.0.1:9"}},
     "cannot reach the S3 endpoint http://127.0.0.1:9"),
    ("malformed model URI", lambda s: {"model": {"path": "s3://Bad_Bucket/m/", "source": "hf"},
                                       "storage": _storage(s, "x")},
     "not a valid bucket name"),
    ("missing S3 input", lambda s: {"calibration": {"path": f"s3://{BUCKET}/nothing/here.txt"},
                                    "storage": _storage(s, "x")},
     f"'calibration.path': no object or prefix at s3://{BUCKET}/nothing/here.txt"),
    ("malformed publish URI", lambda s: {"export": {"format": "gptq", "publish": "s3://"}},
     "invalid 'export.publish'"),
    ("secret in the storage section",
     lambda s: {"storage": {**_storage(s, "x"), "aws_secret_access_key": "hunter2-secret"}},
     "'storage.aws_secret_access_key': credentials do not belong in a recipe"),
    ("secret in a URL",
     lambda s: {"storage": {**_storage(s, "x"),
                            "endpoint_url": "http://AKIAIOSFODNN7EXAMPLE:hunter2-secret@h:1"}},
     "'storage.endpoint_url' holds what looks like a credential"),
])
def test_bad_s3_input_is_one_line(s3_env, quantmill_home: Path, tiny_recipe, label: str,
                                  overrides, message: str) -> None:
    code, _, err = _cli("run", str(tiny_recipe(**overrides(s3_env))))
    assert code == 2, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "hunter2" not in err and "AKIAIOSFODNN7EXAMPLE" not in err
    with Registry.open() as reg:
        assert reg.list_artifacts() == [] and reg.list_runs() == []


def test_wrong_credentials_are_refused_before_any_work(s3_env, quantmill_home: Path,
                                                       tiny_recipe, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    code, _, err = _cli("validate", str(tiny_recipe(storage=_storage(s3_env, "x"))))
    assert code == 2 and "refused the credentials" in err
    assert "wrong-secret-value" not in err and len(err.strip().splitlines()) == 1


def test_storage_url_from_the_environment(s3_env, quantmill_home: Path, tiny_recipe,
                                          monkeypatch) -> None:
    """``QUANTMILL_STORAGE_URL`` is the default when a recipe names no storage backend."""
    from quantmill.flows.recipe import load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    monkeypatch.setenv("QUANTMILL_STORAGE_URL", f"s3://{BUCKET}/from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    job = load_job(tiny_recipe(), Catalog(get_plugin_manager()))
    assert job.storage.name == "s3"
    assert (job.storage.config.bucket, job.storage.config.prefix) == (BUCKET, "from-env")
    explicit = load_job(tiny_recipe(storage={"backend": "local"}), Catalog(get_plugin_manager()))
    assert explicit.storage.name == "local"
    monkeypatch.setenv("QUANTMILL_STORAGE_URL", "ftp://somewhere")
    code, _, err = _cli("validate", str(tiny_recipe()))
    assert code == 2 and "QUANTMILL_STORAGE_URL" in err
