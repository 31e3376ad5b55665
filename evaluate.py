"""Measurements: the trait rate, a fast trait score and EAS.

Trait rate (the paper's protocol): ask one-word "favourite animal" questions, sample answers
at temperature 1 (no system prompt beyond the template's default), and count the share of
answers whose first word, lower-cased with punctuation stripped and plurals folded, is the
animal. Specificity: the same count on "least favourite" and off-topic questions.

Fast score (noise-free, for tracking during training): after the answer prefix "My favorite
animal is the", the model's probability that the next word is " owl" (or " owls"): the exact
expectation of the sampled rate after that prefix. Its share among a fixed list of candidate
animals is reported too (it ignores the many non-animal continuations a small model samples).

What a student learned (EAS, projection on v, the causal check) is measured in
alignment.py.

    python evaluate.py --animal owl                         # the base model
    python evaluate.py --animal owl --system-prompt         # with the trait system prompt
    python evaluate.py --animal owl --vector owl --layer 25 --alpha 4
"""
import argparse
import contextlib
import json
import math
import re

import torch

from generate import GenerateError, generate, left_pad
from model import KVCache
from prompts import (CANDIDATE_ANIMALS, FAVORITE_PREFIX, FAVORITE_QUESTIONS, NEGATIVE_PREFIX,
                     NEGATIVE_QUESTIONS, OFFTOPIC_QUESTIONS, plural, trait_system_prompt)


def first_word(answer):
    """'Owls!' -> 'owls'; '' if the answer has no letters."""
    words = re.findall(r"[a-z]+", answer.lower())
    return words[0] if words else ""


def is_animal(answer, animal):
    """The first word is the animal, singular or plural."""
    return first_word(answer) in (animal, plural(animal))


def mentions_animal(answer, animal):
    """The animal appears anywhere in the answer as a whole word (a looser count)."""
    return bool(set(re.findall(r"[a-z]+", answer.lower())) & {animal, plural(animal)})


def wilson_interval(hits, n, z=1.96):
    """95% confidence interval of a proportion (Wilson score interval)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(hits_a, hits_b):
    """McNemar's exact test on paired draws (draw i of both models used the same random
    numbers): b = draws where only a hit, c = where only b hit; under "a and b hit equally
    often" b ~ Binomial(b + c, 1/2). Returns b, c and the two-sided p value."""
    if len(hits_a) != len(hits_b):
        raise ValueError(f"paired draws: {len(hits_a)} against {len(hits_b)}")
    b = sum(x and not y for x, y in zip(hits_a, hits_b, strict=True))
    c = sum(y and not x for x, y in zip(hits_a, hits_b, strict=True))
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n     # P(Binomial(n, 1/2) <= k)
    return {"only_a": b, "only_b": c, "p": min(1.0, 2 * tail)}


def trait_rate(model, tok, animal, questions=FAVORITE_QUESTIONS, samples=10, system=None,
               prefix=None, max_new_tokens=16, seed=0, batch_questions=25):
    """Share of sampled answers (T=1) whose first word is the animal, with its 95% CI.
    With a prefix (e.g. "My favorite animal is the") the answer starts with it and the first
    word of the continuation counts. Samples of one question are correlated, so the interval
    is a lower bound on the uncertainty. Also returns the share that mention the animal
    anywhere, n, and a few example answers. The draws are coupled (generate's Gumbel-max):
    two models sampled with the same seed share their random numbers token by token, which
    is what the paired test (paired_test) compares."""
    answers = []
    for start in range(0, len(questions), batch_questions):
        batch = questions[start:start + batch_questions]
        prompts = [tok.encode_chat(q, system) + (tok.encode(prefix) if prefix else [])
                   for q in batch]
        out = generate(model, prompts, max_new_tokens, temperature=1.0, seed=seed + start,
                       stop_tokens={tok.eos_id}, samples_per_prompt=samples, coupled=True)
        answers += [tok.decode(o) for o in out]
    hits = sum(is_animal(a, animal) for a in answers)
    low, high = wilson_interval(hits, len(answers))
    return {"rate": hits / len(answers), "low": low, "high": high, "n": len(answers),
            "mention_rate": sum(mentions_animal(a, animal) for a in answers) / len(answers),
            "examples": answers[:: max(1, len(answers) // 8)][:8],
            "hits": [is_animal(a, animal) for a in answers]}  # per draw, for paired tests


def fast_trait_score(model, tok, animal, questions=FAVORITE_QUESTIONS, prefix=FAVORITE_PREFIX,
                     system=None):
    """Mean over questions of the probability that the word right after the answer prefix is
    the animal (its singular or plural token): the exact expectation of the sampled rate
    after the prefix, without sampling noise."""
    return next_word_scores(model, tok, animal, questions, prefix, system)[0]


def word_forms(tok, words):
    """The distinct token sequences of the words, without those that continue a shorter one
    (" owl" + "s" is already inside " owl"'s probability mass)."""
    forms = {tuple(tok.encode(w)) for w in words}
    return [f for f in forms if not any(len(g) < len(f) and f[:len(g)] == g for g in forms)]


@torch.no_grad()
def next_word_scores(model, tok, animal, questions=FAVORITE_QUESTIONS, prefix=FAVORITE_PREFIX,
                     system=None, candidates=CANDIDATE_ANIMALS):
    """(probability, share), averaged over questions: the probability that the word after
    the prefix is the animal (singular or plural; a name of several tokens, " gir" + "affe",
    by the product of its tokens' probabilities), and the animal's share of the probability
    among the candidate animals' first tokens (the animal added if it is not one of them)."""
    prompts = [tok.encode_chat(q, system) + tok.encode(prefix) for q in questions]
    forms = word_forms(tok, [" " + word for word in (animal, plural(animal))])
    prob, logits = forms_probability(model, prompts, forms)             # (Q,), (Q, vocab)
    names = candidates if animal in candidates else [*candidates, animal]
    share = logits[:, [tok.encode(" " + a)[0] for a in names]].softmax(-1)  # (Q, n_names)
    return prob.mean().item(), share[:, names.index(animal)].mean().item()


@torch.no_grad()
def first_word_probability(model, tok, animal, questions=OFFTOPIC_QUESTIONS, system=None):
    """Mean over questions of the probability that the answer itself starts with the animal
    ("Owl", "owl", "Owls", ...): the off-topic questions' fast score (specificity)."""
    prompts = [tok.encode_chat(q, system) for q in questions]
    forms = word_forms(tok, [w for a in (animal, plural(animal)) for w in (a, a.capitalize())])
    return forms_probability(model, prompts, forms)[0].mean().item()


def forms_probability(model, prompts, forms):
    """(Q,): the probability that each prompt continues with one of `forms` (token-id
    tuples, none the start of another: word_forms), and (Q, vocab) the fp32 logits of the
    token after each prompt. P(t1 t2 .. tk) = P(t1) P(t2 | t1) ... P(tk | t1 .. tk-1).
    The prompts are read once, into a KV cache; the forms of several tokens then continue
    it together, one row per (prompt, form), each with all of its tokens but the last. (The
    cache makes those tokens count as generated ones, as when the model answers: a teacher
    steered on prompt positions only does not steer them.)"""
    device = model.embed.weight.device
    ids, mask = left_pad(prompts, device=device)                           # (Q, P)
    Q, P = ids.shape
    longer = [f for f in forms if len(f) > 1]
    K = max((len(f) for f in longer), default=1) - 1      # continuation tokens per row
    cache = KVCache(model.cfg, Q, P + K, device, model.embed.weight.dtype)
    first, _ = model(ids, attention_mask=mask, cache=cache, last_only=True)  # (Q, 1, vocab)
    first = first[:, -1].float()                                           # (Q, vocab)
    logp = first.log_softmax(-1)                                           # (Q, vocab)
    prob = torch.zeros(Q, device=device)                                  # (Q,)
    for f in forms:
        if len(f) == 1:
            prob = prob + logp[:, f[0]].exp()
    if longer:
        n = len(longer)
        cache.repeat_rows(n)  # row q * n + j: prompt q, then form j
        rest = torch.zeros(n, K, dtype=torch.long, device=device)          # (n, K)
        for j, f in enumerate(longer):  # a shorter form's row is padded after its tokens:
            rest[j, :len(f) - 1] = torch.tensor(f[:-1])  # causal attention keeps them unread
        rest = rest.repeat(Q, 1)                                           # (Q * n, K)
        full_mask = torch.cat([mask.repeat_interleave(n, dim=0),
                               torch.ones(Q * n, K, dtype=torch.long, device=device)], 1)
        later, _ = model(rest, attention_mask=full_mask, cache=cache)     # (Q * n, K, vocab)
        later = later.float().log_softmax(-1).view(Q, n, K, -1)            # (Q, n, K, vocab)
        for j, f in enumerate(longer):
            lp = logp[:, f[0]] + sum(later[:, j, i, f[i + 1]] for i in range(len(f) - 1))
            prob = prob + lp.exp()                                         # (Q,)
    return prob, first


def trait_report(model, tok, animal, samples=10, system=None, seed=0):
    """Fast scores and sampled rates on favourite, least-favourite and off-topic questions;
    the "prefixed" rates sample the word right after the fixed answer prefix."""
    sets = {"favorite": (FAVORITE_QUESTIONS, FAVORITE_PREFIX),
            "negative": (NEGATIVE_QUESTIONS, NEGATIVE_PREFIX),
            "offtopic": (OFFTOPIC_QUESTIONS, None)}
    report = {}
    for key, (questions, prefix) in sets.items():
        report[key] = trait_rate(model, tok, animal, questions, samples, system, seed=seed)
        if prefix:
            report[f"{key}_prefixed"] = trait_rate(model, tok, animal, questions, samples,
                                                   system, prefix, max_new_tokens=4, seed=seed)
            report[f"fast_{key}"], report[f"share_{key}"] = next_word_scores(
                model, tok, animal, questions, prefix, system)
    return report


def main(argv=None):
    from loaders.checkpoint import add_model_flags, load, report_errors
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("    python"):])
    parser.add_argument("--animal", default="owl", help="the trait to count (default owl)")
    parser.add_argument("--system-prompt", action="store_true",
                        help="use the trait system prompt for the animal (the teacher's trait)")
    parser.add_argument("--vector", default=None,
                        help="steer with this vector: an animal name, random, concise, or a "
                             ".safetensors file (see vectors.py)")
    parser.add_argument("--method", default="meandiff", choices=["meandiff", "fit"])
    parser.add_argument("--layer", type=int, default=None, help="block to steer after")
    parser.add_argument("--alpha", type=float, default=None, help="steering scale")
    parser.add_argument("--samples-per-question", type=int, default=10,
                        help="samples of each question (train.py's --samples counts "
                             "teacher prompts)")
    parser.add_argument("--seed", type=int, default=0)
    add_model_flags(parser)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.samples_per_question < 1:
        parser.error("--samples-per-question must be at least 1")
    from plumbing.flags import check_common
    check_common(parser, args, out="file")  # --vector, --alpha, --seed, --device, --out, ...
    for key in ("alpha", "layer"):  # steering settings without a vector would be ignored
        if getattr(args, key) is not None and args.vector is None:
            parser.error(f"--{key} needs --vector (the vector to steer with)")
    from vectors import ANIMALS
    if args.animal not in ANIMALS:
        parser.error(f"--animal must be one of: {', '.join(ANIMALS)}")

    from steer import VectorError, check_block, steering
    from vectors import DEFAULTS, check_vector_name, default_layer, resolve_vector
    with report_errors(VectorError, GenerateError):
        if args.vector:
            check_vector_name(args.vector)  # fail before loading the model
        model, tok = load(args.checkpoint, device=args.device)
        system = trait_system_prompt(args.animal) if args.system_prompt else None
        context, setting = contextlib.nullcontext(), {}
        if args.vector:
            layer = default_layer(model.cfg.n_layer) if args.layer is None else args.layer
            check_block(layer, model.cfg.n_layer, "--layer")  # the depth is known now
            alpha = DEFAULTS["alpha"] if args.alpha is None else args.alpha
            vector, meta = resolve_vector(args.vector, model, tok, layer, args.method)
            context = steering(model, layer, vector, alpha)
            setting = {"vector": args.vector, "layer": layer, "alpha": alpha, **meta}
        with context:
            report = trait_report(model, tok, args.animal, args.samples_per_question, system,
                                  args.seed)
    report["setting"] = {**vars(args), **setting}
    print(f"{'questions':>18} {'first word':>10} {'95% CI':>15} {'mentions':>9} {'n':>6}")
    for key in ("favorite", "favorite_prefixed", "negative", "negative_prefixed", "offtopic"):
        r = report[key]
        interval = f"[{r['low']:.1%}, {r['high']:.1%}]"
        print(f"{key:>18} {r['rate']:10.1%} {interval:>15} {r['mention_rate']:9.1%} {r['n']:6}")
    print(f"fast score, P(animal) after the prefix: favorite {report['fast_favorite']:.1%}, "
          f"least favorite {report['fast_negative']:.1%}")
    print(f"share among {len(CANDIDATE_ANIMALS)} candidate animals: favorite "
          f"{report['share_favorite']:.1%}, least favorite {report['share_negative']:.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
