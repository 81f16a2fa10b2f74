"""Object stores (``s3://bucket/prefix``): the URI, the client, and every request the package makes to one.

The client is boto3's: it is the one Python client that exposes the whole S3 multipart API (an upload id
that many processes upload parts under, ``ListMultipartUploads`` to find what a killed save left) and the
standard credential and endpoint chain (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, instance and pod roles,
``~/.aws/config``). Requests are retried by botocore's ``standard`` mode (exponential backoff with jitter on
503 SlowDown, throttling and dropped connections); response bodies, which botocore does not retry, are
re-requested here. What is left after the retries becomes a named error: :class:`ObjectStoreThrottledError`,
:class:`ObjectStoreUnreachableError`, :class:`ObjectChangedError`, or :class:`ObjectStoreError`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import settings
from .errors import CheckpointFormatError, HFStorageError

SCHEMES = ("s3://",)
MIN_PART = 5 * 2**20  # the store's minimum size of every part but the last
MAX_PARTS = 10_000  # the store's maximum number of parts of one upload
T = TypeVar("T")


class ObjectStoreError(HFStorageError):
    """A request to the object store failed (the message names the request, the object and the cause)."""


class ObjectStoreThrottledError(ObjectStoreError):
    """The store kept answering 503 SlowDown / throttling after every retry."""


class ObjectStoreUnreachableError(ObjectStoreError):
    """The endpoint cannot be reached (wrong ``AWS_ENDPOINT_URL``, no network, DNS)."""


class ObjectChangedError(ObjectStoreError, CheckpointFormatError):
    """An object changed (its ETag) while it was being read: another save replaced the checkpoint."""


def is_uri(path: object) -> bool:
    """True for an object-store URI (``s3://...``); False for local paths."""
    return isinstance(path, str) and path.startswith(SCHEMES)


@dataclass(frozen=True)
class Location:
    """A checkpoint 'directory' in a bucket: objects ``<prefix>/<name>``."""

    bucket: str
    prefix: str  # without leading or trailing slashes; may be empty (the bucket's root)

    @classmethod
    def parse(cls, uri: str) -> Location:
        if not is_uri(uri):
            raise HFStorageError(f"{uri!r} is not an object-store URI; use s3://bucket/prefix")
        rest = uri.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not bucket or "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
            raise HFStorageError(f"{uri!r} is not a valid object-store URI; use s3://bucket/prefix")
        return cls(bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]

    def sibling(self, name: str) -> str:
        """The key of ``name`` beside this prefix (in its parent)."""
        parent = self.prefix.rsplit("/", 1)[0] if "/" in self.prefix else ""
        return f"{parent}/{name}" if parent else name


# -- the client ------------------------------------------------------------------------------------

_CLIENTS: dict[tuple[int, str | None, int], Any] = {}
_LOCK = threading.Lock()


def client():
    """This process's S3 client (thread-safe; made once per process, endpoint and retry setting, from the
    standard chain)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (os.getpid(), endpoint, settings.s3_attempts())
    with _LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = _make_client()
        return _CLIENTS[key]


def _make_client():
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ObjectStoreError("object-store paths need boto3: pip install boto3") from e
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.s3_attempts()},
        max_pool_connections=64,
        connect_timeout=10,
        read_timeout=120,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", config=config)


def _code(e: BaseException | None) -> str:
    resp = getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def _status(e: BaseException | None) -> int:
    resp = getattr(e, "response", None) or {}
    return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable", "503"}


def translate(e: BaseException, what: str) -> HFStorageError:
    """The named error for a failed request (``what``: the request and object, for the message)."""
    from botocore import exceptions as bx  # type: ignore[import-untyped]

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default"
    if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return ObjectStoreUnreachableError(
            f"{what}: cannot reach the object store at {endpoint} ({e}); check AWS_ENDPOINT_URL and the network"
        )
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return ObjectStoreError(
            f"{what}: no credentials found ({e}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or run where an instance or pod role applies"
        )
    code, status = _code(e), _status(e)
    if code in _THROTTLED or status == 503:
        return ObjectStoreThrottledError(
            f"{what}: the object store kept throttling ({code or status}) after {settings.s3_attempts()} attempts "
            "with backoff; lower thread_count (fewer requests at once), or raise HF_STORAGE_S3_ATTEMPTS"
        )
    if code == "PreconditionFailed" or status == 412:
        return ObjectChangedError(f"{what}: the object changed while it was read (another save replaced it)")
    if code in ("NoSuchBucket",):
        return ObjectStoreError(f"{what}: the bucket does not exist; create it or fix the URI")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return ObjectStoreError(f"{what}: access denied ({code}); check the credentials and the bucket's policy")
    return ObjectStoreError(f"{what}: {type(e).__name__}: {e}")


def call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` (a client method: botocore retries it), failures translated to named errors."""
    from botocore import exceptions as bx

    try:
        return fn(*args, **kwargs)
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise translate(e, what) from e


def missing(e: BaseException) -> bool:
    """True for a 404 / NoSuchKey / NoSuchUpload (an absent object or upload)."""
    cause = e.__cause__ if isinstance(e, ObjectStoreError) else e
    return _code(cause) in ("NoSuchKey", "404", "NotFound", "NoSuchUpload") or _status(cause) == 404


# -- small objects ---------------------------------------------------------------------------------


def head(loc: Location, name: str) -> dict | None:
    """``{"size", "etag"}`` of an object, or None when it does not exist."""
    try:
        r = call(f"HEAD {loc.uri}/{name}", client().head_object, Bucket=loc.bucket, Key=loc.key(name))
    except ObjectStoreError as e:
        if missing(e):
            return None
        raise
    return {"size": int(r["ContentLength"]), "etag": r["ETag"]}


def get_bytes(loc: Location, name: str, limit: int) -> bytes | None:
    """A whole small object (at most ``limit`` bytes), or None when it does not exist."""
    info = head(loc, name)
    if info is None:
        return None
    if info["size"] > limit:
        raise CheckpointFormatError(f"{loc.uri}/{name}: {info['size']} bytes exceeds the {limit}-byte limit")
    buf = bytearray(info["size"])
    if info["size"]:
        read_into(loc, name, info["etag"], memoryview(buf), 0)
    return bytes(buf)


def put_bytes(loc: Location, name: str, data: bytes, if_absent: bool = False) -> bool:
    """Write a small object. With ``if_absent``, only if none exists: False when one does (conditional PUT)."""
    kw: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
    try:
        call(f"PUT {loc.uri}/{name}", client().put_object, Bucket=loc.bucket, Key=loc.key(name), Body=data, **kw)
    except ObjectStoreError as e:
        if if_absent and _code(e.__cause__) in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def delete(loc: Location, name: str) -> None:
    call(f"DELETE {loc.uri}/{name}", client().delete_object, Bucket=loc.bucket, Key=loc.key(name))


def listing(loc: Location) -> list[str]:
    """Names of the objects directly under the prefix (no deeper)."""
    names: list[str] = []
    base = loc.key("")
    kw: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": base, "Delimiter": "/"}
    while True:
        r = call(f"LIST {loc.uri}/", client().list_objects_v2, **kw)
        names += [o["Key"][len(base) :] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return names
        kw["ContinuationToken"] = r["NextContinuationToken"]


# -- ranged reads ----------------------------------------------------------------------------------


def read_into(loc: Location, name: str, etag: str, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` with the object's bytes from ``offset``: one ranged GET, only if the object still has
    ``etag``. A body cut short (dropped connection) is requested again, with backoff."""
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    n = len(buf)
    if n == 0:
        return
    what = f"GET {loc.uri}/{name} bytes {offset}-{offset + n - 1}"
    attempts = settings.s3_attempts()
    for attempt in range(1, attempts + 1):
        r = call(
            what,
            client().get_object,
            Bucket=loc.bucket,
            Key=loc.key(name),
            Range=f"bytes={offset}-{offset + n - 1}",
            IfMatch=etag,
        )
        try:
            got = _read_body(r["Body"], buf)
        except (bx.BotoCoreError, ux.HTTPError, ConnectionError, TimeoutError) as e:
            if attempt == attempts:
                raise ObjectStoreError(f"{what}: the connection kept dropping ({e}) after {attempts} attempts") from e
            backoff(attempt)
            continue
        if got != n:
            raise CheckpointFormatError(
                f"{what}: short read, {got} of {n} bytes (the object is shorter than its header says?)"
            )
        return


def _read_body(body, buf: memoryview) -> int:
    got = 0
    try:
        while got < len(buf):
            data = body.read(min(len(buf) - got, 8 * 2**20))
            if not data:
                break
            buf[got : got + len(data)] = data
            got += len(data)
    finally:
        body.close()
    return got


def backoff(attempt: int, base: float = 0.05, cap: float = 5.0) -> None:
    """Sleep before retry ``attempt`` (1-based): exponential with full jitter."""
    time.sleep(random.uniform(0, min(cap, base * 2**attempt)))


# -- multipart uploads -----------------------------------------------------------------------------


def part_size(file_size: int) -> int:
    """The part size for a file: at least the configured size (``HF_STORAGE_PART_SIZE``, >= 5 MiB), and large
    enough that no file needs more than 10,000 parts; a multiple of 1 MiB."""
    mib = 2**20
    need = -(-file_size // MAX_PARTS)
    return max(settings.part_size(), -(-need // mib) * mib)


def create_upload(loc: Location, name: str) -> str:
    r = call(
        f"create multipart upload of {loc.uri}/{name}",
        client().create_multipart_upload,
        Bucket=loc.bucket,
        Key=loc.key(name),
        ContentType="application/octet-stream",
    )
    return r["UploadId"]


def upload_part(loc: Location, name: str, upload_id: str, number: int, body) -> str:
    """Upload part ``number`` (from 1) of an upload; returns its ETag."""
    r = call(
        f"upload part {number} of {loc.uri}/{name}",
        client().upload_part,
        Bucket=loc.bucket,
        Key=loc.key(name),
        UploadId=upload_id,
        PartNumber=number,
        Body=body,
    )
    return r["ETag"]


def complete_upload(loc: Location, name: str, upload_id: str, etags: list[str]) -> str:
    """Complete an upload from its parts' ETags; returns the object's ETag."""
    parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
    r = call(
        f"complete multipart upload of {loc.uri}/{name}",
        client().complete_multipart_upload,
        Bucket=loc.bucket,
        Key=loc.key(name),
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
    )
    return r["ETag"]


def abort_upload(loc: Location, key: str, upload_id: str) -> None:
    """Abort one upload (``key``: the full object key); one already gone is fine."""
    try:
        call(
            f"abort multipart upload of s3://{loc.bucket}/{key}",
            client().abort_multipart_upload,
            Bucket=loc.bucket,
            Key=key,
            UploadId=upload_id,
        )
    except ObjectStoreError as e:
        if not missing(e):
            raise


def uploads(loc: Location) -> list[tuple[str, str]]:
    """``(key, upload id)`` of every multipart upload in progress directly under the prefix."""
    base = loc.key("")
    out: list[tuple[str, str]] = []
    kw: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": base}
    while True:
        r = call(f"list multipart uploads of {loc.uri}/", client().list_multipart_uploads, **kw)
        out += [(u["Key"], u["UploadId"]) for u in r.get("Uploads", []) if "/" not in u["Key"][len(base) :]]
        if not r.get("IsTruncated"):
            return out
        kw["KeyMarker"], kw["UploadIdMarker"] = r.get("NextKeyMarker", ""), r.get("NextUploadIdMarker", "")
