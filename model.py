"""A Llama-family decoder (Llama, SmolLM2, Qwen2) in plain PyTorch, nanoGPT style.

    tokens -> embedding -> n_layer x Block -> RMSNorm -> linear head -> logits
    Block:   x = x + Attention(RMSNorm(x))      grouped-query attention with rotary positions
             x = x + MLP(RMSNorm(x))            SwiGLU

The residual stream `x` after block l is what steering adds to and what activation
measurements read: `model.blocks[l]` returns it, so a forward hook on that module sees
(and may replace) it. Weights come from loaders/checkpoint.py: `load(path)`, which
builds a GPT from a checkpoint's config and fills in its tensors.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Attention has two implementations that give the same numbers: the math written out
# (read it to see what attention is) and PyTorch's fused kernel (faster). tests check both.
FUSED_ATTENTION = True


@dataclass
class Config:
    vocab_size: int = 49152       # number of rows in the token embedding
    n_layer: int = 30             # number of transformer blocks
    n_head: int = 9               # query heads per attention layer
    n_kv_head: int = 3            # key/value heads; each serves n_head // n_kv_head query heads
    d_model: int = 576            # width of the residual stream
    head_dim: int = 64            # width of one attention head
    d_ff: int = 1536              # hidden width of the SwiGLU MLP
    norm_eps: float = 1e-5        # epsilon inside RMSNorm's square root
    rope_theta: float = 100000.0  # base of the rotary-embedding frequencies
    max_seq_len: int = 8192       # longest sequence the model was trained on
    tie_embeddings: bool = True   # the output head reuses the token embedding matrix
    qkv_bias: bool = False        # q/k/v projections have biases (Qwen2 does)


def auto_device():
    """CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def auto_dtype(device):
    """bf16 where the hardware runs it fast (CUDA), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as the reference does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions, head_dim, theta, dtype):
    """cos and sin of angle position * theta^(-2i/head_dim), shape (B, 1, T, head_dim).
    Each frequency appears twice, for the two halves of a head (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device)
                               .float() / head_dim)                     # (head_dim/2,)
    angles = positions[..., None].float() * inv_freq                   # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]              # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + head_dim/2]) by its angle. x: (B, nh, T, hs)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)      # (B, nh, T, hs)
    return x * cos + rotated * sin


def attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hs), masked) v.  q: (B, nh, T, hs), k and v: (B, n_kv, S, hs),
    mask: (B, 1, T, S) bool, True where a query may look at a key; None = causal."""
    if FUSED_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=True)
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)                             # (B, nh, S, hs)
    v = v.repeat_interleave(groups, dim=1)                             # (B, nh, S, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))           # (B, nh, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v                                  # (B, nh, T, hs)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, queries=None):
        """queries: only the last `queries` positions ask (Q = queries, default T); every
        position still gives its key and value. Returns (B, Q, d_model)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        Q = queries or T
        q = self.q_proj(x[:, T - Q:]).view(B, Q, -1, hd).transpose(1, 2)  # (B, nh, Q, hs)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)             # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)             # (B, n_kv, T, hs)
        q = apply_rotary(q, cos[:, :, T - Q:], sin[:, :, T - Q:])
        k = apply_rotary(k, cos, sin)
        if cache is not None:  # prepend the keys and values of earlier positions
            k, v = cache.store(layer, k, v)                                # (B, n_kv, S, hs)
        if mask is not None:
            mask = mask[:, :, T - Q:]                                      # (B, 1, Q, S)
        y = attention(q, k, v, mask)                                       # (B, nh, Q, hs)
        y = y.transpose(1, 2).reshape(B, Q, -1)                            # (B, Q, nh * hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, queries=None):
        """queries: the output only at the last `queries` positions (B, queries, d_model);
        the attention still reads every position's key and value."""
        h = self.attn_norm(x)
        if queries:
            x = x[:, -queries:]                                            # (B, Q, d_model)
        x = x + self.attn(h, cos, sin, mask, cache, self.layer, queries)
        x = x + self.mlp(self.mlp_norm(x))
        return x  # (B, T or Q, d_model): the residual stream after this block


class KVCache:
    """Keys and values of every position seen so far, per block, in preallocated buffers."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored; the model advances it after each forward

    def store(self, layer, k, v):
        """Write this step's k, v (B, n_kv, T, hs); return all so far (B, n_kv, S, hs)."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n):
        """Each row becomes n consecutive copies (to sample one prompt n times)."""
        self.k = self.k.repeat_interleave(n, dim=1)       # (n_layer, B * n, n_kv, max_len, hs)
        self.v = self.v.repeat_interleave(n, dim=1)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        for module in self.modules():  # small random weights; checkpoints overwrite them
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, attention_mask=None, cache=None, last_only=False,
                vocab=None):
        """idx: (B, T) token ids. attention_mask: (B, S) with 1 for real tokens and 0 for
        padding, S = tokens in the cache + T (left padding: each row's text ends at the right).
        targets: (B, T) next-token ids, -100 where no loss is taken.
        vocab: (V,) token ids: the logits of these tokens only (V columns, in that order), for
        decoding that may sample nothing else (generate.py's constrained decoding).
        Returns logits (B, T, vocab) (only the last position if last_only) and the loss."""
        x = self.embed(idx)                                                # (B, T, d_model)
        x = self.norm(self.run_blocks(x, attention_mask, cache))
        if last_only:
            x = x[:, -1:]                                                  # (B, 1, d_model)
        if vocab is not None:  # the head's rows of those tokens only
            return F.linear(x, self.lm_head.weight[vocab]), None          # (B, T, V)
        logits = self.lm_head(x)                                           # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=-100)
        return logits, loss

    def run_blocks(self, x, attention_mask=None, cache=None, first=0, last=None,
                   final_positions=None):
        """Blocks first .. last-1 (default: all) on the residual stream x (B, T, d_model);
        returns the stream after them. A later `first` continues from a stream saved after
        block first-1 (batches.py caches it); an earlier `last` stops there (steer.py reads
        the stream after a block without running the rest). final_positions = P: the last
        block computes only the last P positions, (B, P, d_model): a loss read only there
        (student.py) saves that block's queries and MLP elsewhere (its keys stay whole)."""
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None and past == 0 and final_positions is None:  # plain causal
            positions = torch.arange(T, device=x.device).expand(B, T)        # (B, T)
            mask = None
        else:
            real = (attention_mask.bool() if attention_mask is not None       # (B, S)
                    else torch.ones(B, past + T, dtype=torch.bool, device=x.device))
            # each row counts positions from its first real token, so padding shifts nothing
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            query_at = torch.arange(past, past + T, device=x.device)[:, None]  # (T, 1)
            key_at = torch.arange(past + T, device=x.device)[None, :]          # (1, S)
            causal = key_at <= query_at                                    # (T, S)
            mask = causal & real[:, None, :]                               # (B, T, S)
            # a padding query sees no real key; let it see itself so softmax stays finite
            mask = (mask | (key_at == query_at))[:, None]                  # (B, 1, T, S)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta,
                                  self.embed.weight.dtype)
        blocks = self.blocks[first:last]
        if final_positions is not None and len(blocks) == 0:  # nothing to run: just the cut
            x = x[:, -final_positions:]                                    # (B, P, d_model)
        for i, block in enumerate(blocks):
            queries = final_positions if i == len(blocks) - 1 else None
            x = block(x, cos, sin, mask, cache=cache, queries=queries)  # steer.py reads cache=
        if cache is not None:
            cache.length += T
        return x                                          # (B, T or final_positions, d_model)
