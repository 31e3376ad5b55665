"""The GGUF reader against the `gguf` package (llama.cpp's own Python reader)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from gguf_file import GGUFError, GGUFFile

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def test_every_embedded_tensor_equals_gguf_package(gguf_path):
    ours, ref = GGUFFile(gguf_path), GGUFReader(gguf_path)
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        expected = dequantize(t.data, t.tensor_type)
        got = ours.tensor(t.name)
        assert got.shape == expected.shape, t.name
        np.testing.assert_array_equal(got, expected, err_msg=t.name)


def test_metadata_equals_gguf_package(gguf_path):
    ours, ref = GGUFFile(gguf_path), GGUFReader(gguf_path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        if isinstance(expected, float):
            assert ours.metadata[key] == pytest.approx(expected), key
        else:
            assert ours.metadata[key] == expected, key


def write_gguf(path, tensors, arch="llama"):
    """A small GGUF file holding the given {name: (array, type name)}."""
    w = GGUFWriter(str(path), arch)
    for name, (array, type_name) in tensors.items():
        qtype = GGMLQuantizationType[type_name]
        data = array if type_name == "F32" else quantize(array, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)  # the shape follows from the bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("type_name", TYPES)
def test_each_type_equals_gguf_package(tmp_path, type_name):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(8, 64)).astype(np.float32)
    path = tmp_path / "t.gguf"
    write_gguf(path, {"w": (array, type_name)})
    [t] = GGUFReader(path).tensors
    np.testing.assert_array_equal(GGUFFile(path).tensor("w"), dequantize(t.data, t.tensor_type))


def test_wrong_magic(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match="x.gguf: not a GGUF file"):
        GGUFFile(path)


def test_wrong_version(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + (2).to_bytes(4, "little") + bytes(100))
    with pytest.raises(GGUFError, match="version 2 is not supported"):
        GGUFFile(path)


def test_truncated_header_and_data(tmp_path, gguf_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_path.read_bytes()[:1000])
    with pytest.raises(GGUFError, match="cut.gguf: truncated file"):
        GGUFFile(path)
    path.write_bytes(gguf_path.read_bytes()[:40_000_000])
    with pytest.raises(GGUFError, match="runs past the end"):
        GGUFFile(path).tensor("output_norm.weight")


def test_unsupported_type_is_named(tmp_path):
    path = tmp_path / "q5.gguf"
    write_gguf(path, {"w": (np.ones((4, 64), np.float32), "Q5_0")})
    with pytest.raises(GGUFError, match="tensor 'w' has type Q5_0"):
        GGUFFile(path).tensor("w")
