"""The hand-written safetensors reader and writer against the safetensors package."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from safetensors_file import SafetensorsError, read_safetensors, write_safetensors

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
