"""Where a checkpoint lives: a local directory, or an object-store prefix ``s3://bucket/prefix``.

    torchrun --nproc-per-node=8 -m launcher.save +model=llama output.dir=s3://my-bucket/ckpt/step-1000
    torchrun --nproc-per-node=8 -m launcher.load +model=llama source.path=s3://my-bucket/ckpt/step-1000

A URI stays the plain string it is from the command line to :mod:`hf_storage` (``pathlib.Path("s3://b/x")``
collapses the ``//`` into ``s3:/b/x`` and ``os.path.abspath`` would make it a local path); only its form is
checked here, with :meth:`hf_storage.objstore.Location.parse`, before any process group exists. Credentials
and the endpoint come from the standard AWS environment (``AWS_ENDPOINT_URL`` for an S3-compatible store,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance and pod roles), never from the
launcher's configs. The Hydra run directory and the log file stay local whatever the checkpoint's location
(``outputs/<app>/<run id>`` or ``$LAUNCHER_RUN_DIR``: ``configs/save.yaml``).

hf_storage is imported only when a value looks like a URI, so ``launcher.jobs`` stays free of torch.
"""

from __future__ import annotations

import os
import re

from .config import ConfigError

URI_FORM = "s3://BUCKET/PREFIX"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_SLASH_LOST = re.compile(r"s3:/(?!/)", re.IGNORECASE)  # what Path() or a shell join makes of s3://
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what botocore accepts; stores may be stricter


def looks_like_uri(value: str) -> bool:
    """True for ``scheme://...`` and for ``s3:/...`` (a URI that lost a slash): not a local path."""
    return bool(_SCHEME.match(value) or _S3_SLASH_LOST.match(value))


def is_uri(value: object) -> bool:
    """True for an object-store URI the library takes (``s3://...``; its form is checked by :func:`resolve`)."""
    return isinstance(value, str) and looks_like_uri(value) and _objstore().is_uri(value)


def _objstore():
    from hf_storage import objstore

    return objstore


def check_uri(key: str, value: str) -> str:
    """``value`` (of the config key ``key``; "": a bare argument) as a normalised ``s3://bucket/prefix`` string;
    a one-line :class:`ConfigError` naming the value and the fix if it is not one."""
    objstore = _objstore()
    named, fix = (f"{key}={value!r}", f"{key}={URI_FORM}") if key else (repr(value), URI_FORM)
    scheme = _SCHEME.match(value)
    if not objstore.is_uri(value):
        if scheme is None:
            raise ConfigError(f"{named} has lost a slash of its scheme: pass {fix}")
        raise ConfigError(
            f"{named}: {scheme.group(1)}:// is not supported; pass {fix} (any S3-compatible store, its endpoint "
            "from AWS_ENDPOINT_URL) or a local directory"
        )
    from hf_storage.errors import HFStorageError

    try:
        location = objstore.Location.parse(value)
    except HFStorageError:
        location = None
    if location is None or not _BUCKET.fullmatch(location.bucket):
        raise ConfigError(
            f"{named} is not a valid object-store URI: pass {fix} (a bucket name, then the checkpoint's prefix, "
            "without empty, '.' or '..' parts)"
        )
    return location.uri


def resolve(key: str, value: str) -> str:
    """Where ``value`` (of the config key ``key``) points, as hf_storage takes it: a checked ``s3://`` URI,
    kept a string, or the absolute local path."""
    return check_uri(key, value) if looks_like_uri(value) else os.path.abspath(value)
