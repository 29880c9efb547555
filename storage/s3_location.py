"""``s3://bucket/key`` URIs: parsed once, refused with one line when malformed.

A URI names a place, never a way in: user information (``s3://KEY:SECRET@bucket``), query
strings (presigned ``X-Amz-Credential`` ...) and fragments are refused, so a credential pasted
into a recipe cannot reach the registry, a log line or an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from quantmill.plugins.errors import ConfigError

#: S3's bucket naming rules (3-63 characters, lower case, digits, dots and hyphens).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (or key prefix; ``""`` is the whole bucket)."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Location:
        """The key ``name`` under this location, read as a directory."""
        base = self.key.rstrip("/")
        return S3Location(self.bucket, f"{base}/{name}" if base else name)


def is_s3_uri(value: str) -> bool:
    return value[:5].lower() == "s3://"


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/key`` -> ``S3Location``; a ``ConfigError`` naming the problem otherwise.

    The error messages repeat the URI only when it carries no credentials.
    """
    if not is_s3_uri(uri):
        raise ConfigError(f"not an s3:// URI: {uri!r}")
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise ConfigError("an s3:// URI must not carry credentials (user:secret@): use boto3's "
                          "standard chain (environment, profile or instance role)")
    if parts.query or parts.fragment:
        raise ConfigError("an s3:// URI must not have a query string or fragment (presigned "
                          "credentials do not belong in a recipe or the registry)")
    bucket = parts.netloc
    if not bucket:
        raise ConfigError(f"malformed s3:// URI {uri!r}: no bucket (expected s3://BUCKET/KEY)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(f"malformed s3:// URI {uri!r}: {bucket!r} is not a valid bucket name "
                          "(3-63 lower-case letters, digits, dots and hyphens)")
    key = parts.path.lstrip("/")
    if "//" in key or any(part in (".", "..") for part in key.split("/")):
        raise ConfigError(f"malformed s3:// URI {uri!r}: empty, '.' or '..' path segments")
    return S3Location(bucket, key)
