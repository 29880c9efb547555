"""The ``s3`` storage backend: content-addressed objects in S3 or an S3-compatible server.

Layout in the bucket, under ``prefix`` (default ``quantmill``)::

    <prefix>/blobs/sha256/<ab>/<sha256>    one object per file, keyed by the file's own sha256
    <prefix>/trees/sha256/<ab>/<sha256>    one object per directory tree: its manifest
    <prefix>/work/<key>/<name>              scratch of an unfinished resumable job (s3_work.py)

A tree's manifest is exactly the text ``plugins.hashing.manifest_text`` defines (one line
``<sha256> <size> <relative/path>`` per file, sorted), so the manifest object's own sha256 *is*
the tree's hash: an artifact has the same sha256 whichever backend stores it, and every object
in the layout is named by the hash of its content. Files shared by several trees (a tokenizer
used by every checkpoint of one model, an unchanged shard) are stored once.

An artifact's URI is its file's blob key or its tree's manifest key, e.g.
``s3://team-models/quantmill/trees/sha256/3f/3f2a...``. Every object carries its sha256 in its
metadata (``x-amz-meta-sha256``).

Writes (``put_tree``): blobs first, each sent only if its key is not already present with the
right size and hash (a rerun after a killed upload sends only what is missing; see
``storage.s3_transfer`` for multipart resume, checksums and aborts), then the manifest, then a
HEAD of every object. Only then does ``put_tree`` return, and only its return value is ever
registered: no registered artifact points at a missing or partial object.

Reads (``fetch``): into the local cache (``storage.cache``), re-hashed; a mismatch is refused.
``rehash`` (``registry verify --files``) reads from the bucket itself, never from the cache.
Keys outside the layout (a recipe's ``s3://bucket/models/llama.gguf`` or a Hugging Face
directory prefix ``s3://bucket/models/smol/``) are read the same way and hashed on arrival.
``publish`` writes a checkpoint as plain files under a readable prefix for runtimes that know
nothing of quantmill.

Credentials: boto3's standard chain only (``storage.s3_client``); a recipe carrying credentials
is refused.

Sample recipe section::

    storage:
      backend: s3
      bucket: team-models
      prefix: quantmill                       # optional
      endpoint_url: http://127.0.0.1:8333     # S3-compatible servers; omit for AWS
      region: eu-west-1                       # optional
      checksum: sha256                        # sha256 | crc32 | md5 | off (servers differ)

or, with no ``storage`` section, ``QUANTMILL_STORAGE_URL=s3://team-models/quantmill`` (the
endpoint then comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, boto3's own variables).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from quantmill.plugins.base import PluginConfig, StorageBackend, StoredObject
from quantmill.plugins.blockwise.resume import work_key
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hashing import (
    manifest_sha256,
    manifest_text,
    parse_manifest,
    tree_files,
)
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.progress import progress_bar
from quantmill.storage.cache import ContentCache
from quantmill.storage.errors import StorageError, StorageIntegrityError, StorageObjectMissing
from quantmill.storage.s3_client import Checksum, describe, is_missing, make_client
from quantmill.storage.s3_location import S3Location, parse_s3_uri
from quantmill.storage.s3_transfer import (
    MIB,
    FileDigest,
    TransferSettings,
    TransferStats,
    digest_file,
    download_file,
    head_object,
    stream_sha256,
    upload_file,
)
from quantmill.storage.s3_work import S3BlockStore, work_area_keys

_LAYOUT_RE = re.compile(r"^(?P<root>(?:.*/)?)(?P<kind>blobs|trees)/sha256/(?P<ab>[0-9a-f]{2})/"
                        r"(?P<sha>[0-9a-f]{64})$")
#: How many small files of a tree go up (or down) at once; large files parallelise by part.
FILE_CONCURRENCY = 8


class S3StorageConfig(PluginConfig):
    """Where the objects go and how they travel (no credentials: boto3's chain supplies them)."""

    bucket: str
    prefix: str = "quantmill"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    checksum: Checksum = "sha256"
    part_size_mb: int = Field(16, ge=5, le=5120)
    max_concurrency: int = Field(8, ge=1, le=64)
    max_attempts: int = Field(5, ge=1, le=20)
    connect_timeout: float = Field(5.0, gt=0, le=300)
    read_timeout: float = Field(60.0, gt=0, le=3600)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        parse_s3_uri(f"s3://{value}/")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if value:
            parse_s3_uri(f"s3://bucket-name/{value}")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/@\s]+(/.*)?$", value):
            raise ValueError("endpoint_url must be an http:// or https:// URL without "
                             "credentials, e.g. http://127.0.0.1:8333")
        return value.rstrip("/")


def _layout(key: str) -> re.Match[str] | None:
    match = _LAYOUT_RE.match(key)
    if match is not None and match["sha"][:2] == match["ab"]:
        return match
    return None


class S3Storage(StorageBackend):
    """Content-addressed objects in a bucket (layout in the module docstring)."""

    name = "s3"
    scheme = "s3"
    Config = S3StorageConfig

    def __init__(self, config: PluginConfig | None = None, cache: ContentCache | None = None):
        super().__init__(config)
        self.cache = cache or ContentCache()
        self._client: Any = None
        self._checked_buckets: set[str] = set()
        #: what the last ``put_tree``/``fetch``/``publish`` sent and received
        self.stats = TransferStats()

    # --- configuration -------------------------------------------------------------------------

    @property
    def settings(self) -> TransferSettings:
        cfg = self.config
        return TransferSettings(part_size=cfg.part_size_mb * MIB,
                                max_concurrency=cfg.max_concurrency, checksum=cfg.checksum)

    @property
    def client(self) -> Any:
        if self._client is None:
            cfg = self.config
            self._client = make_client(
                endpoint_url=cfg.endpoint_url, region=cfg.region, profile=cfg.profile,
                addressing_style=cfg.addressing_style, max_attempts=cfg.max_attempts,
                connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                # one large object's parts, or several small objects, move at a time
                max_pool_connections=max(cfg.max_concurrency, FILE_CONCURRENCY) + 2,
            )
        return self._client

    @property
    def endpoint(self) -> str | None:
        return self.config.endpoint_url or getattr(self.client.meta, "endpoint_url", None)

    def check(self) -> None:
        self._check_bucket(self.config.bucket, f"s3://{self.config.bucket}/{self.config.prefix}")

    def transfer_report(self) -> dict[str, Any]:
        return self.stats.to_json()

    def location_details(self) -> dict[str, Any]:
        details = {"backend": self.name, "endpoint_url": self.config.endpoint_url,
                   "region": self.config.region}
        return {key: value for key, value in details.items() if value is not None}

    @classmethod
    def options_from_url(cls, url: str) -> dict[str, Any]:
        location = parse_s3_uri(url)
        return {"bucket": location.bucket, "prefix": location.key.strip("/") or "quantmill"}

    @classmethod
    def for_location(cls, uri: str, details: dict[str, Any],
                     like: StorageBackend | None = None) -> S3Storage:
        """A backend that reads ``uri``: the endpoint recorded with the location, else the
        transfer settings and endpoint of ``like`` (the job's own s3 storage), else boto3's
        defaults."""
        location = parse_s3_uri(uri)
        base = like.config.model_dump() if isinstance(like, S3Storage) else {}
        options = {**base, "bucket": location.bucket}
        for name in ("endpoint_url", "region"):
            if details.get(name):
                options[name] = details[name]
        return cls(S3StorageConfig.model_validate(options))

    def holds(self, uri: str) -> bool:
        """An ``s3://`` URI of a blob or tree of this bucket and prefix's layout."""
        try:
            location = parse_s3_uri(uri)
        except QuantmillError:
            return False
        match = _layout(location.key)
        prefix = f"{self.config.prefix}/" if self.config.prefix else ""
        return (location.bucket == self.config.bucket and match is not None
                and match["root"] == prefix)

    def _key(self, kind: str, sha256: str) -> str:
        prefix = f"{self.config.prefix}/" if self.config.prefix else ""
        return f"{prefix}{kind}/sha256/{sha256[:2]}/{sha256}"

    # --- errors --------------------------------------------------------------------------------

    def _fail(self, exc: BaseException, action: str, uri: str) -> QuantmillError:
        if isinstance(exc, QuantmillError):
            return exc
        return describe(exc, action=action, uri=uri, endpoint=self.endpoint)

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """Fail early, and by name, on a bucket that does not exist (object HEADs would only
        say 404, like a missing key)."""
        if bucket in self._checked_buckets:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if is_missing(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise StorageError(f"S3 bucket '{bucket}' does not exist at "
                                   f"{self.endpoint or 'the default AWS endpoint'}") from None
            raise self._fail(exc, "use", uri) from None
        except BotoCoreError as exc:
            raise self._fail(exc, "use", uri) from None
        self._checked_buckets.add(bucket)

    # --- work areas of resumable jobs -----------------------------------------------------------

    def _work_root(self) -> str:
        prefix = self.config.prefix.strip("/")
        return f"{prefix}/work/" if prefix else "work/"

    def work_area(self, key: str) -> S3BlockStore:
        return S3BlockStore(self.client, self.config.bucket,
                            f"{self._work_root()}{work_key(key)}/")

    def work_area_keys(self) -> list[str]:
        try:
            return work_area_keys(self.client, self.config.bucket, self._work_root())
        except Exception as exc:
            raise self._fail(exc, "list", f"s3://{self.config.bucket}/{self._work_root()}") \
                from None

    # --- writing -------------------------------------------------------------------------------

    def put_tree(self, path: Path, consume: bool = False) -> StoredObject:
        path = Path(path)
        if not path.exists():
            raise QuantmillError(f"cannot store {path}: it does not exist")
        stored, blobs = self._put(path)
        if consume:
            self._keep_in_cache(path, stored, blobs)
        return stored

    def _keep_in_cache(self, path: Path, stored: StoredObject,
                       blobs: list[tuple[str, Path, str]]) -> None:
        """Move a consumed upload's files into the read cache (they were hashed on the way
        up), so a step reading the object back on this machine downloads nothing."""
        try:
            for _, file, sha in blobs:
                if self.cache.get(sha, tree=False) is None:
                    self.cache.add_blob(file, sha)
            if path.is_dir():
                self.cache.add_tree(stored.sha256, [(rel, sha) for rel, _, sha in blobs])
        except (OSError, ValueError):  # another file system, or a cache being evicted
            pass
        finally:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _put(self, path: Path) -> tuple[StoredObject, list[tuple[str, Path, str]]]:
        """Upload ``path``; the stored object and each file's (relative path, path, sha256)."""
        bucket = self.config.bucket
        self._check_bucket(bucket, f"s3://{bucket}/{self.config.prefix}")
        self.stats = TransferStats()
        settings = self.settings
        if path.is_file():
            digest = digest_file(path, settings)
            key = self._key("blobs", digest.sha256)
            self._upload_files([(path, key, digest)], f"upload {path.name}", digest.size)
            return (StoredObject(uri=f"s3://{bucket}/{key}", sha256=digest.sha256,
                                 size_bytes=digest.size), [(path.name, path, digest.sha256)])
        files = tree_files(path)
        entries: list[tuple[str, str, int]] = []

        def hashed() -> Iterator[tuple[Path, str, FileDigest]]:
            """Each new blob as soon as its hash is known: the next file is hashed while
            this one uploads, so the content address costs little extra time."""
            seen: set[str] = set()
            for rel, file in files:
                digest = digest_file(file, settings)
                entries.append((rel, digest.sha256, digest.size))
                if digest.sha256 not in seen:
                    seen.add(digest.sha256)
                    yield file, self._key("blobs", digest.sha256), digest

        self._upload_files(hashed(), f"upload {path.name}",
                           sum(file.stat().st_size for _, file in files))
        tree_sha = manifest_sha256(entries)
        text = manifest_text(entries).encode()
        manifest = self.cache.temp_path("manifest-")
        try:
            manifest.write_bytes(text)
            key = self._key("trees", tree_sha)
            self._upload_files([(manifest, key, digest_file(manifest, settings))], None,
                               len(text))
        finally:
            manifest.unlink(missing_ok=True)
        return (StoredObject(uri=f"s3://{bucket}/{key}", sha256=tree_sha,
                             size_bytes=sum(size for _, _, size in entries)),
                [(rel, file, sha) for (rel, file), (_, sha, _) in zip(files, entries,
                                                                       strict=True)])

    def _upload_files(self, files: Iterable[tuple[Path, str, FileDigest]],
                      description: str | None, total: int, bucket: str | None = None) -> None:
        """Upload ``(path, key, digest)`` items as ``files`` yields them: large ones one at a
        time (each sends its parts in parallel), small ones several at a time. The first
        failure stops the submissions; every started upload is waited for before it raises."""
        bucket, settings = bucket or self.config.bucket, self.settings
        bar = progress_bar(description, total) if description else contextlib.nullcontext(None)

        def one(item: tuple[Path, str, FileDigest]) -> None:
            file, key, digest = item
            try:
                upload_file(self.client, bucket, key, file, digest, settings, self.stats,
                            on_bytes=advance)
            except Exception as exc:
                raise self._fail(exc, "upload", f"s3://{bucket}/{key}") from None

        with bar as advance, ThreadPoolExecutor(max_workers=1) as large, \
                ThreadPoolExecutor(max_workers=FILE_CONCURRENCY) as small:
            futures: list[Future[None]] = []
            for item in files:
                pool = large if item[2].multipart else small
                futures.append(pool.submit(one, item))
                if any(f.done() and f.exception() is not None for f in futures):
                    break
            wait(futures)
            for future in futures:
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]

    def publish(self, path: Path, destination: str) -> StoredObject:
        """Write ``path`` as plain files under ``destination`` (``s3://bucket/prefix/``), for
        runtimes that load a Hugging Face directory and know nothing of quantmill. Files
        already there with the same content are not sent again; a destination holding other
        content is refused rather than mixed with it."""
        target = parse_s3_uri(destination)
        self._check_bucket(target.bucket, destination)
        root = path if path.is_dir() else path.parent
        files = tree_files(path) if path.is_dir() else [(path.name, path)]
        digests = {rel: digest_file(file, self.settings) for rel, file in files}
        existing = self._listing(target)
        foreign = sorted(rel for rel in existing if rel not in digests)
        if foreign:
            raise StorageError(f"cannot publish to {target.uri.rstrip('/')}/: it already holds "
                               f"other files (e.g. {foreign[0]}); choose an empty prefix")
        client, bucket = self.client, target.bucket
        for rel, digest in digests.items():
            if rel in existing:
                head = head_object(client, bucket, target.child(rel).key)
                if head is not None and (head.get("Metadata") or {}).get("sha256") \
                        != digest.sha256:
                    raise StorageError(f"cannot publish to {target.uri.rstrip('/')}/: {rel} "
                                       "there has other content; choose another prefix")
        self.stats = TransferStats()
        self._upload_files([(root / rel, target.child(rel).key, digest)
                            for rel, digest in digests.items()],
                           f"publish {path.name}", sum(d.size for d in digests.values()),
                           bucket=bucket)
        entries = [(rel, digest.sha256, digest.size) for rel, digest in digests.items()]
        uri = f"s3://{bucket}/{target.key.rstrip('/')}/"
        return StoredObject(uri=uri, sha256=manifest_sha256(entries) if path.is_dir()
                            else entries[0][1], size_bytes=sum(s for _, _, s in entries))

    # --- reading -------------------------------------------------------------------------------

    def fetch(self, uri: str, verify: bool = True) -> Path:
        """A local path with the content of ``uri`` (a layout object or any key or prefix),
        from the cache when an intact copy is there; the content is hash-checked either way."""
        location = parse_s3_uri(uri)
        self._check_bucket(location.bucket, uri)
        self.stats = TransferStats()
        try:
            match = _layout(location.key)
            if match is not None and match["kind"] == "blobs":
                return self._fetch_blob(location.bucket, location.key, match["sha"], None)
            if match is not None:
                return self._fetch_tree(location.bucket, match["root"], match["sha"])
            return self._fetch_external(location)
        except QuantmillError:
            raise
        except Exception as exc:
            raise self._fail(exc, "read", uri) from None

    def _fetch_blob(self, bucket: str, key: str, sha: str, size: int | None) -> Path:
        cached = self.cache.get(sha, tree=False)
        if cached is not None:
            return cached
        if size is None:
            head = head_object(self.client, bucket, key)
            if head is None:
                raise StorageObjectMissing(f"stored object is missing: s3://{bucket}/{key}")
            size = int(head["ContentLength"])
        from botocore.exceptions import ClientError

        target = self.cache.temp_path("blob-")
        try:
            with progress_bar(f"download {sha[:12]}", size) as advance:
                try:
                    actual = download_file(self.client, bucket, key, size, target,
                                           self.settings, self.stats, on_bytes=advance)
                except ClientError as exc:
                    if is_missing(exc):  # name the object, not the tree that lists it
                        raise StorageObjectMissing(
                            f"stored object is missing: s3://{bucket}/{key}") from None
                    raise
            if actual != sha:
                raise StorageIntegrityError(f"stored object s3://{bucket}/{key} was modified: "
                                            f"its content now hashes to {actual}")
            return self.cache.add_blob(target, sha)
        finally:
            target.unlink(missing_ok=True)

    def _manifest(self, bucket: str, root: str, sha: str) -> list[tuple[str, str, int]]:
        from botocore.exceptions import ClientError

        key = f"{root}trees/sha256/{sha[:2]}/{sha}"
        try:
            text = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if is_missing(exc):
                raise StorageObjectMissing(f"stored object is missing: s3://{bucket}/{key}") \
                    from None
            raise
        if hashlib.sha256(text).hexdigest() != sha:
            raise StorageIntegrityError(f"stored tree manifest s3://{bucket}/{key} was modified")
        return parse_manifest(text.decode())

    def _fetch_tree(self, bucket: str, root: str, sha: str) -> Path:
        cached = self.cache.get(sha, tree=True)
        if cached is not None:
            return cached
        entries = self._manifest(bucket, root, sha)
        unique = {blob: size for _, blob, size in entries}

        def one(item: tuple[str, int]) -> None:
            blob, size = item
            self._fetch_blob(bucket, f"{root}blobs/sha256/{blob[:2]}/{blob}", blob, size)

        part = self.settings.part_size
        for item in [i for i in unique.items() if i[1] > part]:  # parallel by range
            one(item)
        small = [i for i in unique.items() if i[1] <= part]
        if small:
            with ThreadPoolExecutor(max_workers=min(FILE_CONCURRENCY, len(small))) as pool:
                list(pool.map(one, small))
        return self.cache.add_tree(sha, [(rel, blob) for rel, blob, _ in entries])

    def _listing(self, location: S3Location) -> dict[str, dict[str, Any]]:
        """Objects under ``location`` read as a directory: relative path -> listing entry."""
        prefix = location.key.rstrip("/") + "/" if location.key else ""
        found: dict[str, dict[str, Any]] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                rel = item["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    found[rel] = item
        return found

    def _external_kind(self, location: S3Location) -> tuple[str, dict[str, dict[str, Any]]]:
        """``("file", {name: head})`` or ``("tree", listing)`` for a key outside the layout."""
        if location.key and not location.key.endswith("/"):
            head = head_object(self.client, location.bucket, location.key)
            if head is not None:
                name = location.key.rsplit("/", 1)[-1]
                return "file", {name: {"Key": location.key, "Size": head["ContentLength"],
                                       "ETag": head.get("ETag", "")}}
        listing = self._listing(location)
        if not listing:
            raise StorageObjectMissing(f"no object or prefix at {location.uri}")
        return "tree", listing

    def _fetch_external(self, location: S3Location) -> Path:
        kind, listing = self._external_kind(location)
        fingerprint = hashlib.sha256(json.dumps(
            [(rel, item["ETag"], int(item["Size"])) for rel, item in sorted(listing.items())]
        ).encode()).hexdigest()
        ref_key = hashlib.sha256(
            f"{self.endpoint}|{location.bucket}|{location.key}".encode()).hexdigest()
        ref = self.cache.read_ref(ref_key)
        if ref is not None and ref.get("fingerprint") == fingerprint:
            cached = self.cache.get(ref["sha256"], tree=ref["kind"] == "tree")
            if cached is not None:
                return cached
        files: list[tuple[str, str, int]] = []
        for rel, item in sorted(listing.items()):
            size = int(item["Size"])
            target = self.cache.temp_path("blob-")
            try:
                with progress_bar(f"download {rel}", size) as advance:
                    sha = download_file(self.client, location.bucket, item["Key"], size, target,
                                        self.settings, self.stats, on_bytes=advance)
                self.cache.add_blob(target, sha)
            finally:
                target.unlink(missing_ok=True)
            files.append((rel, sha, size))
        if kind == "file":
            sha = files[0][1]
            path = self.cache.get(sha, tree=False)
        else:
            sha = manifest_sha256(files)
            path = self.cache.add_tree(sha, [(rel, blob) for rel, blob, _ in files])
        if path is None:  # evicted between download and use: the bound is too small
            raise StorageError(f"the local cache ({self.cache.root}) is too small to hold "
                               f"{location.uri}; raise QUANTMILL_CACHE_MAX_GB")
        self.cache.write_ref(ref_key, {"fingerprint": fingerprint, "sha256": sha, "kind": kind,
                                       "uri": location.uri})
        return path

    # --- verification --------------------------------------------------------------------------

    def rehash(self, uri: str) -> tuple[str, int]:
        """``(sha256, size)`` of what the bucket holds at ``uri`` now, read from the bucket
        (never the cache); ``StorageObjectMissing`` when an object is gone."""
        location = parse_s3_uri(uri)
        self._check_bucket(location.bucket, uri)
        try:
            match = _layout(location.key)
            if match is not None and match["kind"] == "blobs":
                return self._stream(location.bucket, location.key)
            if match is not None:
                entries = self._manifest(location.bucket, match["root"], match["sha"])
                actual = []
                for rel, blob, _ in entries:
                    key = f"{match['root']}blobs/sha256/{blob[:2]}/{blob}"
                    sha, size = self._stream(location.bucket, key)
                    actual.append((rel, sha, size))
                return manifest_sha256(actual), sum(size for *_, size in actual)
            kind, listing = self._external_kind(location)
            if kind == "file":
                return self._stream(location.bucket, location.key)
            actual = [(rel, *self._stream(location.bucket, item["Key"]))
                      for rel, item in sorted(listing.items())]
            return manifest_sha256(actual), sum(size for *_, size in actual)
        except QuantmillError:
            raise
        except Exception as exc:
            raise self._fail(exc, "read", uri) from None

    def _stream(self, bucket: str, key: str) -> tuple[str, int]:
        from botocore.exceptions import ClientError

        try:
            return stream_sha256(self.client, bucket, key)
        except ClientError as exc:
            if is_missing(exc):
                raise StorageObjectMissing(f"stored object is missing: s3://{bucket}/{key}") \
                    from None
            raise


@hookimpl
def register_storage_backends() -> list[type[StorageBackend]]:
    return [S3Storage]
