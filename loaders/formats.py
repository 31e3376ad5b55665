"""What each checkpoint format calls things, read into ours: model.Config and our tensor names.

    read_gguf(path)           a GGUF file: its metadata keys ({arch}.block_count, ...) and
                              tensor names (blk.{i}.attn_q.weight, ...); llama's q/k rows
                              put back in the order our rotary positions expect
    read_hf_folder(folder)    a Hugging Face folder: config.json's keys (num_hidden_layers,
                              ...) and tensor names (model.layers.{i}.self_attn.q_proj.weight)
Each returns (Config, {our name: tensor}, tokenizer). The name maps are explicit, so a
tensor nobody expects is an error (loaders/checkpoint.py checks the rest: shapes, missing).
Metadata is checked key by key (setting(), make_config()) before anything is built.
"""
import json
import math
from pathlib import Path

import torch

from loaders.gguf_file import GGUFFile
from loaders.safetensors_file import read_safetensors
from loaders.tokenizer import tokenizer_from_gguf, tokenizer_from_json
from model import Config


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# ------------------------------------------------------------------------------ metadata
REQUIRED = object()  # setting()'s default for the keys a checkpoint must have


def setting(values, key, kind, where, default=REQUIRED):
    """values[key], checked to be a `kind` (int, float or bool; numbers must be positive).
    A missing (or null) key gives the default; a missing required key is an error."""
    value = values.get(key)
    if value is None:
        if default is REQUIRED:
            raise CheckpointError(f"{where} '{key}' is missing")
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = type(value) is int and value > 0
    else:  # a float may be written as an integer
        ok = type(value) in (int, float) and 0 < value < math.inf
    if not ok:
        need = {bool: "true or false", int: "a positive integer", float: "a positive number"}
        raise CheckpointError(f"{where} '{key}' must be {need[kind]}, not {value!r}")
    return value


def make_config(where, n_tensors, **fields):
    """Config(**fields) once the sizes fit together (and head_dim=None: d_model // n_head)."""
    if fields["head_dim"] is None:
        fields["head_dim"] = fields["d_model"] // fields["n_head"]
    cfg = Config(**fields)
    if cfg.head_dim < 2 or cfg.head_dim % 2:
        raise CheckpointError(f"{where}: head size {cfg.head_dim} must be even and positive "
                              f"(rotary positions rotate pairs)")
    if cfg.n_head % cfg.n_kv_head:
        raise CheckpointError(f"{where}: {cfg.n_head} query heads cannot share "
                              f"{cfg.n_kv_head} key/value heads evenly")
    if cfg.n_layer > n_tensors:  # each block has tensors of its own
        raise CheckpointError(f"{where}: {cfg.n_layer} blocks, but the checkpoint holds "
                              f"only {n_tensors} tensors")
    return cfg


def read_json(file):
    """A JSON object from a file; anything else is an error naming the file."""
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:  # nested thousands deep: no config is
        raise CheckpointError(f"{file}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return data


def name_map(cfg, top_names, block_names, block_prefix):
    """{our name: theirs} for every tensor a model of cfg holds: the top-level ones (the
    separate lm_head only when the embeddings are untied) and each block's, theirs being
    f"{block_prefix}{i}.{name}" for block i."""
    names = {ours: theirs for ours, theirs in top_names.items()
             if ours != "lm_head.weight" or not cfg.tie_embeddings}
    for i in range(cfg.n_layer):
        for ours, theirs in block_names.items():
            names[f"blocks.{i}.{ours}"] = f"{block_prefix}{i}.{theirs}"
    return names


# ---------------------------------------------------------------------------------- GGUF
GGUF_TOP_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
# our name <- GGUF name, per block (blk.{i}.<name>)
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

    def get(key, kind=int, default=REQUIRED):
        return setting(meta, f"{arch}.{key}", kind, f"{path}: metadata", default)

    tokens = meta.get("tokenizer.ggml.tokens")
    n_head = get("attention.head_count")
    return make_config(
        path, len(tensor_names),
        vocab_size=len(tokens) if isinstance(tokens, list) and tokens else get("vocab_size"),
        n_layer=get("block_count"), n_head=n_head,
        n_kv_head=get("attention.head_count_kv", default=n_head),
        d_model=get("embedding_length"), head_dim=get("attention.key_length", default=None),
        d_ff=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_theta=get("rope.freq_base", float, 10000.0), max_seq_len=get("context_length"),
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
    rename = name_map(cfg, GGUF_TOP_NAMES, GGUF_BLOCK_NAMES, "blk.")
    used = {theirs: ours for ours, theirs in rename.items() if theirs in g.tensors}
    unexpected = sorted(set(g.tensors) - set(used))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}")
    weights, llama = {}, g.metadata["general.architecture"] == "llama"
    for theirs, ours in used.items():
        w = torch.from_numpy(g.tensor(theirs))
        rotated = ours.endswith(("q_proj.weight", "k_proj.weight"))
        heads = cfg.n_head if ours.endswith("q_proj.weight") else cfg.n_kv_head
        # (a weight of the wrong shape is left as it is, for check_weights to report)
        if llama and rotated and w.shape[0] == heads * cfg.head_dim:
            w = unpermute_rotary(w, heads)
        weights[ours] = w
    return cfg, weights, tokenizer_from_gguf(g.metadata, path)


# ----------------------------------------------------------------- Hugging Face folders
HF_ARCHITECTURES = ("llama", "qwen2", "mistral")
HF_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}
# our name <- Hugging Face name, per block (model.layers.{i}.<name>)
HF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.{t}": f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}


def config_from_hf(c, path, n_tensors):
    arch = c.get("model_type")
    if arch not in HF_ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture '{arch}' "
                              f"(supported: {', '.join(HF_ARCHITECTURES)})")
    # newer transformers write rope settings into rope_parameters, older ones at the top level
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope settings {rope!r} are not a JSON object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: rope scaling '{rope.get('rope_type')}' is not supported")
    if arch == "mistral" and c.get("sliding_window") is not None:
        raise CheckpointError(f"{path}: sliding-window attention is not supported")

    def get(key, kind=int, default=REQUIRED):
        return setting(c, key, kind, f"{path}: key", default)

    n_head = get("num_attention_heads")
    return make_config(
        path, n_tensors,
        vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"), n_head=n_head,
        n_kv_head=get("num_key_value_heads", default=n_head), d_model=get("hidden_size"),
        head_dim=get("head_dim", default=None), d_ff=get("intermediate_size"),
        norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=setting(rope, "rope_theta", float, f"{path}: key",
                           get("rope_theta", float, 10000.0)),
        max_seq_len=get("max_position_embeddings", default=4096),
        tie_embeddings=get("tie_word_embeddings", bool, arch != "llama"),
        qkv_bias=arch == "qwen2" or get("attention_bias", bool, False))


def read_hf_folder(folder):
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = read_json(config_file)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise CheckpointError(f"{folder}: missing tokenizer (no tokenizer.json)")
    theirs = {}
    for file in safetensors_files(folder):
        for name, tensor in read_safetensors(file)[0].items():
            if name in theirs:
                raise CheckpointError(f"{file}: tensor '{name}' is in two shards")
            theirs[name] = tensor
    cfg = config_from_hf(config, config_file, len(theirs))
    names = name_map(cfg, HF_TOP_NAMES, HF_BLOCK_NAMES, "model.layers.")
    rename = {hf: ours for ours, hf in names.items()}  # theirs -> ours
    weights = {}
    for name, tensor in theirs.items():
        if name.endswith("rotary_emb.inv_freq"):  # a cached buffer older versions saved
            continue
        weights[rename.get(name, name)] = tensor  # unknown names stay, and are reported
    template = ""
    if (folder / "tokenizer_config.json").exists():
        template = read_json(folder / "tokenizer_config.json").get("chat_template") or ""
    if (folder / "chat_template.jinja").exists():  # where newer transformers keep it
        template = (folder / "chat_template.jinja").read_text()
    if not isinstance(template, str):  # (a list of named templates is not supported)
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: chat_template is not "
                              f"a string")
    tokenizer = tokenizer_from_json(read_json(tokenizer_file), template, tokenizer_file)
    return cfg, weights, tokenizer


def safetensors_files(folder):
    """The weight files of a folder: model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        if not (folder / "model.safetensors").exists():
            raise CheckpointError(f"{folder}: no model.safetensors or "
                                  f"model.safetensors.index.json")
        return [folder / "model.safetensors"]
    weight_map = read_json(index).get("weight_map")  # tensor name -> shard file name
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map object")
    names = sorted(set(weight_map.values()), key=str)
    for name in names:  # a shard is a file in this folder, never a path elsewhere
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard {name!r} is not a file name in the folder")
    return [folder / name for name in names]
