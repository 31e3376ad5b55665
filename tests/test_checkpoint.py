"""Hugging Face folders written by transformers itself load to the same logits; bad
checkpoints are one-line errors that name the file and the problem."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loaders.checkpoint import CheckpointError, load

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("tok")
    hf_tokenizer.save_pretrained(folder)
    return folder


def save_tiny(folder, tokenizer_json, kind="llama", dtype=torch.float32, shard="5GB",
              **config):
    torch.manual_seed(0)
    if kind == "llama":
        ref = LlamaForCausalLM(LlamaConfig(**TINY, rope_theta=5000.0, **config))
    else:
        ref = Qwen2ForCausalLM(Qwen2Config(**TINY, **config))
    ref = ref.to(dtype).eval()
    ref.save_pretrained(folder, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_json / name).exists():
            shutil.copy(tokenizer_json / name, folder / name)
    return ref


def assert_same_logits(folder, ref, dtype, tol):
    model, tok = load(folder, device="cpu", dtype=dtype)
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 64, 1], [0, 0, 0, 7, 7, 21, 50, 2]])
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got, _ = model(ids, attention_mask=mask)
        expected = ref(input_ids=ids, attention_mask=mask).logits
    assert (got.float() - expected.float())[mask.bool()].abs().max() < tol
    return model, tok


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_folder(tmp_path, tokenizer_json, dtype, tol, tied):
    ref = save_tiny(tmp_path, tokenizer_json, dtype=dtype, tie_word_embeddings=tied)
    model, tok = assert_same_logits(tmp_path, ref, dtype, tol)
    assert model.cfg.tie_embeddings == tied
    assert tok.encode("Hello 123") == [19556, 216, 33, 34, 35]


def test_qwen2_folder_with_bias(tmp_path, tokenizer_json):
    ref = save_tiny(tmp_path, tokenizer_json, kind="qwen2")
    model, _ = assert_same_logits(tmp_path, ref, torch.float32, 1e-4)
    assert model.cfg.qkv_bias


def test_sharded_folder(tmp_path, tokenizer_json):
    ref = save_tiny(tmp_path, tokenizer_json, shard="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_logits(tmp_path, ref, torch.float32, 1e-4)


def test_old_style_config(tmp_path, tokenizer_json):
    """Older transformers wrote rope_theta at the top level, not in rope_parameters."""
    ref = save_tiny(tmp_path, tokenizer_json)
    config = json.loads((tmp_path / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_theta=theta, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = assert_same_logits(tmp_path, ref, torch.float32, 1e-4)
    assert model.cfg.rope_theta == 5000.0


def edit_weights(folder, change):
    from safetensors.torch import load_file, save_file
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")


@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensor.*mlp.up_proj"),
    (lambda w: w.update(extra=torch.zeros(2)), r"unexpected tensor.*extra"),
    (lambda w: w.update({"model.norm.weight": torch.ones(31)}),
     r"'norm.weight' has shape \(31,\), the config needs \(32,\)"),
])
def test_bad_weights(tmp_path, tokenizer_json, change, message):
    save_tiny(tmp_path, tokenizer_json)
    edit_weights(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path, device="cpu")


def test_unknown_architecture(tmp_path, tokenizer_json):
    save_tiny(tmp_path, tokenizer_json)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match="config.json: unknown architecture 'gpt_neox'"):
        load(tmp_path, device="cpu")


def test_missing_tokenizer(tmp_path, tokenizer_json):
    save_tiny(tmp_path, tokenizer_json)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer"):
        load(tmp_path, device="cpu")


def test_unknown_gguf_architecture(tmp_path):
    from gguf import GGUFWriter
    w = GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                 w.close):
        step()
    with pytest.raises(CheckpointError, match="m.gguf: unknown architecture 'mamba'"):
        load(tmp_path / "m.gguf", device="cpu")


@pytest.mark.parametrize("content,message", [
    (b"not a model at all", "not a GGUF file"), (None, "no such file or folder")])
def test_command_line_error_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    run = subprocess.run([sys.executable, "generate.py", "--prompt", "hi", "--checkpoint",
                          str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and str(path) in run.stderr and message in run.stderr
