"""Work areas of resumable jobs in S3: ``<prefix>/work/<key>/<name>``, one object per name.

A PUT replaces an object whole or not at all, which is the atomic write
``plugins.blockwise.resume.BlockStore`` asks for. Work objects are scratch: not
content-addressed, never registered, and removed once the job's run is registered.
"""

from __future__ import annotations

from typing import Any

from quantmill.storage.s3_client import is_missing


class S3BlockStore:
    """One job's work area under ``prefix`` (ending in ``/``) of ``bucket``."""

    def __init__(self, client: Any, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix

    def read(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket,
                                          Key=self.prefix + name)["Body"].read()
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def remove(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def clear(self) -> None:
        for key in self.keys():
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def keys(self) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self.bucket,
                                                           Prefix=self.prefix)
                for item in page.get("Contents", [])]


def work_area_keys(client: Any, bucket: str, root: str) -> list[str]:
    """The keys of the work areas under ``root`` (``<prefix>/work/``) that hold objects
    (servers with a file-system underneath, SeaweedFS among them, keep listing a prefix as a
    folder after its last object is deleted)."""
    paginator = client.get_paginator("list_objects_v2")
    found: set[str] = set()
    for page in paginator.paginate(Bucket=bucket, Prefix=root, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            inside = client.list_objects_v2(Bucket=bucket, Prefix=common["Prefix"], MaxKeys=1)
            if inside.get("KeyCount", len(inside.get("Contents", []))):
                found.add(common["Prefix"][len(root):].rstrip("/"))
    return sorted(found)
