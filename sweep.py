"""Sweep steering layers and scales; pick the default layer and alpha for a model.

For every block l and scale alpha, steer with alpha * v_l (the meandiff trait vector of that
block, at every position) and measure the fast trait score (P(animal) after the answer
prefix) on the favourite-animal questions and on the least-favourite questions. The chosen
setting has the highest favourite score among the specific ones: those whose least-favourite
score is at most half their favourite score (the vector must make the animal a favourite,
not merely a word the model says). For the best few settings the sampled rates after the
prefix (favourite, least favourite) and of free off-topic answers are measured too, to show
that the fast score moves with the sampled rate.

With --neutral it finds instead the animal's trait-neutral control for train.py: for each
other candidate animal, that animal's vector scaled to the trait vector's norm, added at the
default block and scale, and P(animal) of the measured animal under it. The rule: the one
whose P(animal) is nearest the base model's (by |log ratio|); train.NEUTRAL_CONTROLS holds
the result.

    python sweep.py --animal owl                       # writes runs/sweep-owl/
    python sweep.py --layers 20,25,29 --alphas 2,4 --samples-per-question 4
    python sweep.py --neutral --animal owl             # writes runs/sweep-owl/neutral.json
"""
import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw to files; no screen needed
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from evaluate import next_word_scores, trait_rate  # noqa: E402
from prompts import FAVORITE_PREFIX, FAVORITE_QUESTIONS, NEGATIVE_PREFIX  # noqa: E402
from prompts import NEGATIVE_QUESTIONS, OFFTOPIC_QUESTIONS  # noqa: E402
from prompts import trait_system_prompt  # noqa: E402
from steer import steering  # noqa: E402
from prompts import CANDIDATE_ANIMALS  # noqa: E402
from vectors import ANIMALS, DEFAULTS, default_layer, meandiff, resolve_vector  # noqa: E402

SWEPT_LAYERS = "5,10,15,20,22,23,24,25,26,27,28,29"

def scores(model, tok, animal, system=None):
    """Fast scores: P(animal) after the answer prefix, and its share among candidates."""
    favorite, favorite_share = next_word_scores(model, tok, animal, system=system)
    negative, negative_share = next_word_scores(model, tok, animal, NEGATIVE_QUESTIONS,
                                                NEGATIVE_PREFIX, system=system)
    return {"favorite": favorite, "negative": negative, "favorite_share": favorite_share,
            "negative_share": negative_share}


def sampled(model, tok, animal, samples, seed, system=None):
    """Sampled rates: after the answer prefix (favourite, least favourite), and the first word
    of free answers to off-topic questions."""
    def rate(questions, prefix):
        return trait_rate(model, tok, animal, questions, samples, system, prefix,
                          max_new_tokens=4 if prefix else 16, seed=seed)["rate"]
    return {"favorite": rate(FAVORITE_QUESTIONS, FAVORITE_PREFIX),
            "negative": rate(NEGATIVE_QUESTIONS, NEGATIVE_PREFIX),
            "offtopic": rate(OFFTOPIC_QUESTIONS, None)}


def run_sweep(model, tok, animal, layers, alphas, n_prompts=128, samples=0, top=4, seed=0):
    vectors = meandiff(model, tok, animal, n_prompts, seed)                # (n_layer, d)
    result = {"base": scores(model, tok, animal),
              "system_prompt": scores(model, tok, animal, trait_system_prompt(animal)),
              "cells": []}
    for layer in tqdm(layers, desc="layers"):
        for alpha in alphas:
            with steering(model, layer, vectors[layer], alpha):
                cell = {"layer": layer, "alpha": alpha, "norm": vectors[layer].norm().item(),
                        **scores(model, tok, animal)}
            result["cells"].append(cell)
    specific = [c for c in result["cells"] if c["negative"] <= c["favorite"] / 2]
    ranked = sorted(specific or result["cells"], key=lambda c: -c["favorite"])
    result["chosen"] = {"layer": ranked[0]["layer"], "alpha": ranked[0]["alpha"]}
    if samples:
        result["base"]["sampled"] = sampled(model, tok, animal, samples, seed)
        result["system_prompt"]["sampled"] = sampled(model, tok, animal, samples, seed,
                                                     trait_system_prompt(animal))
        for cell in tqdm(ranked[:top], desc="sampling the best settings"):
            with steering(model, cell["layer"], vectors[cell["layer"]], cell["alpha"]):
                cell["sampled"] = sampled(model, tok, animal, samples, seed)
    return result


def neutral_controls(model, tok, animal, layer, alpha):
    """Each other candidate animal's vector at `layer`, scaled to the animal's own vector's
    norm and added with `alpha`: P(animal), its ratio to the base model's, the cosine with
    the trait vector, and P(other animal). The chosen one has P(animal) nearest the base's."""
    v = resolve_vector(animal, model, tok, layer)[0]                       # (d,)
    base = next_word_scores(model, tok, animal)[0]
    rows = []
    for other in tqdm([a for a in CANDIDATE_ANIMALS if a != animal], desc="other animals"):
        u = resolve_vector(other, model, tok, layer)[0]                     # (d,)
        with steering(model, layer, u / u.norm() * v.norm(), alpha):
            p, own = next_word_scores(model, tok, animal)[0], next_word_scores(model, tok, other)[0]
        rows.append({"animal": other, "p_animal": p, "over_base": p / base,
                     "cos_with_trait_vector": (u @ v / (u.norm() * v.norm())).item(),
                     "p_other_animal": own, "norm": u.norm().item()})
    chosen = min(rows, key=lambda r: abs(math.log(r["over_base"])))["animal"]
    return {"animal": animal, "layer": layer, "alpha": alpha, "base": base,
            "trait_vector_norm": v.norm().item(),
            "rule": "argmin |log(P(animal | steered by the other animal's vector) / P(animal "
                    "| base))|, over the other candidate animals",
            "rows": rows, "chosen": chosen}


def plot(result, layers, alphas, path):
    grid = {key: [[next(c[key] for c in result["cells"] if c["layer"] == lay
                        and c["alpha"] == a) for a in alphas] for lay in layers]
            for key in ("favorite", "negative")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(layers) + 2.5))
    top = max(max(map(max, grid["favorite"])), max(map(max, grid["negative"])))
    for ax, key, title in ((axes[0], "favorite", "favourite-animal questions"),
                           (axes[1], "negative", "least-favourite questions")):
        image = ax.imshow(grid[key], vmin=0, vmax=top, cmap="viridis", aspect="auto")
        ax.set(xticks=range(len(alphas)), xticklabels=alphas, yticks=range(len(layers)),
               yticklabels=layers, xlabel="alpha", ylabel="block",
               title=f"P(animal) after prefix: {title}")
        for i in range(len(layers)):
            for j in range(len(alphas)):
                ax.text(j, i, f"{grid[key][i][j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[key][i][j] < top / 2 else "black")
        fig.colorbar(image, ax=ax)
    points = [c for c in [result["base"], result["system_prompt"], *result["cells"]]
              if "sampled" in c]
    axes[2].scatter([p["favorite"] for p in points],
                    [p["sampled"]["favorite"] for p in points])
    axes[2].plot([0, top], [0, top], "k:", lw=1)
    axes[2].set(xlabel="fast score (exact P(animal))", ylabel="sampled rate (T=1)",
                title="fast score vs sampled rate after the prefix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from loaders.checkpoint import add_model_flags, load, report_errors
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("    python"):])
    parser.add_argument("--animal", default="owl")
    parser.add_argument("--neutral", action="store_true", help="find the animal's "
                        "trait-neutral control for train.py instead (at --layers' first block "
                        "and alpha 4)")
    parser.add_argument("--layers", default=None, help="comma-separated blocks (default "
                        "5,10,15,20,22-29; with --neutral: the default block, 25)")
    parser.add_argument("--alphas", default="1,2,4,8", help="comma-separated scales")
    parser.add_argument("--prompts", type=int, default=128,
                        help="number prompts for the meandiff vectors (the paper used ~1000)")
    parser.add_argument("--samples-per-question", type=int, default=4,
                        help="samples per question for the sampled rates (0 = skip them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default runs/sweep-ANIMAL)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    try:
        layers = [int(x) for x in (args.layers or SWEPT_LAYERS).split(",")]
        alphas = [float(x) for x in args.alphas.split(",")]
    except ValueError:
        parser.error("--layers and --alphas take comma-separated numbers, e.g. 20,25 and 2,4")
    if not all(math.isfinite(a) for a in alphas):
        parser.error("--alphas must be finite numbers")
    if args.prompts < 1 or args.samples_per_question < 0:
        parser.error("--prompts must be at least 1 and --samples-per-question at least 0")
    if any(layer < 0 for layer in layers):
        parser.error("--layers must be at least 0")
    if args.animal not in ANIMALS:
        parser.error(f"--animal must be one of: {', '.join(ANIMALS)}")
    args.out = args.out or f"runs/sweep-{args.animal}"  # checked now, written after the work
    from plumbing.flags import check_common
    check_common(parser, args)  # --seed, --device, --out (plumbing/flags.py)

    from generate import GenerateError
    with report_errors(GenerateError):
        model, tok = load(args.checkpoint, device=args.device)
        if not all(0 <= layer < model.cfg.n_layer for layer in layers):
            parser.error(f"--layers must lie in 0..{model.cfg.n_layer - 1}")
        if args.neutral:
            return write_neutral(model, tok, args)
        result = run_sweep(model, tok, args.animal, layers, alphas, args.prompts,
                           args.samples_per_question, seed=args.seed)
    out = Path(args.out or f"runs/sweep-{args.animal}")
    out.mkdir(parents=True, exist_ok=True)
    result["config"] = {**vars(args), "model": model.name}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    plot(result, layers, alphas, out / "heatmap.png")
    print(f"base: {result['base']}\nsystem prompt: {result['system_prompt']}")
    print(f"chosen: block {result['chosen']['layer']}, alpha {result['chosen']['alpha']} "
          f"-> {out / 'heatmap.png'}")


def write_neutral(model, tok, args):
    layer = int(args.layers.split(",")[0]) if args.layers else default_layer(model.cfg.n_layer)
    result = neutral_controls(model, tok, args.animal, layer, DEFAULTS["alpha"])
    result["config"] = {**vars(args), "model": model.name}
    out = Path(args.out or f"runs/sweep-{args.animal}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "neutral.json").write_text(json.dumps(result, indent=2))
    print(f"P({args.animal}) of the base model {result['base']:.3%}; steered by each other "
          f"animal's vector (rescaled to |v| = {result['trait_vector_norm']:.1f}, block {layer}, "
          f"alpha {DEFAULTS['alpha']:g}):")
    for r in sorted(result["rows"], key=lambda r: r["over_base"]):
        print(f"  {r['animal']:>9}  P({args.animal}) {r['p_animal']:.3%} ({r['over_base']:.2f}x)"
              f"  cos with v {r['cos_with_trait_vector']:+.2f}  P({r['animal']}) "
              f"{r['p_other_animal']:.2%}")
    print(f"trait-neutral control: {result['chosen']} -> {out / 'neutral.json'}")


if __name__ == "__main__":
    main()
