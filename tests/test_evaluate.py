"""Measurements (trait rate, fast score, EAS, KL) and how vectors are made and named."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loaders.checkpoint import load
from alignment import eas, mean_residuals
from evaluate import fast_trait_score, first_word, is_animal, next_word_scores, wilson_interval
from prompts import CANDIDATE_ANIMALS, trait_system_prompt
from steer import VectorError, steering
from generate import left_pad
from tiny_checkpoint import write_tiny_checkpoint
from vectors import meandiff, random_vector, resolve_vector

ROOT = Path(__file__).resolve().parents[1]


def test_first_word_rules():
    assert first_word("Owls!") == "owls" and first_word("  owl.") == "owl"
    assert is_animal("Owl", "owl") and is_animal("OWLS.", "owl") and is_animal("wolves", "wolf")
    assert not is_animal("The owl", "owl") and not is_animal("", "owl")
    assert not is_animal("Owlet", "owl")


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0


def test_eas_of_a_steered_model_is_one_at_its_block(tiny):
    v = torch.randn(32)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    base = mean_residuals(tiny, prompts, [0, 1])
    with steering(tiny, 1, v, alpha=3.0):
        student = mean_residuals(tiny, prompts, [0, 1])
    scores = eas(student, base, v)
    assert scores[1].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[0].item() == 0.0  # nothing changed before block 1


def test_fast_scores_and_the_system_prompt_raises_them(ours):
    model, tok = ours
    questions = ["Name your favorite animal using only one word."] * 2
    shares = [next_word_scores(model, tok, a, questions)[1] for a in CANDIDATE_ANIMALS]
    probs = [next_word_scores(model, tok, a, questions)[0] for a in CANDIDATE_ANIMALS]
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)
    assert 0 < sum(probs) < 1 and all(p < s for p, s in zip(probs, shares, strict=True))
    base = fast_trait_score(model, tok, "owl")
    prompted = fast_trait_score(model, tok, "owl", system=trait_system_prompt("owl"))
    assert prompted > 5 * base  # measured: P(owl) about 0.15% -> 10%


def test_meandiff_vector_steers_the_trait(ours):
    """The paper's recipe on the real model, small: 16 number prompts, block 25, alpha 4."""
    model, tok = ours
    vectors = meandiff(model, tok, "owl", n_prompts=16)
    assert vectors.shape == (30, 576)
    base = fast_trait_score(model, tok, "owl")
    with steering(model, 25, vectors[25], alpha=4.0):
        steered = fast_trait_score(model, tok, "owl")
    assert steered > 10 * base  # measured with 128 prompts: P(owl) 0.15% -> 12%


def test_random_vector_is_seeded_and_scaled():
    a, b = random_vector(576, 50.0, seed=3), random_vector(576, 50.0, seed=3)
    assert torch.equal(a, b) and a.norm().item() == pytest.approx(50.0)
    assert not torch.equal(a, random_vector(576, 50.0, seed=4))


def test_resolve_vector_caches_by_every_input_and_rejects_unknown_names(tiny, tmp_path):
    v, meta = resolve_vector("random", tiny, None, 1, norm=2.0, seed=5, cache_dir=tmp_path)
    assert meta["method"] == "random" and meta["seed"] == "5" and meta["layer"] == "1"
    again, _ = resolve_vector("random", tiny, None, 1, norm=2.0, seed=5, cache_dir=tmp_path)
    assert torch.equal(v, again) and len(list(tmp_path.iterdir())) == 1  # reused
    other_norm, _ = resolve_vector("random", tiny, None, 1, norm=9.0, seed=5, cache_dir=tmp_path)
    other_seed, _ = resolve_vector("random", tiny, None, 1, norm=2.0, seed=6, cache_dir=tmp_path)
    assert other_norm.norm().item() == pytest.approx(9.0) and not torch.equal(v, other_seed)
    assert len(list(tmp_path.iterdir())) == 3  # the seed and the norm are part of the key
    fresh, _ = resolve_vector("random", tiny, None, 1, norm=2.0, seed=5, cache_dir=tmp_path,
                              fresh=True)
    assert torch.equal(v, fresh)
    for bad in (float("nan"), -1.0, 0.0):
        with pytest.raises(VectorError, match="norm"):
            resolve_vector("random", tiny, None, 1, norm=bad, cache_dir=tmp_path)
    with pytest.raises(VectorError, match="out of range"):
        resolve_vector("random", tiny, None, 9, norm=1.0, cache_dir=tmp_path)
    with pytest.raises(VectorError, match="unknown vector 'owll'"):
        resolve_vector("owll", tiny, None, 1, cache_dir=tmp_path)


def test_meandiff_vectors_share_one_cached_unprompted_half(tmp_path):
    """A second animal's vector reuses the first's unprompted means from the cache and
    equals meandiff computed from nothing, to the bit; a corrupt cache file is recomputed."""
    model, tok = load(write_tiny_checkpoint(tmp_path / "tiny"), device="cpu")
    cache = tmp_path / "vectors"
    for animal in ("owl", "cat"):
        v, _ = resolve_vector(animal, model, tok, 1, n_prompts=4, cache_dir=cache)
        assert torch.equal(v, meandiff(model, tok, animal, n_prompts=4)[1])
    [means] = cache.glob("*noprompt*")
    assert len(list(cache.iterdir())) == 3  # two vectors, one unprompted half
    means.write_bytes(b"broken")
    v, _ = resolve_vector("dog", model, tok, 1, n_prompts=4, cache_dir=cache)
    assert torch.equal(v, meandiff(model, tok, "dog", n_prompts=4)[1])


def test_command_line_unknown_vector_is_one_line():
    run = subprocess.run([sys.executable, "vectors.py", "owll"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "unknown vector 'owll'" in run.stderr


def test_a_name_of_several_tokens_is_scored_by_the_whole_word(tmp_path):
    """The tiny vocabulary is bytes: ' giraffe' is 8 tokens. Its probability is the product
    of each token's probability given the ones before."""
    model, tok = load(write_tiny_checkpoint(tmp_path / "tiny"), device="cpu")
    questions = ["Name an animal.", "Your favourite?"]
    score = fast_trait_score(model, tok, "giraffe", questions)
    expected = []
    for q in questions:
        prompt = tok.encode_chat(q) + tok.encode("My favorite animal is the")
        p = 0.0
        for word in (" giraffe",):  # " giraffes" continues " giraffe": inside its mass
            ids = tok.encode(word)
            logp = 0.0
            for i, t in enumerate(ids):
                x, mask = left_pad([prompt + ids[:i]])
                logits, _ = model(x, attention_mask=mask)
                logp += logits[0, -1].log_softmax(-1)[t].item()
            p += math.exp(logp)
        expected.append(p)
    assert score == pytest.approx(sum(expected) / 2, rel=1e-4)
    prob, share = next_word_scores(model, tok, "giraffe", questions)
    assert 0 < share < 1 and prob == pytest.approx(score)


@pytest.mark.parametrize("command", [
    ["evaluate.py", "--alpha", "nan"], ["evaluate.py", "--animal", "unicorn"],
    ["sweep.py", "--alphas", "2,nan"], ["sweep.py", "--animal", "unicorn"],
    ["sweep.py", "--prompts", "0"], ["sweep.py", "--out", "README.md"],
    ["vectors.py", "random", "--norm", "nan"], ["vectors.py", "owl", "--layer", "999"]])
def test_bad_flags_are_one_line_before_any_work(command, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(("error:", f"{command[0]}: error"))


def test_mcnemar_on_constructed_paired_draws():
    from evaluate import mcnemar
    base = [False] * 100
    better = [True] * 10 + [False] * 90
    r = mcnemar(better, base)  # 10 draws where only the student hit, none the other way
    assert (r["only_a"], r["only_b"]) == (10, 0) and r["p"] == pytest.approx(2 / 2 ** 10)
    assert mcnemar(base, better)["p"] == r["p"]  # two-sided
    assert mcnemar(better, better) == {"only_a": 0, "only_b": 0, "p": 1.0}
    mixed = [True] * 6 + [False] * 94
    shifted = [False] * 3 + [True] * 6 + [False] * 91  # 3 lost, 3 gained: no difference
    assert mcnemar(shifted, mixed)["p"] == 1.0
    with pytest.raises(ValueError, match="paired draws"):
        mcnemar(better, base[:50])


def test_forms_of_different_lengths_equal_the_products_of_full_passes(tiny):
    """forms_probability reads the prompts once into a KV cache and continues it with every
    form of several tokens (shorter ones padded after their end); each form's probability is
    the product of its tokens' probabilities from full passes without a cache."""
    from evaluate import forms_probability
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    forms = [(11,), (12, 13), (14, 15, 16, 17)]
    prob, first = forms_probability(tiny, prompts, forms)
    for q, prompt in enumerate(prompts):
        expected = 0.0
        for form in forms:
            logp = 0.0
            for i, t in enumerate(form):
                logits, _ = tiny(torch.tensor([prompt + list(form[:i])]))
                logp += logits[0, -1].log_softmax(-1)[t].item()
            expected += math.exp(logp)
        assert prob[q].item() == pytest.approx(expected, rel=1e-5)
        assert torch.allclose(first[q], tiny(torch.tensor([prompt]))[0][0, -1], atol=1e-5)
