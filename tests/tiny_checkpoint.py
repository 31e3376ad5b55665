"""A tiny random Llama checkpoint folder (config.json, model.safetensors, tokenizer.json)
with a byte-level vocabulary of 256 bytes + 3 ChatML special tokens: the whole pipeline
runs on it in seconds."""
import json

import torch

from loaders.safetensors_file import write_safetensors
from loaders.tokenizer import BYTE_OF_CHAR

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system'"
            " %}{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
            "'\\n'}}{% endfor %}")


def write_tiny_checkpoint(folder, seed=0, layers=2, width=32):
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(BYTE_OF_CHAR, key=BYTE_OF_CHAR.get)          # byte order
    vocab = {c: i + len(SPECIALS) for i, c in enumerate(chars)}
    n_vocab = len(SPECIALS) + 256
    (folder / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(SPECIALS)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    config = {"model_type": "llama", "vocab_size": n_vocab, "hidden_size": width,
              "intermediate_size": 2 * width, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    hd, kv = width // 4, 2 * (width // 4)
    shapes = {"model.embed_tokens.weight": (n_vocab, width), "model.norm.weight": (width,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (width,),
                   p + "post_attention_layernorm.weight": (width,),
                   p + "self_attn.q_proj.weight": (4 * hd, width),
                   p + "self_attn.k_proj.weight": (kv, width),
                   p + "self_attn.v_proj.weight": (kv, width),
                   p + "self_attn.o_proj.weight": (width, 4 * hd),
                   p + "mlp.gate_proj.weight": (2 * width, width),
                   p + "mlp.up_proj.weight": (2 * width, width),
                   p + "mlp.down_proj.weight": (width, 2 * width)}
    tensors = {name: (torch.ones(shape) if name.endswith("norm.weight")
                      else torch.randn(shape, generator=g) * 0.2)
               for name, shape in shapes.items()}
    write_safetensors(folder / "model.safetensors", tensors)
    return folder
