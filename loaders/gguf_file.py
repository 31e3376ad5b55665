"""Read a GGUF file (version 3) from scratch: metadata, tensor table, dequantized tensors.

GGUF is llama.cpp's single-file checkpoint format. Its layout, all little-endian:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type: u32, value)          <- metadata (config, tokenizer)
    n_tensors x (name: string, n_dims: u32, dims: u64 x n_dims, type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor starts at data_start + offset

A string is (length u64, UTF-8 bytes). dims are listed fastest-varying first, so a
PyTorch Linear weight of shape (out, in) is stored with dims [in, out].

Quantized tensors are stored in blocks of 32 values that share a scale:
    Q8_0: d (f16), q[32] (int8)                x = d * q
    Q4_0: d (f16), q[16] (two 4-bit q per byte) x = d * (q - 8)
    Q4_1: d (f16), m (f16), q[16]               x = d * q + m
In a Q4 block, byte j holds value j in its low nibble and value j + 16 in its high nibble.

Every count and size in the header is checked against the file before anything is read or
allocated by it: a corrupt or hostile header is an error, not a hang or a huge allocation.
"""
import math
import struct
from dataclasses import dataclass

import numpy as np


class GGUFError(ValueError):
    """A GGUF file that cannot be read; the message names the file and the problem."""


# The ggml tensor types, by their id in the file (the names llama.cpp uses).
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# The types this reader can turn into floats: (values per block, bytes per block).
SUPPORTED = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
             "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}

# Metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                  7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# The fewest bytes a value of each type can take (a string is at least its u64 length, an
# array its item type and count): how many of them fit in the bytes left bounds any count.
MIN_BYTES = {**{t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}, STRING: 8, ARRAY: 12}
MAX_NESTING = 8  # arrays of arrays: real files nest one deep; refuse absurd depths
MAX_DIMS = 4     # ggml tensors have at most 4 dimensions


@dataclass
class TensorInfo:
    name: str
    shape: tuple   # PyTorch order (slowest-varying first), i.e. the file's dims reversed
    type_name: str
    offset: int    # absolute byte offset of the data in the file


class _Cursor:
    """Reads little-endian values from a bytes-like buffer, with bounds checks."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated file (needed {n} bytes at offset "
                            f"{self.pos}, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what, item_bytes):
        """A u64 count of things that take at least item_bytes each; they must fit."""
        n = self.scalar("<Q")
        if n * item_bytes > len(self.buf) - self.pos:
            raise GGUFError(f"{self.path}: truncated file or bad header ({n} {what} cannot "
                            f"fit in the {len(self.buf) - self.pos} bytes left)")
        return n

    def string(self):
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype, depth=0):
        if vtype in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item_type = self.scalar("<I")
            if item_type not in MIN_BYTES:
                raise GGUFError(f"{self.path}: unknown metadata value type {item_type}")
            if depth == MAX_NESTING:
                raise GGUFError(f"{self.path}: metadata arrays nested more than "
                                f"{MAX_NESTING} deep")
            count = self.count("array items", MIN_BYTES[item_type])
            return [self.value(item_type, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype}")


class GGUFFile:
    """A GGUF file: `.metadata` (dict), `.tensors` (name -> TensorInfo), `.tensor(name)`."""

    def __init__(self, path):
        self.path = str(path)
        try:
            # memmap: tensors are read lazily, only the header is parsed up front
            self.buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: cannot open ({e})") from None
        cur = _Cursor(self.buf, self.path)
        if bytes(cur.take(4)) != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (wrong magic)")
        version = cur.scalar("<I")
        if version != 3:
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (need 3)")
        n_tensors = cur.count("tensors", 24)    # name length, n_dims, type, offset
        n_kv = cur.count("metadata entries", 13)  # key length, value type, one byte

        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor '{name}' has {n_dims} dimensions "
                                f"(at most {MAX_DIMS})")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, dims, type_id, offset))

        alignment = self.metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment must be a power of two, "
                            f"not {alignment!r}")
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        self.tensors = {}
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor '{name}' is listed twice")
            type_name = GGML_TYPE_NAMES.get(type_id, f"unknown type id {type_id}")
            info = TensorInfo(name, tuple(reversed(dims)), type_name, data_start + offset)
            if type_name in SUPPORTED:  # (tensor() refuses other types when asked for them)
                self._n_bytes(info)     # its data must lie inside the file
            self.tensors[name] = info

    def _n_bytes(self, info):
        """Bytes of a tensor's data, checked to be whole blocks that end inside the file."""
        per_block, block_bytes = SUPPORTED[info.type_name]
        n_values = math.prod(info.shape)  # Python integers: no overflow
        if n_values % per_block:
            raise GGUFError(f"{self.path}: tensor '{info.name}' has {n_values} values, not "
                            f"whole blocks of {per_block} ({info.type_name})")
        n_bytes = n_values // per_block * block_bytes
        if info.offset + n_bytes > len(self.buf):
            raise GGUFError(f"{self.path}: tensor '{info.name}' runs past the end of the file "
                            f"(truncated?)")
        return n_bytes

    def tensor(self, name):
        """Dequantize one tensor to a float32 numpy array of its PyTorch shape."""
        info = self.tensors[name]
        if info.type_name not in SUPPORTED:
            raise GGUFError(f"{self.path}: tensor '{name}' has type {info.type_name}, "
                            f"which this reader does not support "
                            f"(supported: {', '.join(SUPPORTED)})")
        raw = np.asarray(self.buf[info.offset:info.offset + self._n_bytes(info)])
        return dequantize(raw, info.type_name).reshape(info.shape)


def dequantize(raw, type_name):
    """Raw bytes (uint8 array) of one tensor -> flat float32 array."""
    if type_name == "F32":
        return raw.view(np.float32).copy()
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if type_name == "BF16":
        # bf16 is the top half of an f32: shift the 16 bits into place
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    per_block, block_bytes = SUPPORTED[type_name]
    blocks = raw.reshape(-1, block_bytes)                        # (n_blocks, block_bytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1) scale
    if type_name == "Q8_0":
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)   # (n_blocks, 32)
        return (d * q).reshape(-1)
    packed = blocks[:, -16:]                                     # (n_blocks, 16) two nibbles each
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1)     # (n_blocks, 32) low, then high
    q = q.astype(np.float32)
    if type_name == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1) offset
    return (d * q + m).reshape(-1)                               # Q4_1
