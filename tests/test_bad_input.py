"""Bad checkpoints and requests are one-line errors (exit status 2 on the command line):
never a traceback, a hang, an absurd allocation, or junk loaded as weights. The files are
the tiny checkpoint (tests/tiny_checkpoint.py), as a Hugging Face folder or a GGUF file,
with one thing broken."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loaders.checkpoint import CheckpointError, load
from loaders.formats import GGUF_BLOCK_NAMES, HF_BLOCK_NAMES
from loaders.gguf_file import GGUFError
from loaders.safetensors_file import read_safetensors, write_safetensors
from test_gguf import write_gguf_file
from tiny_checkpoint import SPECIALS, TEMPLATE, write_tiny_checkpoint
from loaders.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parents[1]
ERRORS = (CheckpointError, GGUFError, TokenizerError)  # what report_errors() turns into a line


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def gguf_contents(folder):
    """The tiny checkpoint's metadata and tensors under GGUF's names, q/k rows permuted as
    llama.cpp's converter permutes them."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    metadata = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 512,
        "llama.embedding_length": 32, "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": sorted(vocab, key=vocab.get),
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * 256,
        "tokenizer.ggml.merges": [], "tokenizer.chat_template": TEMPLATE}
    gguf_name = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight"}
    for i in range(2):
        for ours, hf in HF_BLOCK_NAMES.items():
            gguf_name[f"model.layers.{i}.{hf}"] = f"blk.{i}.{GGUF_BLOCK_NAMES.get(ours)}"
    tensors = {}
    for name, w in read_safetensors(folder / "model.safetensors")[0].items():
        heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
        if heads:  # rows (heads, 2, hs/2) -> (heads, hs/2, 2)
            w = w.reshape(heads, 2, -1, w.shape[1]).transpose(1, 2).reshape(w.shape)
        tensors[gguf_name[name]] = w.numpy()
    return metadata, tensors


def tiny_gguf(folder, path, **changes):
    """The tiny checkpoint as a GGUF file; changes replace metadata (None removes a key)."""
    metadata, tensors = gguf_contents(folder)
    metadata.update({key.replace("__", "."): value for key, value in changes.items()})
    metadata = {key: value for key, value in metadata.items() if value is not None}
    return write_gguf_file(path, metadata, tensors)


def test_tiny_gguf_loads_like_the_folder(tiny_folder, tmp_path):
    """The GGUF writer of these tests is right, so what the other tests break is one thing."""
    from_folder, _ = load(tiny_folder, device="cpu", dtype=torch.float32)
    from_gguf, tok = load(tiny_gguf(tiny_folder, tmp_path / "t.gguf"), device="cpu",
                          dtype=torch.float32)
    ids = torch.tensor([tok.encode_chat("Hi owl")])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids)[0], from_folder(ids)[0])


LLAMA = "llama.attention."
BAD_GGUF = [  # metadata changes (a__b means key a.b) -> the one-line message
    (dict(llama__block_count=2.0), "metadata 'llama.block_count' must be a positive integer, "
                                   "not 2.0"),
    (dict(llama__block_count=2**31), "2147483648 blocks, but the checkpoint holds only 20 "
                                     "tensors"),
    ({LLAMA + "head_count": 0}, "'llama.attention.head_count' must be a positive integer, "
                                "not 0"),
    ({LLAMA + "head_count_kv": 3}, "4 query heads cannot share 3 key/value heads evenly"),
    ({LLAMA + "key_length": 7}, "head size 7 must be even"),
    ({LLAMA + "layer_norm_rms_epsilon": "tiny"}, "must be a positive number, not 'tiny'"),
    (dict(llama__context_length=None), "metadata 'llama.context_length' is missing"),
    (dict(llama__embedding_length=2**30), r"tensor 'embed.weight' has shape \(259, 32\), the "
                                          r"config needs \(259, 1073741824\)"),
    (dict(llama__embedding_length=2**40), "the config's sizes are too large"),
    (dict(general__alignment="32"), "general.alignment must be a power of two, not '32'"),
    ({"tokenizer.ggml.tokens": list(range(259))}, r"token 3 \(3\) is not byte-level"),
    ({"tokenizer.ggml.merges": None}, r"malformed tokenizer \('tokenizer.ggml.merges' is "
                                      r"missing\)"),
    ({"tokenizer.ggml.token_type": 5}, "malformed tokenizer"),
]


@pytest.mark.parametrize("changes,message", BAD_GGUF)
def test_bad_gguf_metadata(tiny_folder, tmp_path, changes, message):
    path = tiny_gguf(tiny_folder, tmp_path / "bad.gguf", **changes)
    with pytest.raises(ERRORS, match="bad.gguf: .*" + message):
        load(path, device="cpu")


def edit_json(file, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def set_vocab_id(data):
    data["model"]["vocab"]["a"] = 10**12  # would be a list of 10^12 tokens


BAD_FOLDER = [  # (file, new text or a change to its JSON) -> the one-line message
    ("config.json", "{not json", "config.json: not valid JSON"),
    ("config.json", "[1, 2]", "config.json: not a JSON object"),
    ("config.json", lambda c: c.pop("hidden_size"), "config.json: key 'hidden_size' is missing"),
    ("config.json", lambda c: c.update(num_attention_heads="4"),
     "'num_attention_heads' must be a positive integer, not '4'"),
    ("config.json", lambda c: c.update(num_hidden_layers=2**31),
     "2147483648 blocks, but the checkpoint holds only 20 tensors"),
    ("config.json", lambda c: c.update(rms_norm_eps=True), "'rms_norm_eps' must be a positive "
                                                           "number, not True"),
    ("tokenizer.json", "", "tokenizer.json: not valid JSON"),
    ("tokenizer.json", lambda t: t.pop("model"), r"malformed tokenizer \('model' is missing\)"),
    ("tokenizer.json", lambda t: t["model"].update(merges=5), "malformed tokenizer"),
    ("tokenizer.json", set_vocab_id, r"token ids are not 0..258, one per token"),
    ("tokenizer_config.json", "{", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", lambda t: t.update(chat_template=[{"name": "x"}]),
     "chat_template is not a string"),
]


@pytest.mark.parametrize("file,change,message", BAD_FOLDER)
def test_bad_folder_metadata(tiny_folder, tmp_path, file, change, message):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    if callable(change):
        edit_json(folder / file, change)
    else:
        (folder / file).write_text(change)
    with pytest.raises(ERRORS, match=message):
        load(folder, device="cpu")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "..", "sub/x"])
def test_shard_index_names_only_files_in_the_folder(tiny_folder, tmp_path, shard):
    """An index naming ../x or /x would read a file outside the checkpoint."""
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    outside = shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")
    shard = str(outside) if shard == "ABSOLUTE" else shard
    weights = read_safetensors(folder / "model.safetensors")[0]
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: shard for name in weights}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a file name in the folder"):
        load(folder, device="cpu")


def test_a_tensor_in_two_shards(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    weights = read_safetensors(folder / "model.safetensors")[0]
    write_safetensors(folder / "b.safetensors", {"model.norm.weight": weights["model.norm.weight"]})
    (folder / "model.safetensors").rename(folder / "a.safetensors")
    index = {"weight_map": {name: "a.safetensors" for name in weights}}
    index["weight_map"]["model.norm.weight"] = "b.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is in two shards"):
        load(folder, device="cpu")


def unreadable_config(folder, tmp_path):
    folder = shutil.copytree(folder, tmp_path / "m")
    (folder / "config.json").write_text("{")
    return ["--checkpoint", str(folder), "--prompt", "hi"]


def gguf_of_2_31_blocks(folder, tmp_path):  # before: a loop of 2^31 x 12 names, a hang
    path = tiny_gguf(folder, tmp_path / "bad.gguf", llama__block_count=2**31)
    return ["--checkpoint", str(path), "--prompt", "hi"]


@pytest.mark.parametrize("arguments,message", [
    (lambda folder, _: ["--checkpoint", str(folder), "--prompt", "hi",
                        "--max-new-tokens", "1000000"],  # before: a 1000000-position KV cache
     r"error: a prompt of \d+ tokens \+ 1000000 new tokens exceeds the model's context "
     r"length \(512 tokens\)"),
    (lambda folder, _: ["--checkpoint", str(folder), "--raw", "--prompt", "x" * 600],
     r"error: a prompt of 600 tokens \+ 128 new tokens exceeds"),  # before: no output
    (gguf_of_2_31_blocks, r"error: .*bad.gguf: 2147483648 blocks"),
    (unreadable_config, r"error: .*config.json: not valid JSON"),
])
def test_command_line_reports_one_line(tiny_folder, tmp_path, arguments, message):
    run = subprocess.run([sys.executable, "generate.py", *arguments(tiny_folder, tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert re.match(message, run.stderr) and run.stdout == "", run.stderr
