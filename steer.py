"""Steering: add alpha * v to the residual stream after one block, and read the stream.

    h_l  <-  h_l + alpha * v                 mode "add" (steering, the paper's teacher)
    h_l  <-  h_l - (h_l . v^) v^             mode "project_out" (the paper's necessity test)

where h_l is the output of block l (the residual stream after it) and v^ = v / |v|.
`steering(...)` is a context manager: it registers a forward hook on `model.blocks[l]`,
removes it in `finally` (also after an exception), and never changes the model's weights.

Which positions are steered (`where`):
    "all"          every position of every forward pass
    "prompt"       prompt tokens only: the prefill pass of generate(), or, in a plain forward,
                   the positions where `prompt_mask` is True (all of them if it is None)
    "generated"    only tokens produced during generation (the KV-cache steps)
    "last_prompt"  only each row's last prompt token
During generation a block sees the prompt in one pass (the cache is empty) and then one new
token per pass (the cache holds the past), which is how the hook tells them apart.
"""
import contextlib

import torch


WHERE = ("all", "prompt", "generated", "last_prompt")
MODES = ("add", "project_out")


class VectorError(ValueError):
    """A steering vector that cannot be used; the message names the file or name."""


class BlockError(VectorError):
    """A block number the model does not have (a vector's, a teacher's or a LoRA student's)."""


def check_block(block, n_layer, what="block"):
    """A BlockError unless 0 <= block < n_layer; `what` names it (a flag: "--layer")."""
    if not 0 <= block < n_layer:
        raise BlockError(f"{what} {block} is out of range: the model has blocks 0-{n_layer - 1}")


def steered_positions(where, decoding, hidden, prompt_mask):
    """Which positions to change: None = all of them, else a (B, T, 1) 0/1 tensor."""
    B, T, _ = hidden.shape
    if where == "all":
        return None
    if decoding:  # one freshly generated token per row
        return None if where == "generated" else hidden.new_zeros(B, T, 1)
    if prompt_mask is None:  # a prompt pass of generate(), or a forward over prompts only
        prompt = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    else:
        # a block asked for its last T positions only (model.run_blocks' final_positions)
        # outputs those: the mask's last T columns are theirs
        prompt = prompt_mask.to(hidden.device).bool()[:, -T:]             # (B, T)
    if where == "generated":
        chosen = ~prompt
    elif where == "prompt":
        chosen = prompt
    else:  # last_prompt: a prompt token whose right neighbour is not a prompt token
        after = torch.cat([prompt[:, 1:], prompt.new_zeros(B, 1)], dim=1)  # (B, T)
        chosen = prompt & ~after
    return chosen[..., None].to(hidden.dtype)                             # (B, T, 1)


@contextlib.contextmanager
def steering(model, layer, vector, alpha=1.0, where="all", mode="add", prompt_mask=None):
    """Inside the `with` block, every forward pass of `model` is steered at block `layer`.
    vector: (d_model,) tensor, cast to the residual's dtype and device (gradients flow
    through it, so a vector can be trained). prompt_mask: optional (B, T) bool, True at
    prompt tokens, for plain forward passes over prompt + completion."""
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, not '{where}'")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not '{mode}'")
    check_block(layer, len(model.blocks), "layer")
    if vector.shape != (model.cfg.d_model,):
        raise VectorError(f"vector has shape {tuple(vector.shape)}, the model needs "
                          f"({model.cfg.d_model},)")

    def hook(block, args, kwargs, output):                               # output: (B, T, d)
        # the model passes each block its KV cache as cache=...; during generation the cache
        # is empty for the prompt pass and holds the past for each new token
        cache = kwargs.get("cache")
        decoding = cache is not None and cache.length > 0
        chosen = steered_positions(where, decoding, output, prompt_mask)
        v = vector.to(device=output.device, dtype=output.dtype)             # (d,)
        if mode == "add":
            change = alpha * v                                              # (d,)
        else:
            v_hat = v / v.norm()                                            # (d,)
            change = -(output @ v_hat)[..., None] * v_hat                   # (B, T, d)
        return output + (change if chosen is None else change * chosen)

    handle = model.blocks[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def read_residuals(model, ids, attention_mask=None, layers=None):
    """{layer: (B, T, d_model)} residual stream after each block in `layers` (default all).
    Only the blocks up to the last one asked for run; active steering hooks apply."""
    layers = sorted(set(range(len(model.blocks)) if layers is None else layers))
    seen = {}

    def make_hook(layer):
        def hook(block, args, output):
            seen[layer] = output
        return hook

    handles = [model.blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        model.run_blocks(model.embed(ids), attention_mask, last=layers[-1] + 1)
    finally:
        for handle in handles:
            handle.remove()
    return seen
