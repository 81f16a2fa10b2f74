"""Property-based tests (hypothesis): header parser, layout planner, and save/load end to end.

Every property is bounded (``max_examples``, ``deadline=None``) so the file runs in seconds on a shared
machine; ``HF_STORAGE_FUZZ_SCALE=20`` multiplies the example counts for a long fuzzing run.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import hf_storage
from hf_storage import CheckpointFormatError, TensorSpec, header, open_checkpoint, plan
from hf_storage.dtypes import BITS, PACKED, SUPPORTED_DTYPES, itemsize
from hf_storage.layout import chunk_runs, natural_key
from hf_storage.verify import verify

_SCALE = float(os.environ.get("HF_STORAGE_FUZZ_SCALE", "1"))  # e.g. 20 for a long local fuzzing run
FAST = settings(max_examples=int(100 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=int(25 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

ST_NAMES = list(BITS)  # every dtype the format names, those this torch build lacks included
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)  # () is 0-dim; a 0 anywhere is empty
tensor_names = st.text(min_size=0, max_size=12).filter(lambda n: n != "__metadata__")


# --- (a) header parser --------------------------------------------------------------------------------


@st.composite
def valid_headers(draw):
    """``(entries, metadata, data_size)`` of a valid header, offsets tiling the data in a random order."""
    names = draw(st.lists(tensor_names, max_size=6, unique=True))
    specs = [(n, draw(st.sampled_from(ST_NAMES)), draw(shapes)) for n in names]
    order = draw(st.permutations(range(len(specs))))
    entries, pos = [None] * len(specs), 0
    for i in order:
        n, dt, shape = specs[i]
        if math.prod(shape) * BITS[dt] % 8:  # sub-byte dtypes (F4, F6_*) need whole bytes: 8 more values fill them
            shape = (*shape, 8)
        size = math.prod(shape) * BITS[dt] // 8
        entries[i] = (n, dt, shape, pos, pos + size)
        pos += size
    meta = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    return entries, meta, pos


@FAST
@given(valid_headers())
def test_valid_headers_round_trip(h):
    entries, meta, data_size = h
    blob = header.encode(entries, meta)
    (n,) = struct.unpack("<Q", blob[:8])
    assert n == len(blob) - 8 and n % 8 == 0
    parsed = header.decode(blob[8:], len(blob) + data_size)
    assert parsed.metadata == {"format": "pt", **meta}
    assert parsed.data_start == len(blob)
    got = {e.name: (e.dtype, e.shape, e.begin - len(blob), e.end - len(blob)) for e in parsed.entries.values()}
    assert got == {name: (dt, tuple(shape), b, e) for name, dt, shape, b, e in entries}


def _only_format_errors(raw: bytes, file_size: int) -> header.Header | None:
    try:
        return header.decode(raw, file_size)
    except CheckpointFormatError:
        return None


def _assert_tiles(h: header.Header) -> None:
    pos = h.data_start
    for e in sorted(h.entries.values(), key=lambda e: (e.begin, e.end)):
        assert e.begin == pos and e.end >= e.begin
        pos = e.end
    assert pos == h.file_size


@FAST
@given(st.binary(max_size=400), st.integers(0, 2**64))
def test_random_bytes_raise_only_format_errors(raw, file_size):
    h = _only_format_errors(raw, file_size)
    if h is not None:
        _assert_tiles(h)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entry_like = st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
    json_values | st.sampled_from(ST_NAMES) | st.lists(st.integers(-2, 8), max_size=3),
    max_size=4,
)


@FAST
@given(
    st.dictionaries(tensor_names | st.just("__metadata__"), entry_like | json_values, max_size=4), st.integers(0, 4096)
)
def test_random_json_headers_raise_only_format_errors(obj, data_size):
    """Type confusion: entries with random keys and values of every JSON type."""
    raw = json.dumps(obj).encode()
    h = _only_format_errors(raw, 8 + len(raw) + data_size)
    if h is not None:
        _assert_tiles(h)


def _mutate(raw: bytes, mutations) -> bytes:
    out = bytearray(raw)
    for pos, op, byte in mutations:
        i = max(0, len(out) + pos) if pos < 0 else pos % (len(out) + 1)  # negative: from the end (tensor data)
        if op == "ins":
            out.insert(i, byte)
        elif out and op == "del":
            del out[min(i, len(out) - 1)]
        elif out:
            out[min(i, len(out) - 1)] ^= byte or 1
    return bytes(out)


@FAST
@given(
    valid_headers(),
    st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(["flip", "del", "ins"]), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.integers(-16, 16),
)
def test_mutated_headers_raise_only_format_errors(h, mutations, size_delta):
    entries, meta, data_size = h
    raw = _mutate(header.encode(entries, meta)[8:], mutations)
    parsed = _only_format_errors(raw, max(0, 8 + len(raw) + data_size + size_delta))
    if parsed is not None:
        _assert_tiles(parsed)


@FAST
@given(st.integers(0, 2**64 - 1), st.binary(max_size=256))
def test_read_never_allocates_a_claimed_length(claimed, body):
    """``header.read`` on a real file whose length prefix is forged: memory stays bounded by the file."""
    fd = os.memfd_create("fuzz")
    try:
        os.write(fd, struct.pack("<Q", claimed) + body)
        tracemalloc.start()
        try:
            try:
                parsed = header.read(fd, 8 + len(body), "fuzz")
            except CheckpointFormatError:
                parsed = None
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert peak < 2**20
    if parsed is not None:
        _assert_tiles(parsed)


# --- (b) layout planner -------------------------------------------------------------------------------

# Names like ``layers.3.mlp``; names that tie numerically (``a01``/``a1``) have their own test below.
fqns = st.from_regex(r"[a-z]{1,3}(\.(0|[1-9][0-9]?)){0,2}(\.[a-z]{1,2})?", fullmatch=True)


@st.composite
def tensor_specs(draw, min_size=0, max_size=10):
    names = draw(st.lists(fqns, min_size=min_size, max_size=max_size, unique=True))
    specs = [TensorSpec(n, draw(st.sampled_from(SUPPORTED_DTYPES)), draw(shapes)) for n in names]
    # a 0-dim packed tensor (float4_e2m1fn_x2 holds two fp4 values) has no safetensors shape: plan refuses it
    return [TensorSpec(s.name, s.dtype, (1,)) if s.dtype in PACKED and not s.shape else s for s in specs]


@st.composite
def policies(draw, specs):
    kind = draw(st.sampled_from(["one", "size", "mapping"]))
    if kind == "size":
        return {"max_shard_size": draw(st.integers(1, 400))}
    if kind == "mapping":
        return {"fqn_to_index_mapping": {s.name: draw(st.integers(1, 4)) for s in specs}}
    return {}


def _signature(lay) -> list:
    return [(f.name, f.header, f.size, sorted(f.tensors)) for f in lay.files]


@FAST
@given(st.data())
def test_layout_properties(data):
    specs = data.draw(tensor_specs())
    policy = data.draw(policies(specs))
    lay = plan(specs, **policy)
    shuffled = data.draw(st.permutations(specs))
    assert _signature(plan(shuffled, **policy)) == _signature(lay)  # deterministic, input order irrelevant

    assert sorted(lay.tensors) == sorted(s.name for s in specs)
    for f in lay.files:
        parsed = header.decode(f.header[8:], f.size, f.name)  # offsets tile the file exactly
        assert parsed.metadata == {"format": "pt"} and parsed.data_start % 8 == 0
        assert sorted(parsed.entries) == sorted(f.tensors)
        for name, e in parsed.entries.items():
            p = lay.tensors[name]
            assert (p.file, p.offset, e.end - e.begin) == (f.name, e.begin, p.spec.nbytes)
            assert (e.begin - parsed.data_start) % p.spec.itemsize == 0
    assert lay.total_size == sum(s.nbytes for s in specs)

    if "max_shard_size" in policy:
        _check_size_policy(lay, policy["max_shard_size"])
    if "fqn_to_index_mapping" in policy:
        mapping = policy["fqn_to_index_mapping"]
        assert len(lay.files) == max(mapping.values(), default=1)
        for name, p in lay.tensors.items():
            assert p.file == lay.files[mapping[name] - 1].name


def _check_size_policy(lay, limit: int) -> None:
    used = [sum(lay.tensors[t].spec.nbytes for t in f.tensors) for f in lay.files]
    for f, u in zip(lay.files, used, strict=True):
        assert u <= limit or len(f.tensors) == 1, "only a single oversized tensor may exceed max_shard_size"
    keys = [[natural_key(t) for t in f.tensors] for f in lay.files]
    for i in range(len(lay.files) - 1):  # filled in natural FQN order, a file closes only when full
        assert keys[i] and keys[i + 1] and max(keys[i]) < min(keys[i + 1])
        first_next = min(lay.files[i + 1].tensors, key=natural_key)
        assert used[i] + lay.tensors[first_next].spec.nbytes > limit


def test_layout_ignores_input_order_for_names_that_tie_naturally():
    specs = [TensorSpec("a01", torch.float32, (3,)), TensorSpec("a1", torch.float32, (5,))]
    assert _signature(plan(specs)) == _signature(plan(specs[::-1]))


@st.composite
def boxes(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    offsets, sizes = [], []
    for d in shape:
        o = draw(st.integers(0, d))
        offsets.append(o)
        sizes.append(draw(st.integers(0, d - o)))
    return shape, tuple(offsets), tuple(sizes)


@FAST
@given(boxes())
def test_chunk_runs_cover_exactly_the_box(box):
    shape, offsets, sizes = box
    starts, length = chunk_runs(shape, offsets, sizes)
    got = np.concatenate([np.arange(s, s + length) for s in starts]) if len(starts) and length else np.empty(0, int)
    index = np.arange(math.prod(shape)).reshape(shape)
    want = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].reshape(-1)
    assert np.array_equal(got, want)  # same elements, same (row-major) order, each exactly once
    if len(starts) > 1:
        assert np.all(np.diff(starts) >= length)  # runs ascend and do not overlap


# --- (c) end to end -----------------------------------------------------------------------------------


def _random_tensor(draw, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    raw = draw(st.binary(min_size=n * itemsize(dtype), max_size=n * itemsize(dtype)))
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        if n
        else torch.empty(shape, dtype=dtype)
    )


@st.composite
def state_dicts(draw):
    specs = draw(tensor_specs(min_size=1, max_size=6))
    return {s.name: _random_tensor(draw, s.dtype, s.shape) for s in specs}


def _bits(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


@SLOW
@given(state_dicts(), st.sampled_from([None, 16, 64, "1KB"]))
def test_save_load_round_trip_is_bitwise(sd, max_shard_size):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        hf_storage.save(sd, path, max_shard_size=max_shard_size, thread_count=1)
        target = {k: torch.empty_like(v) for k, v in sd.items()}
        hf_storage.load(target, path, thread_count=1)
        for k, v in sd.items():
            assert target[k].shape == v.shape and _bits(target[k]) == _bits(v), k
        seen = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st_file:
                assert st_file.metadata().get("format") == "pt"
                seen.update({k: st_file.get_tensor(k) for k in st_file.keys()})
        assert seen.keys() == sd.keys()
        for k, v in sd.items():
            assert seen[k].dtype == v.dtype and seen[k].shape == v.shape and _bits(seen[k]) == _bits(v), k
        report = verify(path)
        assert report.clean and report.checksummed == len(sd), report.format()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A small saved checkpoint as ``{file name: bytes}``, and each tensor's raw bytes."""
    sd = {
        "embed": torch.randn(8, 4),
        "layers.0.w": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "layers.0.b": torch.randn(4).half(),
        "layers.1.w": torch.randn(2, 2, 2).bfloat16(),
        "step": torch.tensor(7),
    }
    path = tmp_path_factory.mktemp("pristine") / "ckpt"
    hf_storage.save(sd, path, max_shard_size=100, thread_count=1)
    return {p.name: p.read_bytes() for p in path.iterdir()}, {k: _bits(v) for k, v in sd.items()}


@SLOW
@given(st.data())
def test_verify_ok_means_the_data_is_intact(pristine, data):
    """Corrupt one file of a real checkpoint at random: whenever the reader refuses it, verify reports a
    problem; whenever verify passes, every tensor's bytes are the original ones (no silent corruption)."""
    files, original = pristine
    victim = data.draw(st.sampled_from(sorted(files)))
    mutations = data.draw(
        st.lists(
            st.tuples(st.integers(-300, 10**5), st.sampled_from(["flip", "del", "ins"]), st.integers(0, 255)),
            min_size=1,
            max_size=3,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, raw in files.items():
            (d / name).write_bytes(_mutate(raw, mutations) if name == victim else raw)
        report = verify(d)
        try:
            ckpt = open_checkpoint(d)
        except CheckpointFormatError:
            event("the reader refuses it")
            assert not report.ok, report.format()
            return
        if not report.ok:
            event("the reader accepts it, verify finds a problem")
            return
        event("verify passes it")
        assert ckpt.tensors.keys() == original.keys()
        target = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in ckpt.tensors.items()}
        hf_storage.load(target, d, thread_count=1)
        assert {k: _bits(v) for k, v in target.items()} == original, report.format()
