"""Decoding at fixed shapes, so that one step can be compiled (and, on a GPU, replayed as a
CUDA graph): generate()'s fast path, `generate(..., static=True)`.

A small model on a GPU spends most of each decoding step launching kernels, not computing:
30 blocks of a dozen small operations each. A CUDA graph records one step's kernels once and
replays them with a single launch, but only if every step has the same shapes and uses the
same memory. generate()'s readable path has neither: the attention reads the first `length`
positions of the KV cache, one more each step. Here each step instead
  - writes its keys and values at position `pos` (a tensor, so its value can change
    between replays) of the preallocated cache;
  - attends over the whole cache, with the mask hiding what is not yet written;
  - takes each row's rotary position as a tensor too.
The numbers are those of the readable path (tests/test_generate.py); only the order of the
work differs. torch.compile fuses the step's small operations; mode "reduce-overhead" adds
the CUDA graph. On the CPU the step runs as written unless compile=True.
"""
import functools

import torch

from model import rotary_cos_sin


class StaticKVCache:
    """A prefilled model.KVCache whose further positions are written at a tensor index."""

    def __init__(self, cache):
        self.k, self.v = cache.k, cache.v             # (n_layer, B, n_kv, max_len, hs) each
        self.length = cache.length  # > 0: steering hooks see decoding steps, as they should
        self.pos = torch.zeros(1, dtype=torch.long, device=cache.k.device)  # the next position

    def store(self, layer, k, v):
        """Write this step's k, v (B, n_kv, 1, hs) at `pos`; return the whole buffers
        (B, n_kv, max_len, hs): the mask hides the positions not written yet."""
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]


def decode_step(model, cache, token, positions, attend):
    """One step: token (B,), positions (B, 1), attend (B, 1, 1, max_len) bool, cache a
    StaticKVCache whose `pos` is set -> logits (B, 1, vocab)."""
    x = model.embed(token[:, None])                                        # (B, 1, d)
    cos, sin = rotary_cos_sin(positions, model.cfg.head_dim, model.cfg.rope_theta,
                              model.embed.weight.dtype)
    for block in model.blocks:
        x = block(x, cos, sin, attend, cache=cache)  # steering hooks read cache=
    return model.lm_head(model.norm(x))                                    # (B, 1, vocab)


@functools.cache
def compiled_decode_step(mode):
    """decode_step compiled once per process (a new generate() call reuses the compiled
    code: dynamo checks the new call's shapes, not its objects)."""
    return torch.compile(decode_step, mode=mode)


class StaticDecoder:
    """Decoding steps of `model` at fixed shapes, after generate()'s prefill.
    mask: generate()'s (B, P + max_new_tokens) attention mask, updated in place by the
    caller (1 at each row's real tokens so far)."""

    def __init__(self, model, cache, mask, prompt_len, compile=False):
        self.model, self.cache, self.mask = model, StaticKVCache(cache), mask
        self.P = prompt_len
        self.start = mask[:, :prompt_len].sum(-1, keepdim=True)    # (B, 1) real prompt tokens
        self.step_fn = decode_step
        if compile:
            cuda = mask.device.type == "cuda"
            if cuda:  # the cache stays at one address, as a CUDA graph needs
                torch._dynamo.mark_static_address(self.cache.k)
                torch._dynamo.mark_static_address(self.cache.v)
            self.step_fn = compiled_decode_step("reduce-overhead" if cuda else "default")

    def __call__(self, token, step):
        """Logits (B, 1, vocab) after `token` (B,), the step-th new token (from 0), whose
        mask column P + step the caller has set."""
        self.cache.pos.fill_(self.P + step)
        positions = self.start + step                                      # (B, 1)
        attend = self.mask.bool()[:, None, None, :]                        # (B, 1, 1, max_len)
        logits = self.step_fn(self.model, self.cache, token, positions, attend)
        # a replayed CUDA graph writes its next output into the same memory: keep a copy
        return logits if self.step_fn is decode_step else logits.clone()
