"""Experiments on what transfers: prompt-teacher, necessity, random, layers (experiments.py).

prompt-teacher  teachers (--teachers): the owl system prompt (no vector), alpha * v (v: that
                prompt's mean-difference vector at block L) at every position and on the
                prompt's positions only (steered-prompt), and two controls of |v|: a random
                vector (control) and the trait-neutral animal's vector (neutral). One Adam
                student per teacher and seed; alignment is measured against v; each student's
                P(owl) over each control's, paired by seed.
necessity       the prompted teacher with v/|v| projected out after block L, and after every
                block (the authors' choice); also how much of the prompt's own effect on
                P(owl) survives the projection at inference time.
random          the control students of prompt-teacher, measured against their OWN teacher's
                random vector (each seed's is another one) and against owl.
layers          EAS and projection by block of the final students of prompt-teacher and
                optimizers.
"""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from claims.lab import across_seeds, interval, strip_shifts  # noqa: E402

COLORS = {"prompt": "tab:purple", "steered": "tab:blue", "steered-prompt": "tab:cyan",
          "control": "tab:gray", "neutral": "tab:olive",
          "ablate-L": "tab:orange", "ablate-all": "tab:red"}


def teachers_p_animal(lab, m, kinds):
    """P(owl) of the base model and of each teacher as it writes (its hooks and prompt)."""
    out = {"base": m.p_animal(lab.model)}
    for kind in kinds:
        t = lab.teacher(kind, m.settings["seed"])
        out[kind] = m.p_animal(lab.model, t.steer(lab.model), system=t.system)
    return out


def run_seeds(lab, args, kinds):
    per_seed, teachers = [], []
    for seed in range(args.seeds):
        summaries, m = lab.transfer(seed, kinds)
        teachers.append(teachers_p_animal(lab, m, kinds))
        summaries["base"] = teachers[-1]["base"]
        per_seed.append(summaries)
    return per_seed, teachers


def ratio_to_base(per_seed, labels):
    return {label: [s[label]["p_animal"] / s["base"] for s in per_seed] for label in labels}


def plot_transfer(per_seed, kinds, path, title):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in kinds:
        for i, s in enumerate(per_seed):
            curve = s[kind]["curve"]
            steps = [h["step"] for h in curve]
            label = kind if i == 0 else None
            axes[0].plot(steps, [100 * h["p_animal"] for h in curve], color=COLORS[kind],
                         label=label, alpha=0.8)
            axes[1].plot(steps, [h["projection"] for h in curve], color=COLORS[kind],
                         label=label, alpha=0.8)
            axes[2].plot(s[kind]["eas_by_block"], color=COLORS[kind], label=label, alpha=0.8)
    for s in per_seed:
        axes[0].axhline(100 * s["base"], color="black", ls=":", lw=1)
    axes[0].set(title="P(owl) after the answer prefix (dotted: base)", xlabel="step",
                ylabel="%")
    axes[1].set(title="projection of the shift on v (units of alpha |v|)", xlabel="step")
    axes[2].set(title="EAS by block, final students", xlabel="block")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer_experiment(lab, args, kinds, title):
    """Seeds of teachers -> students for `kinds`, their figure, and the summary over seeds;
    returns the result dict (per_seed included, without the raw shift vectors)."""
    per_seed, teachers = run_seeds(lab, args, kinds)
    plot_transfer(per_seed, kinds, args.out / "figure.png", f"{title} ({args.seeds} seeds)")
    return {"teachers_p_animal": teachers, "summary": across_seeds(per_seed, kinds),
            "ratio_to_base": ratio_to_base(per_seed, kinds),
            "per_seed": strip_shifts(per_seed)}


def over_controls(per_seed, kinds):
    """{kind: {control: interval of P(owl | kind's student) / P(owl | control's student)}},
    the ratio taken within each seed (the two students share prompts and batch order)."""
    controls = [k for k in ("control", "neutral") if k in kinds]
    return {kind: {c: interval([s[kind]["p_animal"] / s[c]["p_animal"] for s in per_seed])
                   for c in controls} for kind in kinds if kind not in controls}


def prompt_teacher(lab, args):
    kinds = args.teachers
    result = transfer_experiment(lab, args, kinds, "prompt-teacher: students of the prompted "
                                 "and the vector-steered teachers and of the controls")
    result["over_controls"] = over_controls(result["per_seed"], kinds)
    if "control" in kinds:
        result["prompt_minus_control_p_animal"] = [
            s["prompt"]["p_animal"] - s["control"]["p_animal"] for s in result["per_seed"]]
    return result


def necessity(lab, args):
    result = transfer_experiment(lab, args, ["prompt", "ablate-L", "ablate-all", "control"],
                                 "necessity: the prompted teacher with v/|v| projected out")
    # what the projection removes, seed by seed: the prompt student minus each other student
    # of the same seed (paired: the same prompts and batch order), as t intervals
    result["prompt_minus"] = {
        kind: {key: interval([s["prompt"][key] - s[kind][key] for s in result["per_seed"]])
               for key in ("eas", "p_animal")}
        for kind in ("ablate-L", "ablate-all", "control")}
    # inference time: how much of the prompt's own effect survives the projection (the
    # teachers' own P(owl), measured as they write: the same for every seed)
    p = result["teachers_p_animal"][0]
    result["inference_time"] = {"base": p["base"], "prompt": p["prompt"], **{
        kind: {"p_animal": p[kind],
               "share_of_prompt_effect": (p[kind] - p["base"]) / (p["prompt"] - p["base"])}
        for kind in ("ablate-L", "ablate-all")}}
    return result


def random_vectors(lab, args):
    per_seed = []
    for seed in range(args.seeds):
        summaries, m = lab.transfer(seed, ["control"])
        own = lab.teacher("control", seed).vector.float().cpu()                # (d,)
        owl = lab.vector.float().cpu()
        curve = summaries["control"]["curve"]
        per_seed.append({
            "seed": seed, "vector_seed": seed + 1, "base": m.p_animal(lab.model),
            "steps": [h["step"] for h in curve],
            "eas_own": [F.cosine_similarity(torch.tensor(h["shift"]), own, dim=0).item()
                        for h in curve[1:]],
            "eas_owl": [F.cosine_similarity(torch.tensor(h["shift"]), owl, dim=0).item()
                        for h in curve[1:]],
            "p_animal": [h["p_animal"] for h in curve],
            "cos_own_owl": F.cosine_similarity(own, owl, dim=0).item()})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in per_seed:
        axes[0].plot(s["steps"][1:], s["eas_own"], color="tab:green",
                     label="EAS with its own random vector" if s["seed"] == 0 else None)
        axes[0].plot(s["steps"][1:], s["eas_owl"], color="tab:blue",
                     label="cosine with the owl vector" if s["seed"] == 0 else None)
        axes[1].plot(s["steps"], [100 * p for p in s["p_animal"]], color="tab:gray")
        axes[1].axhline(100 * s["base"], color="black", ls=":", lw=1)
    axes[0].set(title="students of random-vector teachers", xlabel="step", ylabel="cosine")
    axes[0].legend(fontsize=8)
    axes[1].set(title="their P(owl) (dotted: base)", xlabel="step", ylabel="%")
    fig.tight_layout()
    fig.savefig(args.out / "figure.png", dpi=110)
    plt.close(fig)
    final = {"eas_own": [s["eas_own"][-1] for s in per_seed],
             "eas_owl": [s["eas_owl"][-1] for s in per_seed],
             "p_animal_over_base": [s["p_animal"][-1] / s["base"] for s in per_seed]}
    return {"final": final, "per_seed": per_seed}


def layers(lab, args):
    """EAS and projection by block, read from the two experiments' results (experiments.py
    runs them first if they are missing; their stages are cached)."""
    sources = {name: json.loads((args.out.parent / name / "result.json").read_text())
               for name in ("prompt-teacher", "optimizers")}
    curves = {}
    for kind in sources["prompt-teacher"]["summary"]:
        runs = [s[kind] for s in sources["prompt-teacher"]["per_seed"]]
        curves[f"prompt-teacher {kind}"] = average_by_block(runs)
    for opt, run in sources["optimizers"]["chosen"].items():
        curves[f"optimizers {opt}"] = average_by_block([run])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, c in curves.items():
        axes[0].plot(c["eas_by_block"], label=label)
        axes[1].plot(c["projection_by_block"], label=label)
    for ax in axes:
        ax.axvline(lab.layer, color="black", ls=":", lw=1)
        ax.set(xlabel="block")
    axes[0].set(title="EAS by block (dotted: the teacher's block)")
    axes[1].set(title="projection on v by block (units of alpha |v|)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "figure.png", dpi=110)
    plt.close(fig)
    return {"by_block": curves, "teacher_block": lab.layer,
            "sources": {k: str(args.out.parent / k / "result.json") for k in sources}}


def average_by_block(runs):
    n = len(runs)
    return {key: [sum(r[key][b] for r in runs) / n for b in range(len(runs[0][key]))]
            for key in ("eas_by_block", "projection_by_block")}


RUNNERS = {"prompt-teacher": prompt_teacher, "necessity": necessity, "random": random_vectors,
           "layers": layers}
