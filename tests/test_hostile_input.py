"""Hostile and broken checkpoints: every entry point refuses them with a specific, named error.

Each case builds one broken checkpoint directory by hand (raw bytes, no library writer involved) and is
run against four entry points: ``open_checkpoint``, ``hf_storage.load``, the DCP
``HuggingFaceStorageReader.read_metadata`` and ``verify``. Every reader call runs in a watchdog thread with
``tracemalloc`` on, so a hang (e.g. opening a FIFO) or an allocation sized by a forged length fails the
test instead of stalling or exhausting the machine. A case the reader gets wrong carries ``bug=`` (the
fix, in words) and runs as a strict xfail until fixed; the seven found so far (digit-limit integers in a
header, an index or DCP_SHARDING_INFO, nested JSON there, a directory or FIFO named as a file,
overlapping pieces hiding a hole, dimensions past int64) and three more (symlink loops and paths through
a file escaping as bare OSError, hub-cache snapshots refused) are fixed and run as plain cases.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import hf_storage
from hf_storage import CheckpointFormatError, HuggingFaceStorageReader, open_checkpoint
from hf_storage.box import Box
from hf_storage.header import MAX_HEADER_BYTES
from hf_storage.layout import INDEX_NAME
from hf_storage.verify import verify

SINGLE = "model.safetensors"
F1, F2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
DATA = struct.pack("<2f", 1.5, -2.0)
HANG_S = 2.0  # a header-only open takes milliseconds; anything slower is a hang
MEM_LIMIT = 32 * 2**20  # no entry point may allocate anywhere near a forged size


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def st_bytes(head: dict | bytes, data: bytes = DATA, *, length: int | None = None) -> bytes:
    raw = head if isinstance(head, bytes) else json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD = {"__metadata__": {"format": "pt"}, "a": entry()}


def single(head, data: bytes = DATA, **kw) -> Callable[[Path], None]:
    return lambda d: (d / SINGLE).write_bytes(st_bytes(head, data, **kw))


def indexed(weight_map: dict, files: dict[str, bytes], index: bytes | None = None) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        for name, content in files.items():
            (d / name).write_bytes(content)
        body = index if index is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        (d / INDEX_NAME).write_bytes(body)

    return build


def sparse(name: str, size: int, prefix: bytes) -> Callable[[Path], None]:
    """A file of ``size`` bytes on disk that holds only ``prefix``: big claims without big disks."""

    def build(d: Path) -> None:
        with open(d / name, "wb") as f:
            f.write(prefix)
            f.truncate(size)

    return build


def both(*builders) -> Callable[[Path], None]:
    return lambda d: [b(d) for b in builders]


def outside_symlink(d: Path) -> None:
    secret = d.parent / "outside.safetensors"
    secret.write_bytes(st_bytes(GOOD))
    (d / F1).symlink_to(secret)
    indexed({"a": F1}, {})(d)


def symlink_loop(d: Path) -> None:
    os.symlink("b.safetensors", d / "a.safetensors")
    os.symlink("a.safetensors", d / "b.safetensors")
    indexed({"a": "a.safetensors"}, {})(d)


def fifo(d: Path) -> None:
    os.mkfifo(d / SINGLE)


def sharded(pieces: list[tuple[str, int, list[int], str]]) -> Callable[[Path], None]:
    """torch-writer style shard files (no index): ``(file, length, saved_offsets, dtype)`` per piece of 'a'."""

    def build(d: Path) -> None:
        for name, n, offs, dtype in pieces:
            info = json.dumps({"a": {"saved_offsets": offs}})
            item = 4 if dtype == "F32" else 2
            head = {"__metadata__": {"DCP_SHARDING_INFO": info}, "a": entry(dtype, (n,), (0, item * n))}
            (d / name).write_bytes(st_bytes(head, b"\x01" * item * n))

    return build


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], None]
    match: str  # fragment of the message every reader entry point raises (and verify reports)
    exc: type[BaseException] = CheckpointFormatError
    verify_match: str | None = None  # when verify words it differently (its own extra checks)
    bug: str | None = None  # reader misbehaves today: strict xfail for the reader entry points, with the fix


CASES = [
    # --- file size and header length
    Case("truncated-data", single(GOOD, DATA[:5]), "tensor data ends at byte"),
    Case(
        "shorter-than-prefix", lambda d: (d / SINGLE).write_bytes(b"\x10\x00\x00"), "too short for a safetensors file"
    ),
    Case("header-length-past-eof", single(GOOD, length=4096), "header length 4096 runs past the end"),
    Case("header-length-over-100MB", single(GOOD, length=2**62), f"exceeds the {MAX_HEADER_BYTES}-byte limit"),
    Case(
        "header-length-over-100MB-sparse",
        sparse(SINGLE, MAX_HEADER_BYTES + 2**20, struct.pack("<Q", MAX_HEADER_BYTES + 8)),
        f"exceeds the {MAX_HEADER_BYTES}-byte limit",
    ),
    # --- header JSON
    Case("header-not-json", single(b"{not json at all"), "header is not valid UTF-8 JSON"),
    Case("header-not-utf8", single(b'{"\xff\xfe":1}'), "header is not valid UTF-8 JSON"),
    Case("header-deeply-nested", single(b"[" * 100_000, b""), "header is not valid UTF-8 JSON"),
    Case("header-is-list", single(b"[1, 2]", b""), "header must be a JSON object, got list"),
    Case("header-is-number", single(b"42", b""), "header must be a JSON object, got int"),
    Case(
        "header-duplicate-name",
        single(b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}"),
        "header names 'a' twice",
    ),
    Case(
        "huge-integer-in-header",
        single(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}'),
        "header is not valid UTF-8 JSON",
    ),
    # --- tensor entries
    Case("entry-not-object", single({"a": [1, 2, 3]}), "entry must be an object, got list"),
    Case("entry-missing-key", single({"a": {"dtype": "F32", "shape": [2]}}), "missing ['data_offsets']"),
    Case("entry-extra-key", single({"a": {**entry(), "crc": 1}}), "unexpected ['crc']"),
    Case("unknown-dtype", single({"a": entry("F128")}), "unknown safetensors dtype 'F128'"),
    Case("dtype-not-string", single({"a": entry(7)}), "dtype must be a string, got 7"),
    Case(
        "shape-negative", single({"a": entry(shape=(-2,))}), "shape must be a list of non-negative integers, got [-2]"
    ),
    Case("shape-bool", single({"a": entry(shape=(True, 2))}), "non-negative integers, got [True, 2]"),
    Case("shape-float", single({"a": entry(shape=(2.0,))}), "non-negative integers, got [2.0]"),
    Case(
        "shape-not-list",
        single({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}),
        "non-negative integers, got 2",
    ),
    Case("size-mismatch", single({"a": entry(shape=(3,))}), "span 8 bytes but shape [3] of F32 needs 12"),
    Case("size-mismatch-huge-shape", single({"a": entry(shape=(2**40, 2**40))}), "needs 4835703278458516698824704"),
    # --- data_offsets
    Case("offsets-reversed", single({"a": entry(offsets=(8, 0))}), "are not 0 <= begin <= end"),
    Case("offsets-negative", single({"a": entry(offsets=(-8, 0))}), "are not 0 <= begin <= end"),
    Case("offsets-bool", single({"a": entry(offsets=(False, 8))}), "data_offsets must be two integers"),
    Case("offsets-three", single({"a": entry(offsets=(0, 4, 8))}), "data_offsets must be two integers"),
    Case(
        "offsets-overlap",
        single({"a": entry(), "b": entry(shape=(1,), offsets=(4, 8))}, DATA),
        "tensor 'b' at data offset 4 overlaps the previous tensor",
    ),
    Case(
        "offsets-hole",
        single({"a": entry(), "b": entry(shape=(1,), offsets=(12, 16))}, DATA * 2),
        "leaves a hole of 4 bytes before it",
    ),
    Case("offsets-hole-at-start", single({"a": entry(offsets=(8, 16))}, DATA * 2), "leaves a hole of 8 bytes"),
    Case("offsets-past-eof", single({"a": entry(shape=(2**20,), offsets=(0, 2**22))}), "(truncated?)"),
    Case("trailing-bytes", single(GOOD, DATA + b"junk"), "4 trailing bytes after the last tensor"),
    # --- __metadata__
    Case(
        "metadata-non-string-value",
        single({"__metadata__": {"format": "pt", "step": 7}, "a": entry()}),
        "__metadata__ values must be strings; not so for ['step']",
    ),
    Case("metadata-not-object", single({"__metadata__": ["pt"], "a": entry()}), "__metadata__ must be an object"),
    # --- index JSON
    Case("index-not-json", indexed({}, {F1: st_bytes(GOOD)}, b"{'weight_map': }"), "not valid UTF-8 JSON"),
    Case("index-is-list", indexed({}, {F1: st_bytes(GOOD)}, b'[{"weight_map": {}}]'), "with a 'weight_map' object"),
    Case(
        "index-without-weight-map", indexed({}, {F1: st_bytes(GOOD)}, b'{"metadata": {}}'), "with a 'weight_map' object"
    ),
    Case(
        "weight-map-non-string",
        indexed({"a": 1, "b": [F1]}, {F1: st_bytes(GOOD)}),
        "weight_map values must be file names; not so for 'a', 'b'",
    ),
    Case(
        "index-over-100MB", sparse(INDEX_NAME, 100 * 1000 * 1000 + 1, b'{"weight_map": {}}'), "-byte limit for an index"
    ),
    Case(
        "huge-integer-in-index",
        indexed({}, {}, b'{"metadata": {"total_size": ' + b"9" * 5000 + b'}, "weight_map": {}}'),
        "not valid UTF-8 JSON",
    ),
    # --- file names in the index
    Case(
        "weight-map-dotdot",
        indexed({"a": "../x.safetensors"}, {}),
        "'../x.safetensors' outside the checkpoint directory",
    ),
    Case("weight-map-absolute", indexed({"a": "/etc/passwd"}, {}), "'/etc/passwd' outside the checkpoint directory"),
    Case("weight-map-backslash", indexed({"a": "..\\x.safetensors"}, {}), "outside the checkpoint directory"),
    Case("weight-map-nul", indexed({"a": "x\0.safetensors"}, {}), "index names an invalid file"),
    Case("weight-map-empty-name", indexed({"a": ""}, {}), "index names an invalid file ''"),
    Case("symlink-outside", outside_symlink, "outside the checkpoint directory"),
    Case("missing-file", indexed({"a": F1, "b": F2}, {F1: st_bytes(GOOD)}), f"checkpoint file '{F2}' is missing"),
    Case(
        "tensor-absent-from-file",
        indexed({"a": F1, "ghost": F1}, {F1: st_bytes(GOOD)}),
        f"the index names tensors their files do not hold: 'ghost (in {F1})'",
        verify_match="tensor 'ghost': the index places this tensor here, but the file does not hold it",
    ),
    Case(
        "duplicate-across-files",
        indexed(
            {"a": F1, "b": F2},
            {F1: st_bytes(GOOD), F2: st_bytes({"a": entry(), "b": entry(offsets=(8, 16))}, DATA * 2)},
        ),
        "tensor 'a' is stored more than once",
    ),
    Case(
        "weight-map-names-directory",
        both(lambda d: (d / "sub").mkdir(), indexed({"a": "sub"}, {})),
        "'sub' is not a regular file",
    ),
    Case("fifo-instead-of-file", fifo, "is not a regular file"),
    Case("symlink-loop", symlink_loop, "checkpoint file 'a.safetensors'", verify_match="PROBLEM  a.safetensors: "),
    Case(
        "path-through-a-file",
        indexed({"a": F1 + "/x.safetensors"}, {F1: st_bytes(GOOD)}),
        f"checkpoint file '{F1}/x.safetensors'",
        verify_match=f"PROBLEM  {F1}/x.safetensors: ",
    ),
    # --- torch-writer shard files (DCP_SHARDING_INFO, no index)
    Case(
        "sharding-info-not-json",
        single({"__metadata__": {"DCP_SHARDING_INFO": "{oops"}, "a": entry()}),
        "malformed DCP_SHARDING_INFO",
    ),
    Case(
        "sharding-info-wrong-rank",
        single({"__metadata__": {"DCP_SHARDING_INFO": '{"a": {"saved_offsets": [0, 0]}}'}, "a": entry()}),
        "offsets [0, 0] for 'a' do not fit its shape",
    ),
    Case(
        "sharding-info-deeply-nested",
        single({"__metadata__": {"DCP_SHARDING_INFO": "[" * 100_000}, "a": entry()}),
        "malformed DCP_SHARDING_INFO",
    ),
    Case(
        "shards-several-dtypes",
        sharded([("s0.safetensors", 2, [0], "F32"), ("s1.safetensors", 2, [2], "F16")]),
        "is stored with several dtypes",
    ),
    Case(
        "shards-leave-gap",
        sharded([("s0.safetensors", 2, [0], "F32"), ("s1.safetensors", 2, [3], "F32")]),
        "do not tile its shape [5]",
    ),
    Case(
        "shards-overlap-and-hole",
        sharded(
            [("s0.safetensors", 2, [0], "F32"), ("s1.safetensors", 1, [1], "F32"), ("s2.safetensors", 1, [3], "F32")]
        ),
        "overlap",
    ),
    Case(
        "dimension-beyond-int64",
        single({"a": entry(shape=(0, 2**64), offsets=(0, 0))}, b""),
        "exceeds 9223372036854775807",
    ),
    Case("empty-directory", lambda d: None, "no model.safetensors.index.json, no model.safetensors"),
]


def _release_fifos(d: Path) -> None:
    for p in d.iterdir():
        if stat.S_ISFIFO(os.lstat(p).st_mode):
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


def bounded(fn: Callable[[], object], d: Path):
    """``fn()`` under a watchdog (HANG_S) and a Python allocation ceiling; returns or raises like ``fn``."""
    box: dict[str, object] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    tracemalloc.start()
    try:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(HANG_S)
        hung = t.is_alive()
        if hung:
            _release_fifos(d)
            t.join(HANG_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not hung, f"hung for more than {HANG_S} s"
    assert peak < MEM_LIMIT, f"allocated {peak} bytes"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


def _reader_params():
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


ENTRY_POINTS = {
    "open_checkpoint": open_checkpoint,
    "load": lambda d: hf_storage.load({"a": torch.zeros(2)}, d, thread_count=1),
    "dcp_read_metadata": lambda d: HuggingFaceStorageReader(d).read_metadata(),
}


def test_at_least_twenty_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", _reader_params())
def test_reader_refuses(case: Case, entry_point: str, ckpt_dir: Path):
    case.build(ckpt_dir)
    with pytest.raises(case.exc, match=re.escape(case.match)):
        bounded(lambda: ENTRY_POINTS[entry_point](ckpt_dir), ckpt_dir)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_verify_reports(case: Case, ckpt_dir: Path):
    case.build(ckpt_dir)
    report = bounded(lambda: verify(ckpt_dir), ckpt_dir)
    assert not report.ok
    text = report.format()
    assert (case.verify_match or case.match) in text, text
    assert "FAILED" in text.splitlines()[-1]


def test_dcp_load_surfaces_the_cause(ckpt_dir: Path):
    """Through ``dcp.load`` the reader's error arrives wrapped by DCP, but its message survives."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    indexed({"a": "../x.safetensors"}, {})(ckpt_dir)
    with pytest.raises(CheckpointException, match="outside the checkpoint directory"):
        dcp.load({"a": torch.zeros(2)}, storage_reader=HuggingFaceStorageReader(ckpt_dir), no_dist=True)


def test_forged_header_length_allocates_nothing(ckpt_dir: Path):
    """A header length just under the limit on a tiny file is refused before any buffer is allocated."""
    (ckpt_dir / SINGLE).write_bytes(struct.pack("<Q", MAX_HEADER_BYTES - 8) + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError, match="runs past the end"):
            open_checkpoint(ckpt_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# --- data corruption: structure intact, bytes wrong; only the checksums can tell


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = {
        "embed.weight": torch.randn(16, 8),
        "layers.0.w": torch.arange(24, dtype=torch.int64).reshape(4, 6),
        "layers.0.b": torch.randn(6).bfloat16(),
        "scale": torch.tensor(0.5),
    }
    path = tmp_path / "saved"
    hf_storage.save(sd, path, max_shard_size=400, thread_count=1)
    return path, sd


def _flip(path: Path, tensor: str, byte: int, bit: int = 0) -> None:
    ckpt = open_checkpoint(path)
    (chunk,) = ckpt.tensors[tensor].chunks
    with open(path / chunk.file, "r+b") as f:
        f.seek(chunk.begin + byte)
        b = f.read(1)[0]
        f.seek(chunk.begin + byte)
        f.write(bytes([b ^ (1 << bit)]))


@pytest.mark.parametrize("tensor,byte,bit", [("layers.0.w", 17, 3), ("embed.weight", 0, 0), ("scale", 3, 7)])
def test_flipped_bit_found_by_verify(saved, tensor: str, byte: int, bit: int):
    path, sd = saved
    assert verify(path).clean
    _flip(path, tensor, byte, bit)
    open_checkpoint(path)  # the structure is intact: the reader cannot know
    report = verify(path)
    assert not report.ok
    (problem,) = report.problems
    assert problem.tensor == tensor and "CRC-32" in problem.cause and "corrupted" in problem.cause
    assert report.checksummed == len(sd) - 1


def test_verify_flags_forged_checksums_and_total_size(saved):
    path, _ = saved
    index_path = path / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index["metadata"]["checksums"]["tensors"]["scale"] = "XYZ"
    index["metadata"]["checksums"]["tensors"]["nope"] = "00000000"
    index_path.write_text(json.dumps(index))
    text = verify(path).format()
    assert "metadata.total_size is" in text
    assert "tensor 'scale': recorded checksum 'XYZ' is not 8 lowercase hex digits" in text
    assert "checksums recorded for tensors the checkpoint does not hold: 'nope'" in text


def test_verify_streams_with_a_small_buffer(saved):
    """Checksums come out the same whatever the read buffer size (tensors span many reads)."""
    path, sd = saved
    assert verify(path, block_bytes=7).checksummed == len(sd)


def test_verify_on_bad_path_and_stray_files(saved, tmp_path: Path):
    assert not verify(tmp_path / "nope").ok
    path, _ = saved
    (path / "model-00009-of-00009.safetensors").write_bytes(st_bytes(GOOD))
    report = verify(path)
    assert report.ok and "files the index does not name" in report.format()


def test_odd_but_valid_names_pass(ckpt_dir: Path):
    """Legal but odd: a 5000-digit tensor name (more digits than Python's int() converts), an empty name.
    Sorting names for the report must not choke on them."""
    long = "layer." + "7" * 5000
    head = {"__metadata__": {"format": "pt"}, long: entry(), "": entry(offsets=(8, 16))}
    indexed({long: F1, "": F1}, {F1: st_bytes(head, DATA * 2)})(ckpt_dir)
    assert set(open_checkpoint(ckpt_dir).tensors) == {long, ""}
    report = verify(ckpt_dir)
    assert report.ok, report.format()


def test_file_truncated_after_the_headers_were_read(saved):
    """A file that shrinks between planning (headers) and reading: a named error, not zeros or a hang."""
    from hf_storage.reader import read_requests

    path, sd = saved
    ckpt = open_checkpoint(path)
    (chunk,) = ckpt.tensors["embed.weight"].chunks
    os.truncate(path / chunk.file, chunk.begin + 10)
    target = torch.empty(16, 8)
    with pytest.raises(CheckpointFormatError, match="unexpected end of file"):
        bounded(lambda: read_requests(path, [(chunk, target, Box((0, 0), (16, 8)))]), path)
    assert "PROBLEM" in verify(path).format()


def test_huggingface_hub_cache_snapshot_loads(tmp_path: Path):
    src = tmp_path / "src"
    hf_storage.save({"w": torch.arange(6.0)}, src, thread_count=1)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (repo / "blobs" / f"sha256-{f.name}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f"sha256-{f.name}"))
    target = {"w": torch.zeros(6)}
    hf_storage.load(target, snapshot, thread_count=1)
    assert torch.equal(target["w"], torch.arange(6.0))
