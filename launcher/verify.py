"""Verify a checkpoint the launcher wrote: structure, spec conformance, total size and every CRC-32.

    python -m launcher.verify output.dir=/ckpt/step-1000 [--strict] [--no-checksums]
    python -m launcher.verify /ckpt/step-1000
    python -m launcher.verify output.dir=s3://my-bucket/ckpt/step-1000

The same check as ``python -m hf_storage verify DIR``, addressed the way the launcher's configs name the
checkpoint (``output.dir=`` as in ``launcher.save``, or ``source.path=`` as in ``launcher.load``). Exit
status: 0 when the checkpoint is sound, 1 on any problem (a path that is not a directory: one line, as in
the other apps), 2 on a usage error. An object-store prefix (``s3://bucket/prefix``) is checked for its form
(a malformed URI: one line) and then verified through :func:`hf_storage.verify.verify`, credentials and endpoint
from the standard AWS environment.
"""

from __future__ import annotations

import os
import sys

from hf_storage.__main__ import main as hf_storage_main

from . import locations
from .session import ConfigError, one_line_errors

_KEYS = ("output.dir=", "source.path=")
_FLAGS = ("--strict", "--no-checksums")
USAGE = "usage: python -m launcher.verify output.dir=DIR|s3://BUCKET/PREFIX [--strict] [--no-checksums]"


def verify_uri(uri: str, flags: list[str]) -> int:
    """``python -m hf_storage verify`` for an object-store prefix: the report, exit status 0 / 1 / 2 alike."""
    from hf_storage.verify import verify

    unknown = [f for f in flags if f not in _FLAGS]
    if unknown:
        print(f"{USAGE}\nlauncher.verify: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    report = verify(uri, checksums="--no-checksums" not in flags)
    print(report.format())
    return 1 if not report.ok or ("--strict" in flags and not report.clean) else 0


@one_line_errors("launcher.verify")
def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [a for a in args if not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    if len(paths) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    key, _, path = paths[0].partition("=") if paths[0].startswith(_KEYS) else ("", "", paths[0])
    if locations.looks_like_uri(path):
        return verify_uri(locations.check_uri(key, path), flags)
    if not os.path.isdir(path):
        named = f"{key}={path}" if key else repr(path)
        raise ConfigError(f"{named} is not a directory: pass output.dir=DIR of a checkpoint")
    return hf_storage_main(["verify", path, *flags])


if __name__ == "__main__":
    sys.exit(main())
