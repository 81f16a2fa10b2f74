"""Command line: check or list a checkpoint directory (or an object-store prefix, ``s3://bucket/prefix``).

    python -m hf_storage verify DIR [--strict] [--no-checksums]
    python -m hf_storage inspect DIR [--json]

(``hf-storage`` is the same as ``python -m hf_storage`` once the package is installed.)
Exit status: 0 ok, 1 the checkpoint has problems (with ``--strict``: or warnings), 2 usage error (or the
object store could not be asked: unreachable, throttling, no credentials).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import objstore
from .errors import CheckpointFormatError, HFStorageError
from .verify import Row, human_size, inspect, verify

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hf_storage", description="Check or list a Hugging Face safetensors checkpoint."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{verify,inspect}")
    v = sub.add_parser("verify", help="check structure, spec conformance and checksums; exit 1 on any problem")
    v.add_argument("dir", help="checkpoint directory or s3://bucket/prefix")
    v.add_argument("--strict", action="store_true", help="also fail on warnings (spec-profile deviations)")
    v.add_argument("--no-checksums", action="store_true", help="skip reading tensor data (structure only)")
    i = sub.add_parser("inspect", help="list files, tensors, dtypes, shapes and sizes")
    i.add_argument("dir", help="checkpoint directory or s3://bucket/prefix")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if objstore.is_uri(args.dir):
        try:
            objstore.Location.parse(args.dir)
        except HFStorageError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    elif not Path(args.dir).is_dir():
        print(f"error: {args.dir!r} is not a directory; pass a checkpoint directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _verify(args) if args.command == "verify" else _inspect(args)
    except objstore.ObjectStoreError as e:  # not the checkpoint's fault: the store could not be asked
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _verify(args) -> int:
    report = verify(args.dir, checksums=not args.no_checksums)
    print(report.format())
    failed = not report.ok or (args.strict and not report.clean)
    return EXIT_PROBLEMS if failed else EXIT_OK


def _inspect(args) -> int:
    try:
        rows = inspect(args.dir)
    except CheckpointFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(_as_json(rows) if args.json else _as_table(rows))
    return EXIT_OK


def _totals(rows: list[Row]) -> dict:
    files: dict[str, dict] = {}
    for r in rows:
        f = files.setdefault(r.file, {"file": r.file, "tensors": 0, "bytes": 0})
        f["tensors"] += 1
        f["bytes"] += r.nbytes
    return {"files": list(files.values()), "total_tensors": len(rows), "total_bytes": sum(r.nbytes for r in rows)}


def _as_json(rows: list[Row]) -> str:
    tensors = [{**r._asdict(), "shape": list(r.shape)} for r in rows]
    return json.dumps({"tensors": tensors, **_totals(rows)}, indent=2)


def _as_table(rows: list[Row]) -> str:
    cells = [("file", "tensor", "dtype", "shape", "bytes")]
    cells += [(r.file, r.tensor, r.dtype, "[" + ", ".join(map(str, r.shape)) + "]", str(r.nbytes)) for r in rows]
    widths = [max(len(c[k]) for c in cells) for k in range(5)]
    lines = [
        "  ".join(c[k].rjust(widths[k]) if k == 4 else c[k].ljust(widths[k]) for k in range(5)).rstrip() for c in cells
    ]
    t = _totals(rows)
    lines.append("")
    lines += [f"{f['file']}: {f['tensors']} tensors, {human_size(f['bytes'])}" for f in t["files"]]
    lines.append(
        f"total: {t['total_tensors']} tensors in {len(t['files'])} files, {human_size(t['total_bytes'])} "
        f"({t['total_bytes']} bytes)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
