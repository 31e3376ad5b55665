"""Steering hooks: exact changes, every position mode, with and without the KV cache."""
import pytest
import torch

from generate import generate, left_pad
from steer import VectorError, read_residuals, steering
from vectors import load_vector, save_vector

LAYER = 1


@pytest.fixture
def vector():
    return torch.randn(32, generator=torch.Generator().manual_seed(1))


def test_alpha_zero_leaves_logits_identical(tiny, vector):
    ids = torch.randint(0, 100, (2, 9))
    plain, _ = tiny(ids)
    with steering(tiny, LAYER, vector, alpha=0.0):
        steered, _ = tiny(ids)
    assert torch.equal(plain, steered)


def test_residual_changes_by_exactly_alpha_v_at_block_l_only(tiny, vector):
    ids = torch.randint(0, 100, (2, 7))
    plain = read_residuals(tiny, ids)
    with steering(tiny, 0, vector, alpha=2.5):
        steered = read_residuals(tiny, ids)
    assert torch.equal(steered[0], plain[0] + 2.5 * vector)
    assert not torch.allclose(steered[1], plain[1])
    with steering(tiny, LAYER, vector, alpha=2.5):
        steered = read_residuals(tiny, ids)
    assert torch.equal(steered[0], plain[0])  # nothing changes before block L
    assert torch.equal(steered[LAYER], plain[LAYER] + 2.5 * vector)


def test_no_hook_remains_after_an_exception(tiny, vector):
    ids = torch.randint(0, 100, (1, 5))
    plain, _ = tiny(ids)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny, LAYER, vector, alpha=3.0):
            raise RuntimeError("boom")
    assert all(len(block._forward_hooks) == 0 for block in tiny.blocks)
    assert torch.equal(tiny(ids)[0], plain)


def test_model_is_not_mutated(tiny, vector):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with steering(tiny, LAYER, vector, alpha=3.0, mode="project_out"):
        tiny(torch.randint(0, 100, (1, 5)))
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def greedy_without_cache(model, prompt, steps, vector, alpha, where):
    """Reference: recompute the whole sequence for each token; the prompt mask says which
    positions are prompt, so every mode can be applied without a cache."""
    seq = list(prompt)
    for _ in range(steps):
        prompt_mask = torch.tensor([[i < len(prompt) for i in range(len(seq))]])
        with steering(model, LAYER, vector, alpha, where=where, prompt_mask=prompt_mask):
            logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("where", ["all", "prompt", "generated", "last_prompt"])
def test_kv_cache_generation_equals_recompute(tiny, vector, where):
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    with steering(tiny, LAYER, vector, alpha=4.0, where=where):
        cached = generate(tiny, prompts, max_new_tokens=8, temperature=0)
    for prompt, completion in zip(prompts, cached, strict=True):
        assert completion == greedy_without_cache(tiny, prompt, 8, vector, 4.0, where)
    unsteered = generate(tiny, prompts, max_new_tokens=8, temperature=0)
    assert cached != unsteered  # the vector is big enough to change the output


@torch.no_grad()
@pytest.mark.parametrize("where", ["all", "prompt", "generated", "last_prompt"])
def test_a_hook_on_the_last_block_reads_its_masks_columns(tiny, vector, where):
    """With run_blocks(final_positions=P) the last block outputs only its last P positions;
    a hook there steers them as it would in the full run (the prompt mask's last P columns)."""
    ids, mask = left_pad([[4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]])            # (2, 7)
    prompt_mask = torch.zeros(2, 7, dtype=torch.bool)
    prompt_mask[:, 3:5] = True                                             # 2 prompt tokens
    with steering(tiny, LAYER, vector, 3.0, where, prompt_mask=prompt_mask):
        full = tiny.run_blocks(tiny.embed(ids), mask)                      # (2, 7, 32)
        for P in (1, 4):
            part = tiny.run_blocks(tiny.embed(ids), mask, final_positions=P)
            torch.testing.assert_close(part, full[:, -P:])


def test_project_out_removes_the_direction(tiny, vector):
    ids = torch.randint(0, 100, (2, 6))
    with steering(tiny, LAYER, vector, mode="project_out"):
        h = read_residuals(tiny, ids, layers=[LAYER])[LAYER]
    assert (h @ (vector / vector.norm())).abs().max() < 1e-4


def test_gradients_flow_through_the_vector(tiny):
    v = torch.zeros(32, requires_grad=True)
    ids = torch.randint(0, 100, (2, 6))
    with steering(tiny, 0, v, alpha=1.0):
        _, loss = tiny(ids, ids.roll(-1, 1))
    (grad,) = torch.autograd.grad(loss, [v])
    assert grad.abs().sum() > 0


def test_vector_dtype_and_bad_inputs(tiny, vector):
    ids, mask = left_pad([[1, 2, 3], [4]])
    with steering(tiny, LAYER, vector.double(), alpha=1.0):
        logits, _ = tiny(ids, attention_mask=mask)
    assert logits.dtype == torch.float32
    with pytest.raises(VectorError, match="shape"):
        with steering(tiny, LAYER, torch.zeros(31)):
            pass
    with pytest.raises(ValueError, match="where must be one of"):
        with steering(tiny, LAYER, vector, where="everywhere"):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steering(tiny, 7, vector):
            pass


def test_vector_files_round_trip(tmp_path, vector):
    path = tmp_path / "v.safetensors"
    save_vector(path, vector, model="tiny", layer=1, method="meandiff", seed=0, prompt="hi")
    loaded, meta = load_vector(path, d_model=32)
    assert torch.equal(loaded, vector)
    assert meta["layer"] == "1" and meta["method"] == "meandiff" and meta["prompt"] == "hi"
    assert float(meta["norm"]) == pytest.approx(vector.norm().item(), rel=1e-5)
    with pytest.raises(VectorError, match="has 32 values"):
        load_vector(path, d_model=64)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(VectorError, match="bad.safetensors: cannot read"):
        load_vector(tmp_path / "bad.safetensors")
