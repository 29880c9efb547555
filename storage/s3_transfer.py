"""Moving one file to or from S3: parallel multipart uploads that resume, and parallel ranged
downloads that hash as they go.

Why not boto3's transfer manager for uploads: it cannot resume. A killed 10 GB upload would be
sent again from its first byte, and the issue this serves asks that a rerun send only what is
missing. So uploads are written against the S3 API directly, with the same design as the
transfer manager (fixed-size parts sent by a thread pool over one thread-safe client) plus:

- every part carries the checksum the ``checksum`` setting names (``x-amz-checksum-sha256`` by
  default, or CRC32, or ``Content-MD5``), which the server verifies before it accepts the part.
  The part checksums are computed in the same read of the file as its content hash
  (``digest_file``, on a second thread), so what the server verifies is exactly what was hashed:
  a file changed after it was hashed is refused by the server instead of stored under the old
  hash, and the upload itself hashes nothing;
- an object whose key already exists with the right size and ``sha256`` metadata is not sent
  (keys are content hashes, so a present key is the content);
- an unfinished multipart upload of the same key, left by an attempt that could not abort it
  (the process was killed or the server went away), is resumed: its listed parts are compared
  with the local file's parts (ETag = MD5 of the part, or the part's SHA256 where the server
  lists it) and only the missing or different parts are sent;
- on failure the upload is aborted if the server can still be reached (if not, the next attempt
  resumes it, and completing it leaves nothing behind);
- the finished object is confirmed by a HEAD (size, sha256 metadata, and the server's own
  full-object or composite checksum where it reports one) before the caller may record it.

Downloads split the object into ranges fetched in parallel and written in place; a hashing
thread follows the ranges in order, so the content is hashed while it arrives and never read
twice.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.storage.errors import StorageIntegrityError

MIB = 1 << 20
#: S3 allows at most 10,000 parts per upload and at least 5 MiB per part (but the last).
MAX_PARTS = 10_000
MIN_PART = 5 * MIB

_CHECKSUM_FIELDS = {"sha256": "ChecksumSHA256", "crc32": "ChecksumCRC32"}
_ALGORITHMS = {"sha256": "SHA256", "crc32": "CRC32"}


@dataclass(frozen=True)
class TransferSettings:
    """How objects move: part size, parallelism and the checksum the server verifies."""

    part_size: int = 16 * MIB
    max_concurrency: int = 8
    checksum: str = "sha256"

    def part_size_for(self, size: int) -> int:
        """The configured part size, grown (in MiB steps) until the file fits 10,000 parts."""
        part = max(self.part_size, MIN_PART)
        while -(-size // part) > MAX_PARTS:
            part += MIB * max(1, part // (8 * MIB))
        return part


@dataclass
class TransferStats:
    """What a transfer actually sent or read, for reruns and benchmarks to show."""

    bytes_sent: int = 0
    bytes_received: int = 0
    objects_sent: int = 0
    objects_skipped: int = 0
    parts_sent: int = 0
    parts_reused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ("bytes_sent", "bytes_received",
                                                       "objects_sent", "objects_skipped",
                                                       "parts_sent", "parts_reused")}

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def part_checksum(data: bytes | memoryview, mode: str) -> dict[str, str]:
    """The request fields that make the server verify ``data`` (empty for ``off``)."""
    if mode == "sha256":
        return {"ChecksumSHA256": _b64(hashlib.sha256(data).digest())}
    if mode == "crc32":
        return {"ChecksumCRC32": _b64(zlib.crc32(data).to_bytes(4, "big"))}
    if mode == "md5":
        return {"ContentMD5": _b64(hashlib.md5(data).digest())}
    return {}


@dataclass(frozen=True)
class FileDigest:
    """What one read of a file yields for its upload: its content hash (its key), its size, the
    part size its upload will use, and each part's checksum request fields (``checksum``
    setting; empty dicts for ``off``)."""

    sha256: str
    size: int
    part_size: int
    part_checksums: tuple[dict[str, str], ...]

    @property
    def multipart(self) -> bool:
        return len(self.part_checksums) > 1


#: Parts read ahead of the checksum thread: bounds memory to a few parts per file.
_READ_AHEAD = 2


def digest_file(path: Path, settings: TransferSettings) -> FileDigest:
    """Hash ``path`` once for its upload: the content sha256 on this thread while a second
    thread computes the checksum of each part as the upload will cut it (hashlib releases the
    GIL, so the two use two cores)."""
    size = path.stat().st_size
    part_size = settings.part_size_for(size) if size > settings.part_size else max(size, 1)
    content = hashlib.sha256()
    read = 0
    pending: list[Future[dict[str, str]]] = []
    single_sha256 = size <= part_size and settings.checksum == "sha256"
    with ThreadPoolExecutor(max_workers=1) as checksums, path.open("rb") as handle:
        while chunk := handle.read(part_size):
            read += len(chunk)
            if not single_sha256:
                pending.append(checksums.submit(part_checksum, chunk, settings.checksum))
            content.update(chunk)
            if len(pending) > _READ_AHEAD:
                pending[-_READ_AHEAD - 1].result()
        parts = [future.result() for future in pending]
    if read != size:
        raise StorageIntegrityError(f"{path} changed size while it was hashed for upload")
    if single_sha256:
        parts = [{"ChecksumSHA256": _b64(content.digest())}]
    return FileDigest(content.hexdigest(), size, part_size, tuple(parts or [{}]))


def _read(fd: int, offset: int, length: int) -> bytes:
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise StorageIntegrityError("a file being uploaded became shorter while it was read")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def object_matches(head: dict[str, Any], sha256: str, size: int) -> bool:
    """A HEAD answer describes the content ``sha256`` of ``size`` bytes: right length, the
    sha256 quantmill recorded at upload, and (for single-part objects stored with a SHA256
    checksum) the server's own full-object checksum."""
    if int(head.get("ContentLength", -1)) != size:
        return False
    if (head.get("Metadata") or {}).get("sha256") != sha256:
        return False
    server = head.get("ChecksumSHA256")
    if server and "-" not in server and head.get("ChecksumType", "FULL_OBJECT") != "COMPOSITE":
        return server == _b64(bytes.fromhex(sha256))
    return True


def upload_file(client: Any, bucket: str, key: str, path: Path, digest: FileDigest,
                settings: TransferSettings, stats: TransferStats,
                on_bytes: Callable[[int], None] | None = None) -> None:
    """Make ``s3://bucket/key`` hold ``path`` as ``digest`` describes it, confirmed by a HEAD.

    Raises botocore's errors as they come (the caller turns them into one line).
    """
    sha256, size = digest.sha256, digest.size
    existing = head_object(client, bucket, key)
    if existing is not None and object_matches(existing, sha256, size):
        stats.add(objects_skipped=1)
        return
    metadata = {"sha256": sha256}
    if not digest.multipart:
        data = path.read_bytes()
        if settings.checksum != "sha256" and hashlib.sha256(data).hexdigest() != sha256:
            # a SHA256 part checksum makes the server refuse changed bytes; others may not
            raise StorageIntegrityError(f"{path} changed while it was being stored")
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata,
                          **digest.part_checksums[0], **_algorithm(settings.checksum))
        stats.add(bytes_sent=size, objects_sent=1, parts_sent=1)
        if on_bytes:
            on_bytes(size)
    else:
        _multipart(client, bucket, key, path, digest, metadata, settings, stats, on_bytes)
    confirmed = head_object(client, bucket, key)
    if confirmed is None or not object_matches(confirmed, sha256, size):
        raise StorageIntegrityError(f"s3://{bucket}/{key} does not hold the content just "
                                    "uploaded (size or sha256 differ)")


def _algorithm(mode: str) -> dict[str, str]:
    return {"ChecksumAlgorithm": _ALGORITHMS[mode]} if mode in _ALGORITHMS else {}


def head_object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD answer, or None when the key does not exist."""
    from botocore.exceptions import ClientError

    from quantmill.storage.s3_client import is_missing

    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def _multipart(client: Any, bucket: str, key: str, path: Path, digest: FileDigest,
               metadata: dict[str, str], settings: TransferSettings, stats: TransferStats,
               on_bytes: Callable[[int], None] | None) -> None:
    size, part_size = digest.size, digest.part_size
    count = len(digest.part_checksums)
    with path.open("rb") as handle:
        fd = handle.fileno()
        upload_id, done = _resumable(client, bucket, key, fd, digest, settings, stats, on_bytes)
        if upload_id is None:
            upload_id = client.create_multipart_upload(
                Bucket=bucket, Key=key, Metadata=metadata, **_algorithm(settings.checksum)
            )["UploadId"]
        try:
            todo = [n for n in range(1, count + 1) if n not in done]

            def send(number: int) -> tuple[int, dict[str, str]]:
                offset = (number - 1) * part_size
                data = _read(fd, offset, min(part_size, size - offset))
                checksum = digest.part_checksums[number - 1]
                answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                            PartNumber=number, Body=data, **checksum)
                stats.add(bytes_sent=len(data), parts_sent=1)
                if on_bytes:
                    on_bytes(len(data))
                entry = {"PartNumber": number, "ETag": answer["ETag"]}
                field_name = _CHECKSUM_FIELDS.get(settings.checksum)
                if field_name:
                    entry[field_name] = checksum[field_name]
                return number, entry

            for number, entry in _parallel(send, todo, settings.max_concurrency):
                done[number] = entry
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [done[n] for n in range(1, count + 1)]},
            )
        except BaseException:
            _abort_quietly(client, bucket, key, upload_id)
            raise
    stats.add(objects_sent=1)


def _parallel(func: Callable[[int], Any], items: list[int], workers: int) -> list[Any]:
    """``func`` over ``items`` on a thread pool; the first failure cancels what has not
    started and is raised."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(func, item) for item in items]
        finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in finished:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]


def _abort_quietly(client: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort an unfinished upload; if the server cannot be reached the next attempt resumes
    the upload instead, so this must not hide the original error."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception:  # noqa: BLE001 - the original failure is what the caller must see
        pass


def _resumable(client: Any, bucket: str, key: str, fd: int, digest: FileDigest,
               settings: TransferSettings, stats: TransferStats,
               on_bytes: Callable[[int], None] | None) -> tuple[str | None, dict[int, dict]]:
    """An unfinished upload of ``key`` to continue and its parts that match the file; other
    unfinished uploads of the key (leftovers of concurrent attempts) are aborted."""
    uploads = [u for u in client.list_multipart_uploads(Bucket=bucket, Prefix=key)
               .get("Uploads", []) if u["Key"] == key]
    uploads.sort(key=lambda u: u["Initiated"], reverse=True)
    size, part_size = digest.size, digest.part_size
    chosen: str | None = None
    done: dict[int, dict] = {}
    field_name = _CHECKSUM_FIELDS.get(settings.checksum)
    for upload in uploads:
        if chosen is not None:
            _abort_quietly(client, bucket, key, upload["UploadId"])
            continue
        listed = _list_parts(client, bucket, key, upload["UploadId"])
        for part in listed:
            number, offset = part["PartNumber"], (part["PartNumber"] - 1) * part_size
            expected = min(part_size, size - offset) if offset < size else -1
            if int(part["Size"]) != expected:
                continue
            data = _read(fd, offset, expected)
            if listed_part_matches(part, data):
                entry = {"PartNumber": number, "ETag": part["ETag"]}
                if field_name:
                    entry[field_name] = digest.part_checksums[number - 1][field_name]
                done[number] = entry
        if done:
            chosen = upload["UploadId"]
            stats.add(parts_reused=len(done))
            if on_bytes:
                on_bytes(sum(min(part_size, size - (n - 1) * part_size) for n in done))
        else:
            _abort_quietly(client, bucket, key, upload["UploadId"])
    return chosen, done


def listed_part_matches(part: dict[str, Any], data: bytes) -> bool:
    """A part of an unfinished upload holds ``data``: by the SHA256 the server lists with it
    (AWS does for uploads made with checksums), else by its ETag, the part's MD5 on AWS and on
    the S3-compatible servers tried (an ETag of any other form never matches)."""
    if part.get("ChecksumSHA256"):
        return part["ChecksumSHA256"] == _b64(hashlib.sha256(data).digest())
    return str(part.get("ETag", "")).strip('"') == hashlib.md5(data).hexdigest()


def _list_parts(client: Any, bucket: str, key: str, upload_id: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    marker = 0
    while True:
        page = client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id,
                                 PartNumberMarker=marker)
        parts.extend(page.get("Parts", []))
        if not page.get("IsTruncated"):
            return parts
        marker = int(page["NextPartNumberMarker"])


class _InOrderHasher:
    """Hashes ranges strictly in order while they are still arriving.

    Each range's fetcher hands over its chunks as they come off the socket; the hashing thread
    consumes range 0's chunks as they arrive, then range 1's (mostly arrived by then), and so on,
    so hashing overlaps the transfer from its first megabyte. Memory is bounded by the ranges in
    flight: a range's chunks are dropped once hashed.
    """

    def __init__(self, count: int) -> None:
        self.digest = hashlib.sha256()
        self.chunks: list[list[bytes]] = [[] for _ in range(count)]
        self.complete = [False] * count
        self.failed = False
        self.ready = threading.Condition()
        self.hashed_ranges = 0  # ranges fully hashed: the fetchers wait on this for memory

    def add(self, number: int, chunk: bytes) -> None:
        with self.ready:
            self.chunks[number].append(chunk)
            self.ready.notify_all()

    def close(self, number: int) -> None:
        with self.ready:
            self.complete[number] = True
            self.ready.notify_all()

    def fail(self) -> None:
        with self.ready:
            self.failed = True
            self.ready.notify_all()

    def run(self) -> None:
        for number in range(len(self.chunks)):
            while True:
                with self.ready:
                    while not self.chunks[number] and not self.complete[number] \
                            and not self.failed:
                        self.ready.wait()
                    if self.failed:
                        return
                    taken, self.chunks[number] = self.chunks[number], []
                    done = self.complete[number] and not taken
                if done:
                    break
                for chunk in taken:
                    self.digest.update(chunk)  # releases the GIL: overlaps the fetchers
            with self.ready:
                self.hashed_ranges = number + 1
                self.ready.notify_all()

    def wait_for_room(self, number: int, ahead: int) -> None:
        """Block the fetch of range ``number`` until at most ``ahead`` ranges wait unhashed."""
        with self.ready:
            while number - self.hashed_ranges >= ahead and not self.failed:
                self.ready.wait(timeout=1)


def download_file(client: Any, bucket: str, key: str, size: int, target: Path,
                  settings: TransferSettings, stats: TransferStats,
                  on_bytes: Callable[[int], None] | None = None) -> str:
    """Write the object to ``target`` and return the sha256 of what arrived."""
    part_size = max(settings.part_size, MIN_PART)
    count = max(1, -(-size // part_size))
    workers = min(settings.max_concurrency, count)
    hasher = _InOrderHasher(count)

    with target.open("wb") as handle:
        fd = handle.fileno()
        if size:
            os.ftruncate(fd, size)

        def fetch(number: int) -> None:
            try:
                fetch_range(number)
            except BaseException:
                hasher.fail()  # the hasher and the fetchers waiting for it stop at once
                raise

        def fetch_range(number: int) -> None:
            hasher.wait_for_room(number, 2 * workers)
            start = number * part_size
            end = min(size, start + part_size) - 1
            ranged = {"Range": f"bytes={start}-{end}"} if size else {}
            body = client.get_object(Bucket=bucket, Key=key, **ranged)["Body"]
            position = start
            for chunk in body.iter_chunks(chunk_size=MIB):
                os.pwrite(fd, chunk, position)
                position += len(chunk)
                stats.add(bytes_received=len(chunk))
                if on_bytes:
                    on_bytes(len(chunk))
                hasher.add(number, chunk)
            if size and position != end + 1:
                raise StorageIntegrityError(f"s3://{bucket}/{key} changed during the download")
            hasher.close(number)

        thread = threading.Thread(target=hasher.run, daemon=True)
        thread.start()
        try:
            _parallel(fetch, list(range(count)), workers)
        except BaseException:
            hasher.fail()
            raise
        finally:
            thread.join()
    return hasher.digest.hexdigest()


def stream_sha256(client: Any, bucket: str, key: str) -> tuple[str, int]:
    """Hash an object as the server sends it, without writing it anywhere (``verify``)."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    digest, size = hashlib.sha256(), 0
    for chunk in body.iter_chunks(chunk_size=MIB):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
