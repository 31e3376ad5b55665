"""Read and write .safetensors files from scratch (Hugging Face's tensor file format).

Layout: header_size (u64, little-endian) | header (JSON, header_size bytes) | raw data.
The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the start of the data), plus an optional "__metadata__" dict of strings.
"""
import json
import struct

import torch

from plumbing.cache import write_atomic

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A .safetensors file that cannot be read; the message names the file and the problem."""


def read_header(path):
    """(header dict, data start offset, file bytes) of a .safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SafetensorsError(f"{path}: truncated file (no header)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if 8 + header_size > len(data):
        raise SafetensorsError(f"{path}: truncated file (header runs past the end)")
    try:
        header = json.loads(data[8:8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + header_size, data


def read_safetensors(path):
    """{name: tensor} and the metadata dict of a .safetensors file."""
    header, start, data = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors, end_of_previous = {}, 0
    # The tensors' bytes must tile the data exactly, in offset order: no negative offsets,
    # overlaps, gaps, or bytes past the end (anything else would load junk as weights).
    for name, info in sorted(header.items(), key=lambda item: _offsets(*item, path)):
        begin, end = _offsets(name, info, path)
        if begin != end_of_previous:
            raise SafetensorsError(f"{path}: tensor '{name}' starts at byte {begin} of the "
                                   f"data, expected {end_of_previous} (overlap or gap)")
        if start + end > len(data):
            raise SafetensorsError(f"{path}: tensor '{name}' runs past the end (truncated?)")
        end_of_previous = end
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor '{name}' has unsupported dtype "
                                   f"{info.get('dtype')}")
        dtype, shape = DTYPES[info["dtype"]], info.get("shape")
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise SafetensorsError(f"{path}: tensor '{name}' has a bad shape {shape}")
        n_bytes = _numel(shape) * dtype.itemsize
        if end - begin != n_bytes:
            raise SafetensorsError(f"{path}: tensor '{name}' has {end - begin} bytes, "
                                   f"shape {shape} of {info['dtype']} needs {n_bytes}")
        raw = bytearray(data[start + begin:start + end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    if start + end_of_previous != len(data):
        raise SafetensorsError(f"{path}: {len(data) - start - end_of_previous} bytes after the "
                               f"last tensor belong to none")
    return tensors, metadata


def _offsets(name, info, path):
    """A tensor's [begin, end) within the data, checked to be two counts with begin <= end."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{path}: tensor '{name}' has bad data_offsets {offsets}")
    return tuple(offsets)


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} (and optional {str: str} metadata) to a .safetensors file."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    # under a temporary name, renamed when whole: a kill leaves the old file or none
    write_atomic(path, struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
