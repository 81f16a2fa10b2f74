"""Verify a checkpoint the launcher wrote: structure, spec conformance, total size and every CRC-32.

    python -m launcher.verify output.dir=/ckpt/step-1000 [--strict] [--no-checksums]
    python -m launcher.verify /ckpt/step-1000

The same check as ``python -m hf_storage verify DIR``, addressed the way the launcher's configs name the
checkpoint (``output.dir=`` as in ``launcher.save``, or ``source.path=`` as in ``launcher.load``). Exit
status: 0 when the checkpoint is sound, 1 on any problem, 2 on a usage error.
"""

from __future__ import annotations

import sys

from hf_storage.__main__ import main as hf_storage_main

_KEYS = ("output.dir=", "source.path=")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [a.split("=", 1)[1] if a.startswith(_KEYS) else a for a in args if not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    if len(paths) != 1:
        print("usage: python -m launcher.verify output.dir=DIR [--strict] [--no-checksums]", file=sys.stderr)
        return 2
    return hf_storage_main(["verify", paths[0], *flags])


if __name__ == "__main__":
    sys.exit(main())
