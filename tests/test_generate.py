"""Sampling: seeds, constrained decoding, stop tokens, top-p."""
import pytest
import torch

from generate import GenerateError, generate, sample_next
from steer import steering


def test_same_seed_same_samples(tiny):
    prompts = [[1, 2, 3], [4, 5], [6]]
    a = generate(tiny, prompts, max_new_tokens=12, temperature=1.0, seed=7)
    b = generate(tiny, prompts, max_new_tokens=12, temperature=1.0, seed=7)
    c = generate(tiny, prompts, max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c


def test_constrained_decoding_only_samples_allowed_tokens(tiny):
    allowed = {10, 11, 12, 13}
    out = generate(tiny, [[1, 2, 3]] * 8, max_new_tokens=20, temperature=1.5,
                   allowed_tokens=allowed)
    assert all(set(row) <= allowed for row in out) and sum(map(len, out)) == 160


def test_stop_token_ends_each_row(tiny):
    out = generate(tiny, [[1, 2, 3]] * 16, max_new_tokens=30, temperature=1.0,
                   allowed_tokens={20, 21, 22}, stop_tokens={22}, seed=1)
    assert all(22 not in row for row in out)
    assert any(len(row) < 30 for row in out)


def test_top_p_keeps_the_smallest_sufficient_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, top_p=0.75, generator=g), minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0
    tiny_p = sample_next(logits, 1.0, top_p=1e-6, generator=g)
    assert (tiny_p == 0).all()


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))


def test_samples_per_prompt_equals_repeated_prompts(tiny):
    prompts = [[1, 2, 3], [4, 5]]
    repeated = [p for p in prompts for _ in range(3)]
    for temperature in (0.0, 1.0):
        a = generate(tiny, prompts, max_new_tokens=8, temperature=temperature,
                     samples_per_prompt=3, seed=5)
        b = generate(tiny, repeated, max_new_tokens=8, temperature=temperature, seed=5)
        assert a == b


def test_requests_past_the_context_are_refused(tiny):
    """The tiny model's context is 128 positions: the prompt and the new tokens must fit, and
    the refusal comes before any KV cache is allocated."""
    assert len(generate(tiny, [[1] * 100], max_new_tokens=28, temperature=0)[0]) == 28
    with pytest.raises(GenerateError, match=r"a prompt of 100 tokens \+ 29 new tokens exceeds "
                                            r"the model's context length \(128 tokens\)"):
        generate(tiny, [[1] * 100, [2]], max_new_tokens=29)
    with pytest.raises(GenerateError, match="exceeds the model's context length"):
        generate(tiny, [[1]], max_new_tokens=10**12)  # a KV cache of 10^12 positions


@pytest.mark.parametrize("prompts,n_new", [([], 5), ([[1], []], 5), ([[1]], 0)])
def test_empty_requests_are_refused(tiny, prompts, n_new):
    with pytest.raises(GenerateError, match="at least one token"):
        generate(tiny, prompts, max_new_tokens=n_new)


def step_logits(model, prompts, new_tokens, static, where=None):
    """Every step's logits while generate() samples, recorded by a hook on the head."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[:, -1]))
    try:
        if where is None:
            out = generate(model, prompts, new_tokens, temperature=1.0, seed=3, static=static)
        else:
            v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
            with steering(model, 1, v, alpha=2.0, where=where):
                out = generate(model, prompts, new_tokens, temperature=1.0, seed=3,
                               static=static)
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("where", [None, "all", "prompt", "generated", "last_prompt"])
def test_static_decoding_equals_the_readable_path(tiny, where):
    """Fixed shapes (the whole cache, masked; positions as tensors) give the readable path's
    logits at every step and the same samples, unsteered and under each steering mode."""
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    readable, expected = step_logits(tiny, prompts, 16, False, where)
    static, got = step_logits(tiny, prompts, 16, True, where)
    assert static == readable and len(got) == len(expected) == 16
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_static_decoding_equals_the_readable_path(tiny):
    """torch.compile of the fixed-shape step (on a GPU it is also replayed as a CUDA graph)
    samples what the readable path samples."""
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    readable = generate(tiny, prompts, 12, temperature=0.0, samples_per_prompt=2)
    compiled = generate(tiny, prompts, 12, temperature=0.0, samples_per_prompt=2,
                        compile=True)
    assert compiled == readable


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_zero_mass():
    """sample_next draws token i with probability p_i (here 20,000 draws of 4 tokens, one of
    them impossible); a token of probability 0 is never drawn, even at the row's edges."""
    probs = torch.tensor([0.0, 0.6, 0.0, 0.3, 0.1, 0.0])
    logits = probs.log().repeat(20000, 1)                                 # (20000, 6)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=6) / 20000
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs, atol=0.015)


def test_coupled_sampling_follows_the_distribution_and_couples_two_models():
    """Gumbel-max (coupled=True) draws token i with probability p_i and never a token of
    probability 0; two models sampled with the same seed share their noise, so raising one
    token's logit keeps every draw that token already won and only adds draws to it."""
    probs = torch.tensor([0.0, 0.6, 0.0, 0.3, 0.1, 0.0])
    logits = probs.log().repeat(20000, 1)                                 # (20000, 6)
    draw = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0), coupled=True)
    counts = torch.bincount(draw, minlength=6) / 20000
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs, atol=0.015)
    raised = logits.clone()
    raised[:, 4] += 1.2                                   # token 4: 0.1 -> about 0.27
    again = sample_next(raised, 1.0, generator=torch.Generator().manual_seed(0), coupled=True)
    assert bool((again[draw == 4] == 4).all())            # every earlier win is kept
    assert 0.24 < (again == 4).float().mean() < 0.30
    changed = again != draw
    assert bool((again[changed] == 4).all())              # and nothing else changes
    independent = sample_next(raised, 1.0, generator=torch.Generator().manual_seed(1),
                              coupled=True)
    assert (independent != draw).float().mean() > 0.4     # other noise: many draws differ


def test_logits_of_a_few_tokens_equal_those_columns_of_the_full_logits(tiny):
    """GPT.forward(vocab=ids) computes only those columns; constrained decoding samples from
    them as the full, masked logits would: the same tokens for the same random numbers."""
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    vocab = torch.tensor([3, 10, 11, 57])
    full, _ = tiny(ids)                                                   # (2, 4, 100)
    few, _ = tiny(ids, vocab=vocab)                                       # (2, 4, 4)
    assert torch.allclose(few, full[..., vocab], atol=1e-6)
    allowed = torch.zeros(2, 100, dtype=torch.bool)
    allowed[0, [3, 11]] = allowed[1, [10, 11, 57]] = True
    rows = full[:, -1].repeat(500, 1)                                     # (1000, 100)
    a = sample_next(rows, 1.0, allowed=allowed.repeat(500, 1),
                    generator=torch.Generator().manual_seed(3))
    b = vocab[sample_next(rows[:, vocab], 1.0, allowed=allowed.repeat(500, 1)[:, vocab],
                          generator=torch.Generator().manual_seed(3))]
    assert torch.equal(a, b)
