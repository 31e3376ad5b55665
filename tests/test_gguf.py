"""The GGUF reader against the `gguf` package (llama.cpp's own Python reader)."""
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from loaders.gguf_file import GGUFError, GGUFFile

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


# ----------------------------------------------------- bad files, written byte by byte
def gguf_string(text):
    return struct.pack("<Q", len(text.encode())) + text.encode()


def gguf_value(v):
    """(value type, bytes) of a Python value: bool, int (u32, or u64 when large), float
    (f32), str, or list (an array; its items take the first item's type)."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return (4, struct.pack("<I", v)) if v < 2**32 else (10, struct.pack("<Q", v))
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_string(v)
    items = [gguf_value(x) for x in v]
    header = struct.pack("<IQ", items[0][0] if items else 4, len(items))
    return 9, header + b"".join(raw for _, raw in items)


def write_gguf_file(path, metadata, tensors=None, n_tensors=None, n_kv=None):
    """A GGUF file of {key: Python value} metadata and {name: float32 array} tensors.
    n_tensors, n_kv: the counts the header claims (default: the true ones)."""
    tensors = tensors or {}
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                   len(metadata) if n_kv is None else n_kv)
    for key, value in metadata.items():
        vtype, raw = gguf_value(value)
        header += gguf_string(key) + struct.pack("<I", vtype) + raw
    data = b""
    for name, array in tensors.items():
        data += bytes(-len(data) % 32)
        header += gguf_string(name) + struct.pack(f"<I{array.ndim}QIQ", array.ndim,
                                                  *reversed(array.shape), 0, len(data))
        data += np.asarray(array, "<f4").tobytes()
    path.write_bytes(header + bytes(-len(header) % 32) + data)
    return path


def tensor_info(name, dims, type_id=0, offset=0):
    """The raw tensor-table entry of one tensor (dims in the file's order)."""
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


def test_byte_writer_matches_gguf_package(tmp_path):
    """The test writer's files read the same in the gguf package as in ours."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_gguf_file(tmp_path / "w.gguf", {"a": 7, "b": [1.5, 2.5], "c": "owl"},
                           {"w": array})
    ref = GGUFReader(path)
    assert ref.fields["a"].contents() == 7 and ref.fields["c"].contents() == "owl"
    assert GGUFFile(path).metadata == {"a": 7, "b": [1.5, 2.5], "c": "owl"}
    np.testing.assert_array_equal(GGUFFile(path).tensor("w"), array)
    np.testing.assert_array_equal(ref.tensors[0].data, array)


def nested_array(depth):
    """A metadata value: an array holding an array holding ... `depth` deep, innermost empty."""
    return struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)


HEADER = b"GGUF" + struct.pack("<I", 3)


KEY = gguf_string("k")  # a metadata key
BAD_HEADERS = {  # test id: (file content, the error's message)
    "2^31 tensors": (HEADER + struct.pack("<QQ", 2**31, 0) + bytes(1000),
                     "2147483648 tensors cannot fit"),
    "2^31 entries": (HEADER + struct.pack("<QQ", 0, 2**31) + bytes(1000),
                     "2147483648 metadata entries cannot fit"),
    "2^31 items": (HEADER + struct.pack("<QQ", 0, 1) + KEY + struct.pack("<IIQ", 9, 0, 2**31)
                   + bytes(1000), "2147483648 array items cannot fit"),
    "item type": (HEADER + struct.pack("<QQ", 0, 1) + KEY + struct.pack("<IIQ", 9, 77, 1),
                  "unknown metadata value type 77"),
    "nested 5000": (HEADER + struct.pack("<QQ", 0, 1) + KEY + nested_array(5000),
                    "metadata arrays nested more than 8 deep"),
    "2^31 dims": (HEADER + struct.pack("<QQ", 1, 0) + gguf_string("w")
                  + struct.pack("<I", 2**31) + bytes(1000),
                  r"tensor 'w' has 2147483648 dimensions \(at most 4\)"),
    "overflow": (HEADER + struct.pack("<QQ", 1, 0) + tensor_info("w", [2**40] * 4) + bytes(64),
                 "tensor 'w' runs past the end of the file"),
    "offset": (HEADER + struct.pack("<QQ", 1, 0) + tensor_info("w", [4], offset=2**63)
               + bytes(64), "tensor 'w' runs past the end of the file"),
    "part block": (HEADER + struct.pack("<QQ", 1, 0) + tensor_info("w", [33], type_id=8)
                   + bytes(64), r"tensor 'w' has 33 values, not whole blocks of 32 \(Q8_0\)"),
    "listed twice": (HEADER + struct.pack("<QQ", 2, 0) + tensor_info("w", [1]) * 2 + bytes(64),
                     "tensor 'w' is listed twice"),
}


@pytest.mark.parametrize("content,message", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_header_is_an_error_not_a_hang(tmp_path, content, message):
    """Counts and sizes are checked against the file before anything is read or allocated:
    no RecursionError, no hour-long loop, no overflowing size."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="bad.gguf: .*" + message):
        GGUFFile(path)


@pytest.mark.parametrize("alignment", ["32", 0, 24, 1.0, [32]])
def test_bad_alignment(tmp_path, alignment):
    path = write_gguf_file(tmp_path / "a.gguf", {"general.alignment": alignment})
    with pytest.raises(GGUFError, match="general.alignment must be a power of two, not"):
        GGUFFile(path)
