"""The s3 backend against a real S3 server (SeaweedFS): layout, hashes equal to local storage,
idempotent and resumable uploads, hash-checked reads through the cache, publishing, and every
fault the issue lists."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from quantmill.plugins.errors import ConfigError
from quantmill.plugins.hashing import sha256_path
from quantmill.storage.errors import StorageError, StorageIntegrityError, StorageObjectMissing
from quantmill.storage.local import LocalStorage
from quantmill.storage.s3 import S3Storage, S3StorageConfig
from quantmill.storage.s3_location import parse_s3_uri

MIB = 1 << 20


def _tree(root: Path, big: int = 0) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "tokenizer.json").write_bytes(bytes(range(256)) * 10)
    if big:
        (root / "model.safetensors").write_bytes(os.urandom(big))
    return root


def _raw_client(server):
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required"))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key(uri: str) -> str:
    return parse_s3_uri(uri).key


def test_tree_round_trip_has_the_local_hash(s3_storage, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", big=3 * MIB)
    store = s3_storage()
    stored = store.put_tree(src)
    local = LocalStorage.from_options({"root": tmp_path / "local"}).put_tree(src)
    assert stored.sha256 == local.sha256 == sha256_path(src)[0]
    assert stored.size_bytes == local.size_bytes
    assert f"/trees/sha256/{stored.sha256[:2]}/{stored.sha256}" in stored.uri
    fetched = store.fetch(stored.uri)
    assert sha256_path(fetched)[0] == stored.sha256
    assert (fetched / "sub" / "tokenizer.json").read_bytes() == bytes(range(256)) * 10
    assert store.rehash(stored.uri) == (stored.sha256, stored.size_bytes)


def test_second_store_sends_nothing_and_shared_files_are_stored_once(s3_storage,
                                                                     tmp_path: Path) -> None:
    store = s3_storage()
    first = _tree(tmp_path / "one", big=MIB)
    store.put_tree(first)
    assert store.stats.objects_sent == 4  # three files and the manifest
    store.put_tree(first)
    assert store.stats.bytes_sent == 0 and store.stats.objects_skipped == 4
    second = _tree(tmp_path / "two")  # same config and tokenizer, no weights
    store.put_tree(second)
    assert store.stats.objects_sent == 1  # only its own manifest is new


def test_single_file_and_cache_reuse(s3_storage, tmp_path: Path) -> None:
    file = tmp_path / "calibration.safetensors"
    file.write_bytes(os.urandom(1000))
    store = s3_storage()
    stored = store.put_tree(file)
    assert stored.sha256 == sha256_path(file)[0]
    path = store.fetch(stored.uri)
    assert path.read_bytes() == file.read_bytes()
    assert store.stats.bytes_received == 1000
    again = store.fetch(stored.uri)
    assert again == path and store.stats.bytes_received == 0  # served by the cache


def test_damaged_cache_copy_is_fetched_again(s3_storage, tmp_path: Path) -> None:
    file = tmp_path / "x.bin"
    file.write_bytes(b"x" * 5000)
    store = s3_storage()
    stored = store.put_tree(file)
    path = store.fetch(stored.uri)
    path.write_bytes(b"y" * 5000)
    repaired = store.fetch(stored.uri)
    assert repaired.read_bytes() == b"x" * 5000 and store.stats.bytes_received == 5000


def test_object_changed_behind_our_back_is_refused(s3_env, s3_storage, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    stored = s3_storage().put_tree(src)
    sha = sha256_path(src / "config.json")[0]
    raw = _raw_client(s3_env)
    prefix = _key(stored.uri).split("/trees/")[0]
    raw.put_object(Bucket="quantmill-tests", Key=f"{prefix}/blobs/sha256/{sha[:2]}/{sha}",
                   Body=b'{"a": 2}', Metadata={"sha256": sha})
    reader = s3_storage(cache_dir=tmp_path / "fresh-cache")
    reader.config = reader.config.model_copy(update={"prefix": prefix})
    with pytest.raises(StorageIntegrityError, match="was modified"):
        reader.fetch(stored.uri)
    sha_now, _ = reader.rehash(stored.uri)
    assert sha_now != stored.sha256


def test_deleted_object_is_reported_missing(s3_env, s3_storage, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    store = s3_storage()
    stored = store.put_tree(src)
    sha = sha256_path(src / "sub" / "tokenizer.json")[0]
    prefix = _key(stored.uri).split("/trees/")[0]
    _raw_client(s3_env).delete_object(Bucket="quantmill-tests",
                                      Key=f"{prefix}/blobs/sha256/{sha[:2]}/{sha}")
    with pytest.raises(FileNotFoundError, match="missing"):
        store.rehash(stored.uri)
    with pytest.raises(StorageObjectMissing):
        s3_storage(cache_dir=tmp_path / "fresh").fetch(stored.uri)


@pytest.mark.parametrize("checksum", ["sha256", "crc32", "md5", "off"])
def test_multipart_with_each_checksum_mode(s3_storage, tmp_path: Path, checksum: str) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(11 * MIB))
    store = s3_storage(checksum=checksum, part_size_mb=5)
    stored = store.put_tree(file)
    assert store.stats.parts_sent == 3
    assert store.rehash(stored.uri) == (stored.sha256, 11 * MIB)


def test_ranged_download_hashes_every_range_in_order(s3_env, s3_storage, tmp_path: Path) -> None:
    from quantmill.storage.s3_transfer import TransferSettings, TransferStats, download_file

    data = os.urandom(23 * MIB + 12345)  # 5 ranges of 5 MiB, the last one short
    file = tmp_path / "weights.bin"
    file.write_bytes(data)
    stored = s3_storage(part_size_mb=5).put_tree(file)
    bucket, key = parse_s3_uri(stored.uri).bucket, parse_s3_uri(stored.uri).key
    client = _raw_client(s3_env)
    for workers in (1, 2, 8):  # the hasher may be behind, level with or ahead of the fetchers
        target, stats = tmp_path / f"down-{workers}", TransferStats()
        sha = download_file(client, bucket, key, len(data), target,
                            TransferSettings(part_size=5 * MIB, max_concurrency=workers), stats)
        assert sha == stored.sha256 and target.read_bytes() == data
        assert stats.bytes_received == len(data)


def test_a_range_that_fails_mid_download_fails_the_download_without_hanging(
        s3_env, s3_storage, tmp_path: Path) -> None:
    from quantmill.storage.s3_transfer import TransferSettings, TransferStats, download_file

    data = os.urandom(26 * MIB)
    file = tmp_path / "weights.bin"
    file.write_bytes(data)
    stored = s3_storage(part_size_mb=5).put_tree(file)
    location = parse_s3_uri(stored.uri)
    client = _raw_client(s3_env)
    real = client.get_object

    def flaky(**kwargs):
        if kwargs.get("Range", "").startswith(f"bytes={10 * MIB}-"):
            raise ConnectionResetError("range 2 lost")
        return real(**kwargs)

    client.get_object = flaky
    started = time.monotonic()
    with pytest.raises(ConnectionResetError, match="range 2 lost"):
        download_file(client, location.bucket, location.key, len(data), tmp_path / "down",
                      TransferSettings(part_size=5 * MIB, max_concurrency=2), TransferStats())
    assert time.monotonic() - started < 30


def test_a_wrong_part_checksum_is_refused_by_the_server(s3_env) -> None:
    raw = _raw_client(s3_env)
    with pytest.raises(Exception, match="BadDigest"):
        raw.put_object(Bucket="quantmill-tests", Key="bad-digest", Body=b"abc",
                       ChecksumSHA256="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")


@pytest.mark.parametrize("size_mib", [3, 12])
def test_a_file_changed_after_it_was_hashed_is_refused_not_stored(
        s3_env, s3_storage, tmp_path: Path, size_mib: int) -> None:
    """The parts' checksums come from the read that made the content hash, so bytes changed
    between hashing and sending are refused by the server: nothing is stored under the old
    hash, and no multipart upload is left behind."""
    from quantmill.storage.s3_transfer import TransferStats, digest_file, upload_file

    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(size_mib * MIB))
    store = s3_storage(part_size_mb=5)
    digest = digest_file(file, store.settings)
    assert digest.multipart == (size_mib > 5)
    with file.open("r+b") as handle:  # same size, other bytes in the last part
        handle.seek(size_mib * MIB - 10)
        handle.write(b"0123456789")
    key = store._key("blobs", digest.sha256)
    with pytest.raises(Exception, match="BadDigest"):
        upload_file(store.client, "quantmill-tests", key, file, digest, store.settings,
                    TransferStats())
    raw = _raw_client(s3_env)
    with pytest.raises(Exception, match="404"):
        raw.head_object(Bucket="quantmill-tests", Key=key)
    assert raw.list_multipart_uploads(Bucket="quantmill-tests",
                                      Prefix=key).get("Uploads", []) == []


@pytest.mark.parametrize("checksum", ["sha256", "crc32"])
def test_only_a_sha256_checksum_replaces_the_signed_payload_hash(s3_storage, tmp_path: Path,
                                                                 checksum: str) -> None:
    """Over plain HTTP SigV4 signs the body's sha256; a body carrying a (signed) SHA256
    checksum is not hashed again for that, a body with only a CRC keeps its payload hash."""
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(7 * MIB))
    store = s3_storage(checksum=checksum, part_size_mb=5)
    signed: list[tuple[str, str]] = []

    def record(request, **_):
        if request.method == "PUT":
            signed.append(tuple(_text(request.headers[name]) for name in
                                ("X-Amz-Content-SHA256", "Authorization")))

    store.client.meta.events.register("before-send.s3", record)
    stored = store.put_tree(file)
    assert store.rehash(stored.uri) == (stored.sha256, 7 * MIB)
    bodies = [value for value, _ in signed]
    assert len(bodies) == 2  # the two parts
    if checksum == "sha256":
        assert set(bodies) == {"UNSIGNED-PAYLOAD"}
        assert all(f"x-amz-checksum-{checksum}" in auth for _, auth in signed)
    else:
        assert "UNSIGNED-PAYLOAD" not in bodies and all(len(v) == 64 for v in bodies)


def test_rerun_after_interrupted_multipart_sends_only_missing_parts(s3_env, s3_storage,
                                                                    tmp_path: Path) -> None:
    """An upload killed after two of five parts: the rerun resumes it and sends three."""
    from quantmill.storage.s3_transfer import TransferSettings, part_checksum

    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(25 * MIB))
    store = s3_storage(part_size_mb=5)
    sha = sha256_path(file)[0]
    key = store._key("blobs", sha)
    raw = _raw_client(s3_env)
    upload = raw.create_multipart_upload(Bucket="quantmill-tests", Key=key,
                                         Metadata={"sha256": sha}, ChecksumAlgorithm="SHA256")
    data = file.read_bytes()
    assert TransferSettings(part_size=5 * MIB).part_size_for(len(data)) == 5 * MIB
    for number in (1, 2):
        part = data[(number - 1) * 5 * MIB:number * 5 * MIB]
        raw.upload_part(Bucket="quantmill-tests", Key=key, UploadId=upload["UploadId"],
                        PartNumber=number, Body=part, **part_checksum(part, "sha256"))
    stored = store.put_tree(file)
    assert store.stats.parts_reused == 2 and store.stats.parts_sent == 3
    assert store.stats.bytes_sent == 15 * MIB
    assert store.rehash(stored.uri) == (sha, 25 * MIB)
    left = raw.list_multipart_uploads(Bucket="quantmill-tests", Prefix=key).get("Uploads", [])
    assert left == []


def test_failed_upload_is_aborted(s3_env, s3_storage, tmp_path: Path, monkeypatch) -> None:
    """A part refused mid-upload (the server reachable): the multipart upload is aborted."""
    from quantmill.storage import s3_transfer

    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(12 * MIB))
    store = s3_storage(part_size_mb=5)
    real = s3_transfer.part_checksum

    def corrupt(data, mode):
        if len(data) == 2 * MIB:  # the last part's checksum is wrong: the server refuses it
            return {"ChecksumSHA256": real(b"other", mode)["ChecksumSHA256"]}
        return real(data, mode)

    monkeypatch.setattr(s3_transfer, "part_checksum", corrupt)
    with pytest.raises(StorageError, match="BadDigest"):
        store.put_tree(file)
    key = store._key("blobs", sha256_path(file)[0])
    raw = _raw_client(s3_env)
    assert raw.list_multipart_uploads(Bucket="quantmill-tests", Prefix=key).get("Uploads",
                                                                                 []) == []
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="404"):
        raw.head_object(Bucket="quantmill-tests", Key=key)


def test_external_file_and_prefix_inputs(s3_env, s3_storage, tmp_path: Path) -> None:
    raw = _raw_client(s3_env)
    raw.put_object(Bucket="quantmill-tests", Key="inputs/data/valid.txt", Body=b"hello world")
    raw.put_object(Bucket="quantmill-tests", Key="inputs/model/config.json", Body=b"{}")
    raw.put_object(Bucket="quantmill-tests", Key="inputs/model/sub/w.bin", Body=b"123")
    store = s3_storage()
    text = store.fetch("s3://quantmill-tests/inputs/data/valid.txt")
    assert text.read_bytes() == b"hello world"
    model = store.fetch("s3://quantmill-tests/inputs/model/")
    assert (model / "sub" / "w.bin").read_bytes() == b"123"
    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_bytes(b"{}")
    (local / "sub" / "w.bin").write_bytes(b"123")
    assert sha256_path(model)[0] == sha256_path(local)[0]
    assert store.rehash("s3://quantmill-tests/inputs/model") == sha256_path(local)
    store.fetch("s3://quantmill-tests/inputs/model/")
    assert store.stats.bytes_received == 0  # unchanged listing: the cached tree
    raw.put_object(Bucket="quantmill-tests", Key="inputs/model/config.json", Body=b"{ }")
    changed = store.fetch("s3://quantmill-tests/inputs/model/")
    assert (changed / "config.json").read_bytes() == b"{ }"
    with pytest.raises(StorageObjectMissing, match="no object or prefix"):
        store.fetch("s3://quantmill-tests/inputs/nothing-here")


def test_publish_writes_plain_files_and_refuses_other_content(s3_env, s3_storage,
                                                              tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    store = s3_storage()
    published = store.publish(src, "s3://quantmill-tests/models/tiny/")
    assert published.uri == "s3://quantmill-tests/models/tiny/"
    assert published.sha256 == sha256_path(src)[0]
    raw = _raw_client(s3_env)
    body = raw.get_object(Bucket="quantmill-tests", Key="models/tiny/config.json")["Body"]
    assert body.read() == b'{"a": 1}'
    assert store.publish(src, "s3://quantmill-tests/models/tiny/").sha256 == published.sha256
    assert store.stats.bytes_sent == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"b": 2}')
    with pytest.raises(StorageError, match="other"):
        store.publish(other, "s3://quantmill-tests/models/tiny/")
    assert store.rehash(published.uri) == sha256_path(src)


def test_unknown_bucket(s3_storage, tmp_path: Path) -> None:
    store = s3_storage(bucket="no-such-bucket-here")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_tree(_tree(tmp_path / "src"))


def test_unreachable_endpoint_fails_within_seconds(tmp_path: Path, s3_env) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Storage(S3StorageConfig(bucket="quantmill-tests",
                                      endpoint_url=f"http://127.0.0.1:{port}"))
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        store.put_tree(_tree(tmp_path / "src"))
    assert time.monotonic() - started < 30


def test_wrong_credentials(s3_storage, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="refused the credentials") as info:
        s3_storage().put_tree(_tree(tmp_path / "src"))
    assert "not-the-secret" not in str(info.value)


def test_no_credentials(s3_storage, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no S3 credentials found"):
        s3_storage().put_tree(_tree(tmp_path / "src"))


@pytest.mark.parametrize(("uri", "message"), [
    ("s3://", "no bucket"),
    ("s3://UPPER/key", "not a valid bucket name"),
    ("s3://bucket/a//b", "empty"),
    ("s3://key:secret@bucket/x", "must not carry credentials"),
    ("s3://bucket/x?X-Amz-Credential=abc", "query string"),
    ("http://bucket/x", "not an s3:// URI"),
])
def test_malformed_uris(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_s3_uri(uri)
    assert "secret" not in str(info.value) or "credentials" in str(info.value)


def test_config_refuses_endpoint_with_credentials() -> None:
    with pytest.raises(Exception, match="without credentials"):
        S3StorageConfig(bucket="abc", endpoint_url="http://user:pw@127.0.0.1:1")



def test_transient_outage_is_retried_with_backoff(s3_env, s3_storage, tmp_path: Path) -> None:
    """The server is down when the upload starts and back a few seconds later: botocore's
    standard retries (exponential backoff) carry the upload through."""
    import threading

    store = s3_storage(max_attempts=10, connect_timeout=1)
    store.check()  # the bucket is known before the outage
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(7 * MIB))
    s3_env.kill()
    result: dict = {}

    def upload() -> None:
        try:
            result["stored"] = store.put_tree(file)
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    worker = threading.Thread(target=upload)
    try:
        worker.start()
        time.sleep(1.5)
    finally:
        s3_env.start()
    worker.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert store.rehash(result["stored"].uri) == sha256_path(file)


def test_listed_parts_are_matched_by_checksum_or_etag() -> None:
    """SeaweedFS lists parts with their MD5 ETag only; AWS also lists the SHA256 of parts
    uploaded with checksums. Both decide whether a part is reused."""
    import base64
    import hashlib

    from quantmill.storage.s3_transfer import listed_part_matches

    data = b"part data" * 1000
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    md5 = hashlib.md5(data).hexdigest()
    assert listed_part_matches({"ETag": f'"{md5}"'}, data)
    assert not listed_part_matches({"ETag": f'"{md5}"'}, data + b"!")
    assert listed_part_matches({"ETag": '"whatever-2"', "ChecksumSHA256": sha}, data)
    assert not listed_part_matches({"ETag": f'"{md5}"', "ChecksumSHA256": sha}, b"other")


def test_work_area_objects_in_s3(s3_env, s3_storage) -> None:
    """A resumable job's work area as objects under <prefix>/work/<key>/: whole writes,
    reads of what is there (None otherwise), listing by key, removal."""
    store = s3_storage()
    key = "ab" * 32
    area = store.work_area(key)
    assert area.read("index.json") is None
    area.write("index.json", b"{}")
    area.write("block-00000.safetensors", b"x" * 1000)
    assert area.read("block-00000.safetensors") == b"x" * 1000
    assert store.work_area_keys() == [key]
    raw = _raw_client(s3_env)
    listed = raw.list_objects_v2(Bucket="quantmill-tests",
                                 Prefix=f"{store.config.prefix}/work/{key}/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == ["block-00000.safetensors",
                                                                  "index.json"]
    area.remove("block-00000.safetensors")
    assert area.read("block-00000.safetensors") is None
    area.clear()
    assert store.work_area_keys() == []
    with pytest.raises(ValueError, match="not a work-area key"):
        store.work_area("../../blobs")
