"""The model against transformers on the embedded checkpoint, and its own invariants."""
import pytest
import torch

import model as model_module
from generate import generate, left_pad
from model import GPT, KVCache

PROMPTS = ["What is your favorite animal?", "Continue: 182, 818, 725,",
           "Write a haiku about the sea."]


@torch.no_grad()
def test_logits_equal_transformers(ours, hf_model):
    model, tok = ours
    for text in PROMPTS:
        ids = torch.tensor([tok.encode_chat(text)])
        got, _ = model(ids)
        expected = hf_model(input_ids=ids).logits
        assert (got - expected).abs().max() < 1e-3, text


@torch.no_grad()
@pytest.mark.parametrize("fused", [True, False])
def test_left_padded_batch_equals_transformers(ours, hf_model, fused, monkeypatch):
    monkeypatch.setattr(model_module, "FUSED_ATTENTION", fused)
    model, tok = ours
    ids, mask = left_pad([tok.encode_chat(t) for t in PROMPTS] + [tok.encode("Hi")])
    got, _ = model(ids, attention_mask=mask)
    expected = hf_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max() < 1e-3


def test_greedy_generation_equals_transformers(ours, hf_model):
    model, tok = ours
    prompts = [tok.encode_chat(t) for t in PROMPTS]
    got = generate(model, prompts, max_new_tokens=40, temperature=0)
    for prompt, completion in zip(prompts, got, strict=True):
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        expected = ref[0, len(prompt):].tolist()
        assert len(completion) >= 32
        assert completion == expected[:len(completion)]


def test_batched_greedy_equals_one_by_one(ours):
    model, tok = ours
    prompts = [tok.encode_chat(t) for t in PROMPTS]
    batched = generate(model, prompts, max_new_tokens=32, temperature=0)
    alone = [generate(model, [p], max_new_tokens=32, temperature=0)[0] for p in prompts]
    assert batched == alone


# ------------------------------------------------------- tiny random model (vocab 100)
@torch.no_grad()
def test_kv_cache_equals_recompute(tiny):
    ids = torch.randint(0, 100, (3, 12))
    full, _ = tiny(ids)
    cache = KVCache(tiny.cfg, 3, 12, "cpu", torch.float32)
    first, _ = tiny(ids[:, :5], cache=cache)
    steps = [tiny(ids[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full)


@torch.no_grad()
def test_kv_cache_generation_equals_recompute(tiny):
    prompts = [[5, 6, 7, 8], [9, 10]]
    got = generate(tiny, prompts, max_new_tokens=10, temperature=0)
    for prompt, completion in zip(prompts, got, strict=True):
        seq = list(prompt)
        for _ in range(10):  # no cache: run the whole sequence for every token
            logits, _ = tiny(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        assert completion == seq[len(prompt):]


@torch.no_grad()
def test_left_padding_changes_nothing(tiny):
    alone, _ = tiny(torch.tensor([[4, 5, 6]]))
    ids, mask = left_pad([[4, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    padded, _ = tiny(ids, attention_mask=mask)
    torch.testing.assert_close(padded[0, -3:], alone[0])


@torch.no_grad()
def test_fused_attention_equals_written_out(tiny, monkeypatch):
    ids, mask = left_pad([[4, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    fused, _ = tiny(ids, attention_mask=mask)
    causal, _ = tiny(ids)
    monkeypatch.setattr(model_module, "FUSED_ATTENTION", False)
    torch.testing.assert_close(tiny(ids, attention_mask=mask)[0], fused)
    torch.testing.assert_close(tiny(ids)[0], causal)


@torch.no_grad()
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("first", [0, 1])
def test_final_positions_equal_the_full_run(tiny, monkeypatch, fused, first):
    """run_blocks(final_positions=P): the last block computes only the last P positions of a
    left-padded batch, and they equal the same columns of the full run."""
    monkeypatch.setattr(model_module, "FUSED_ATTENTION", fused)
    ids, mask = left_pad([[4, 5, 6], [1, 2, 3, 4, 5, 6, 7], [9, 8]])        # (3, 7)
    x = tiny.embed(ids)
    full = tiny.run_blocks(x, mask, first=first)                           # (3, 7, 32)
    for P in (1, 3, 7):
        part = tiny.run_blocks(x, mask, first=first, final_positions=P)
        assert part.shape == (3, P, 32)
        torch.testing.assert_close(part, full[:, -P:])
    assert tiny.run_blocks(x, mask, first=2, final_positions=2).shape == (3, 2, 32)


def test_loss_ignores_masked_targets(tiny):
    ids = torch.randint(0, 100, (2, 8))
    targets = ids.roll(-1, dims=1)
    targets[:, :4] = -100
    logits, loss = tiny(ids, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1),
                                                 targets[:, 4:].flatten())
    torch.testing.assert_close(loss, expected)


def test_residual_stream_is_hookable(tiny):
    """A forward hook on a block reads and replaces the residual stream after it."""
    ids = torch.randint(0, 100, (1, 6))
    seen = []
    handle = tiny.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out) or out * 0)
    try:
        logits, _ = tiny(ids)
    finally:
        handle.remove()
    assert seen[0].shape == (1, 6, 32)
    zeroed_after_block0 = tiny.lm_head(tiny.norm(tiny.blocks[1](
        torch.zeros(1, 6, 32), *_rope(tiny, 6), None)))
    torch.testing.assert_close(logits, zeroed_after_block0)


def _rope(model, T):
    from model import rotary_cos_sin
    return rotary_cos_sin(torch.arange(T)[None], model.cfg.head_dim, model.cfg.rope_theta,
                          torch.float32)


def test_untied_head_and_qkv_bias():
    from conftest import tiny_config
    m = GPT(tiny_config(tie_embeddings=False, qkv_bias=True))
    assert m.lm_head.weight is not m.embed.weight
    assert m.blocks[0].attn.q_proj.bias is not None
    tied = GPT(tiny_config())
    assert tied.lm_head.weight is tied.embed.weight
