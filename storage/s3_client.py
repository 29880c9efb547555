"""boto3 clients for the ``s3`` backend, and botocore's errors turned into one clear line.

Credentials come only from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` or the ``profile`` setting, an instance or task role). Nothing here reads,
stores or prints them, and the error messages are written from the error *code*, never from
request data.

Why these client settings:
- ``retries``: botocore's *standard* mode retries throttling, 5xx and connection errors with
  exponential backoff and jitter, ``max_attempts`` times in all.
- short ``connect_timeout``: an unreachable endpoint fails within seconds instead of hanging.
- ``request_checksum_calculation="when_required"``: recent botocore sends CRC checksums on
  every upload by default, which some S3-compatible servers reject; quantmill sends the checksum
  its ``checksum`` setting names, itself, and nothing else.
- path-style addressing with a custom endpoint (``addressing_style: auto``): S3-compatible
  servers on an IP address or a single host name cannot serve ``bucket.host`` names.
- a body that carries a SHA256 checksum is not hashed a second time for the signature
  (``_sign_checksum_not_payload``). Over plain HTTP, SigV4 would otherwise sign the payload's
  own sha256, computed again by the client and verified again by the server. The signed
  ``x-amz-checksum-sha256`` header already binds the body: the server checks the body against
  it, and the signature covers the header. botocore makes the same choice over TLS. Bodies with
  only a CRC32 or MD5, or none, keep their signed payload hash, because a CRC authenticates
  nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from quantmill.storage.errors import StorageError, StorageObjectMissing

_SHA256_CHECKSUM_HEADER = "x-amz-checksum-sha256"

Checksum = Literal["sha256", "crc32", "md5", "off"]

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
               "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def make_client(*, endpoint_url: str | None, region: str | None, profile: str | None,
                addressing_style: str, max_attempts: int, connect_timeout: float,
                read_timeout: float, max_pool_connections: int) -> Any:
    """A thread-safe S3 client (one per backend; transfers share it across their threads)."""
    import boto3
    from botocore.config import Config

    style = addressing_style
    if style == "auto":
        style = "path" if endpoint_url else "auto"
    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
    client = session.client("s3", endpoint_url=endpoint_url, config=config)
    unsigned_body = config.merge(Config(s3={"addressing_style": style,
                                            "payload_signing_enabled": False}))
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-sign.s3.{operation}",
                                    _sign_checksum_not_payload(unsigned_body))
    return client


def _sign_checksum_not_payload(unsigned_body: Any) -> Any:
    """A ``before-sign`` handler: a request whose body carries a SHA256 checksum is signed
    with ``UNSIGNED-PAYLOAD`` (the checksum header, signed and verified, binds the body)."""

    def handler(request: Any, **_: Any) -> None:
        if _SHA256_CHECKSUM_HEADER in {name.lower() for name in request.headers}:
            request.context["client_config"] = unsigned_body

    return handler


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    if not code:
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def is_missing(exc: BaseException) -> bool:
    """True for 'no such key' answers (HEAD answers a bare 404)."""
    return error_code(exc) in _MISSING_KEY_CODES


def describe(exc: BaseException, *, action: str, uri: str, endpoint: str | None) -> StorageError:
    """One line naming what failed, where, and what to do; raise it ``from None``."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
        ReadTimeoutError,
    )

    where = endpoint or "the default AWS endpoint"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(f"no S3 credentials found for {uri}: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role")
    if isinstance(exc, ProfileNotFound):
        return StorageError(f"the AWS profile named for {uri} does not exist in ~/.aws/config")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return StorageError(f"cannot reach the S3 endpoint {where} to {action} {uri} "
                            "(connection failed after retries)")
    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"the S3 endpoint {where} stopped answering while trying to "
                            f"{action} {uri} (read timeout after retries)")
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code == "NoSuchBucket":
            bucket = uri.split("/")[2] if uri.startswith("s3://") else uri
            return StorageError(f"S3 bucket '{bucket}' does not exist at {where}")
        if code in _AUTH_CODES:
            return StorageError(f"S3 at {where} refused the credentials to {action} {uri} "
                                f"({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                "the profile")
        if code in _MISSING_KEY_CODES:
            return StorageObjectMissing(f"stored object is missing: {uri}")
        return StorageError(f"S3 at {where} failed to {action} {uri}: {code}")
    return StorageError(f"S3 at {where} failed to {action} {uri}: {type(exc).__name__}")
