"""The hand-written safetensors reader and writer against the safetensors package."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loaders.safetensors_file import SafetensorsError, read_safetensors, write_safetensors

TENSORS = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
           "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.tensor(True),
           "e": torch.randn(2, 2).half()}


def test_reads_what_the_package_writes(tmp_path):
    save_file(TENSORS, tmp_path / "x.safetensors", metadata={"layer": "25"})
    tensors, metadata = read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"layer": "25"} and tensors.keys() == TENSORS.keys()
    for name, t in TENSORS.items():
        assert torch.equal(tensors[name], t) and tensors[name].dtype == t.dtype


def test_package_reads_what_we_write(tmp_path):
    write_safetensors(tmp_path / "y.safetensors", TENSORS, {"seed": 3})
    loaded = load_file(tmp_path / "y.safetensors")
    for name, t in TENSORS.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype


def test_truncated_file_is_an_error(tmp_path):
    write_safetensors(tmp_path / "z.safetensors", TENSORS)
    data = (tmp_path / "z.safetensors").read_bytes()
    (tmp_path / "z.safetensors").write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match="z.safetensors: tensor .* runs past the end"):
        read_safetensors(tmp_path / "z.safetensors")
    (tmp_path / "z.safetensors").write_bytes(b"\x05" + bytes(20))
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        read_safetensors(tmp_path / "z.safetensors")


def write_raw(path, header, data):
    """A .safetensors file with exactly this header and data, right or wrong."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def f32(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("header,data,message", [
    ({"a": f32(-8, 0)}, bytes(8), r"'a' has bad data_offsets \[-8, 0\]"),
    ({"a": f32(8, 0)}, bytes(8), r"'a' has bad data_offsets \[8, 0\]"),
    ({"a": f32(0, "8")}, bytes(8), "'a' has bad data_offsets"),
    ({"a": f32(0, 8), "b": f32(4, 12)}, bytes(12), r"'b' starts at byte 4 .* \(overlap or gap"),
    ({"a": f32(0, 8), "b": f32(12, 20)}, bytes(20), r"'b' starts at byte 12 .* \(overlap or gap"),
    ({"a": f32(4, 12)}, bytes(12), "'a' starts at byte 4 of the data, expected 0"),
    ({"a": f32(0, 8)}, bytes(12), "4 bytes after the last tensor belong to none"),
    ({"a": f32(0, 8)}, bytes(4), "'a' runs past the end"),
    ({"a": f32(0, 12)}, bytes(12), r"'a' has 12 bytes, shape \[2\] of F32 needs 8"),
    ({"a": f32(0, 6, shape=(2,))}, bytes(6), "'a' has 6 bytes"),
    ({"a": f32(0, 8, shape=(-1, -2))}, bytes(8), "'a' has a bad shape"),
    ({"a": "junk"}, bytes(8), "'a' has bad data_offsets None"),
    ([1, 2], b"", "header is not a JSON object"),
])
def test_bad_offsets_are_errors(tmp_path, header, data, message):
    """Bytes that belong to no tensor, or to two, are an error, not weights."""
    write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match="bad.safetensors: .*" + message):
        read_safetensors(tmp_path / "bad.safetensors")


def test_empty_and_out_of_order_tensors_load(tmp_path):
    header = {"b": f32(8, 16), "a": f32(0, 8), "e": f32(16, 16, shape=(0, 3))}
    data = struct.pack("<4f", 1, 2, 3, 4)
    write_raw(tmp_path / "ok.safetensors", header, data)
    tensors, _ = read_safetensors(tmp_path / "ok.safetensors")
    assert tensors["a"].tolist() == [1, 2] and tensors["b"].tolist() == [3, 4]
    assert tensors["e"].shape == (0, 3)
