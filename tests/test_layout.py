"""Pure unit tests of the layout planner and header codec: no processes, no disk."""

import json
import math
import struct

import numpy as np
import pytest
import torch

from hf_storage import LayoutError, TensorSpec, header, layout
from hf_storage.dtypes import SUPPORTED_DTYPES, itemsize, to_safetensors, to_torch
from hf_storage.layout import chunk_runs, natural_key, parse_size, plan


def specs(*items):
    return [TensorSpec(n, dt, tuple(s)) for n, dt, s in items]


def test_natural_order_puts_layer_2_before_layer_10():
    names = ["layers.10.w", "layers.2.w", "embed", "layers.1.w"]
    assert sorted(names, key=natural_key) == ["embed", "layers.1.w", "layers.2.w", "layers.10.w"]


@pytest.mark.parametrize(
    "value,expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5KB", 1500),
        (123, 123),
        ("64", 64),
        ("10 kib", 10240),
        (None, None),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("bad", ["5 parsecs", "", "-3GB", 0, -1, True, "GB"])
def test_parse_size_rejects_with_the_value_named(bad):
    with pytest.raises(LayoutError, match="max_shard_size"):
        parse_size(bad)


def test_max_shard_size_fills_files_in_natural_order():
    s = specs(*[(f"layers.{i}.w", torch.float32, (10,)) for i in range(12)])  # 40 bytes each
    lay = plan(s, max_shard_size=100)
    assert [f.name for f in lay.files] == [layout.file_name(i, 6) for i in range(1, 7)]
    assert [sorted(f.tensors, key=natural_key) for f in lay.files][:2] == [
        ["layers.0.w", "layers.1.w"],
        ["layers.2.w", "layers.3.w"],
    ]
    assert all(sum(lay.tensors[t].spec.nbytes for t in f.tensors) <= 100 for f in lay.files)


def test_oversized_tensor_gets_its_own_file():
    lay = plan(
        specs(("a", torch.float32, (100,)), ("b", torch.float32, (1,)), ("c", torch.float32, (1,))), max_shard_size=16
    )
    assert [f.tensors for f in lay.files] == [["a"], ["b", "c"]]


def test_one_file_without_policy_and_index_content():
    lay = plan(specs(("x", torch.bfloat16, (3, 2)), ("y", torch.int64, ())))
    assert len(lay.files) == 1 and lay.files[0].name == "model-00001-of-00001.safetensors"
    idx = lay.index({"extra": 1})
    assert idx["metadata"] == {"total_size": 12 + 8, "extra": 1}
    assert idx["weight_map"] == {"x": lay.files[0].name, "y": lay.files[0].name}


def test_fqn_to_index_mapping_places_tensors_and_keeps_empty_files():
    s = specs(("a", torch.float32, (2,)), ("b", torch.float32, (2,)))
    lay = plan(s, fqn_to_index_mapping={"a": 3, "b": 1})
    assert [f.name for f in lay.files] == [layout.file_name(i, 3) for i in (1, 2, 3)]
    assert lay.tensors["a"].file == layout.file_name(3, 3) and lay.files[1].tensors == []


def test_fqn_to_index_mapping_errors_name_every_missing_key():
    s = specs(("a", torch.float32, (2,)), ("b", torch.float32, (2,)), ("c", torch.float32, (2,)))
    with pytest.raises(LayoutError, match="'b', 'c'"):
        plan(s, fqn_to_index_mapping={"a": 1})
    with pytest.raises(LayoutError, match=">= 1"):
        plan(s, fqn_to_index_mapping={"a": 0, "b": 1, "c": 1})
    with pytest.raises(LayoutError, match="not both"):
        plan(s, fqn_to_index_mapping={"a": 1, "b": 1, "c": 1}, max_shard_size=10)


def test_duplicate_names_rejected():
    with pytest.raises(LayoutError, match="repeated"):
        plan(specs(("a", torch.float32, (1,)), ("a", torch.float32, (1,))))


def test_every_tensor_is_aligned_to_its_itemsize_and_files_tile():
    s = specs(*[(f"t{i}", dt, (3,)) for i, dt in enumerate(SUPPORTED_DTYPES)], ("odd", torch.uint8, (7,)))
    lay = plan(s)
    f = lay.files[0]
    assert len(f.header) % 8 == 0
    pos = len(f.header)
    for name in f.tensors:
        p = lay.tensors[name]
        assert p.offset == pos and p.offset % p.spec.itemsize == 0
        pos += p.spec.nbytes
    assert pos == f.size


def test_layout_is_deterministic_and_independent_of_input_order():
    s = specs(
        *[
            (f"layers.{i}.{k}", dt, (i + 1, 3))
            for i in range(5)
            for k, dt in (("w", torch.bfloat16), ("b", torch.float32))
        ]
    )
    a = plan(s, max_shard_size=50)
    b = plan(list(reversed(s)), max_shard_size=50)
    assert [(f.name, f.header, f.size) for f in a.files] == [(f.name, f.header, f.size) for f in b.files]


def test_header_bytes_follow_the_spec():
    lay = plan(specs(("w", torch.float16, (2, 3)), ("v", torch.float32, (1,))))
    head = lay.files[0].header
    (n,) = struct.unpack("<Q", head[:8])
    assert n == len(head) - 8 and n % 8 == 0
    obj = json.loads(head[8:])
    assert obj["__metadata__"] == {"format": "pt"}
    assert list(obj)[1:] == ["v", "w"]  # data order: larger item size first
    assert obj["v"] == {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    assert obj["w"] == {"dtype": "F16", "shape": [2, 3], "data_offsets": [4, 16]}
    parsed = header.decode(head[8:], len(head) + 16)
    assert parsed.entries["w"].begin == len(head) + 4 and parsed.metadata == {"format": "pt"}


def test_dtype_names_round_trip():
    for dt in SUPPORTED_DTYPES:
        assert to_torch(to_safetensors(dt)) is dt
        assert itemsize(dt) == torch.empty((), dtype=dt).element_size()


def brute_runs(shape, offsets, sizes):
    """Element offsets of a box, in row-major box order, by brute force."""
    idx = np.arange(math.prod(shape)).reshape(shape) if shape else np.arange(1).reshape(())
    sl = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    return idx[sl].reshape(-1)


@pytest.mark.parametrize(
    "shape,offsets,sizes,nruns",
    [
        ((8, 6), (2, 0), (3, 6), 1),  # row shard: one run
        ((8, 6), (0, 2), (8, 3), 8),  # column shard: one run per row
        ((4, 5, 6), (1, 0, 3), (2, 5, 3), 10),
        ((4, 5, 6), (0, 1, 0), (4, 2, 6), 4),
        ((4, 5, 6), (2, 0, 0), (1, 5, 6), 1),
        ((5,), (1,), (3,), 1),
        ((), (), (), 1),
        ((3, 4), (1, 0), (0, 4), 0),  # empty box
        ((1, 7), (0, 3), (1, 2), 1),
    ],
)
def test_chunk_runs_match_brute_force(shape, offsets, sizes, nruns):
    starts, length = chunk_runs(shape, offsets, sizes)
    assert len(starts) == nruns
    got = np.concatenate([np.arange(s, s + length) for s in starts]) if nruns else np.empty(0)
    assert np.array_equal(got, brute_runs(shape, offsets, sizes))


def test_chunk_runs_rejects_a_box_outside_the_tensor():
    with pytest.raises(LayoutError, match="outside"):
        chunk_runs((4, 4), (3, 0), (2, 4))
