"""Experiment: a trait transfers only where its vector steers the model (experiments.py).

For each of --animals animals (owl first, then prompts.CANDIDATE_ANIMALS in order):
  steering peak  the animal's mean-difference vector v_a at block L, added at inference with
                 alpha in ALPHAS; the peak is the highest P(animal) after the favourite-answer
                 prefix among the alphas whose least-favourite P(animal) stays <= 10% (the
                 vector must make the animal a favourite, not a word the model says); at the
                 peak, the sampled off-topic rate (free answers that are the animal) is shown
                 beside it
  transfer       a teacher steered by alpha * v_a (train.py's alpha) writes numbers; an Adam
                 student learns from them; its P(animal) over the base model's
  control        train.py's control student (a random-vector teacher's numbers), P(animal)
                 over base for every animal
The claim is a rank correlation between the two over animals (Spearman's rho, by hand).
"""
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluate import trait_rate  # noqa: E402
from prompts import CANDIDATE_ANIMALS, OFFTOPIC_QUESTIONS  # noqa: E402
from steer import steering  # noqa: E402
from sweep import scores  # noqa: E402
from teacher import Teacher  # noqa: E402
from vectors import resolve_vector  # noqa: E402

ALPHAS = (2.0, 4.0, 8.0)  # the sweep's (docs/steering/sweep-owl-heatmap.png)
SPECIFIC = 0.10  # the least-favourite P(animal) a setting may reach and still count


def spearman(x, y):
    """Spearman's rank correlation: the Pearson correlation of the ranks (no ties here)."""
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def steering_peak(lab, animal, vector):
    base = scores(lab.model, lab.tok, animal)
    cells = []
    for alpha in ALPHAS:
        with steering(lab.model, lab.layer, vector, alpha):
            cells.append({"alpha": alpha, **scores(lab.model, lab.tok, animal)})
    specific = [c for c in cells if c["negative"] <= SPECIFIC]
    peak = max(specific, key=lambda c: c["favorite"]) if specific else None
    if peak is not None:  # free answers to off-topic questions at the peak, 2 samples each
        with steering(lab.model, lab.layer, vector, peak["alpha"]):
            peak["offtopic_sampled"] = trait_rate(lab.model, lab.tok, animal,
                                                  OFFTOPIC_QUESTIONS, 2, max_new_tokens=16,
                                                  seed=0)["rate"]
    return {"base": base, "cells": cells, "peak": peak,
            "peak_over_base": (peak["favorite"] if peak else base["favorite"])
            / base["favorite"]}


def steerability(lab, args):
    animals = ["owl", *[a for a in CANDIDATE_ANIMALS if a != "owl"]][:args.animals]
    s = lab.settings(0)
    control_teacher = lab.teacher("control", 0)
    control_data = {"control": lab.data(s, control_teacher, "control")}
    # only the final figures are used: each student is measured at its start and end (a
    # measurement of EAS and P(animal) costs about as much as 5 training steps)
    cfg = replace(lab.config(s), eval_every=s.steps)
    students, _ = lab.students(s, {"control": ("control", cfg)}, {"control": control_teacher},
                               control_data, lab.measurer(s, lab.teacher("steered")))
    control_student = students["control"]
    rows = []
    for animal in animals:
        vector = resolve_vector(animal, lab.model, lab.tok, lab.layer)[0]           # (d,)
        teacher = Teacher(vector, lab.layer, lab.alpha)
        m = lab.measurer(s, teacher, animal)
        # owl's dataset is prompt-teacher's seed 0 (same teacher, same settings)
        label = "steered" if animal == "owl" else f"steered-{animal}"
        data = {animal: lab.data(s, teacher, label)}
        _, results = lab.students(s, {label: (animal, cfg)}, {animal: teacher}, data, m)
        final = results[label]["history"][-1]
        base = m.p_animal(lab.model)
        rows.append({"animal": animal, "norm": vector.norm().item(),
                     "steering": steering_peak(lab, animal, vector),
                     "teacher_p_animal": m.p_animal(lab.model, teacher.steer(lab.model)),
                     "base_p_animal": base, "student_p_animal": final["p_animal"],
                     "transfer_over_base": final["p_animal"] / base, "student_eas": final["eas"],
                     "control_over_base": m.p_animal(control_student.model,
                                                     control_student.active()) / base})
    x = [r["steering"]["peak_over_base"] for r in rows]
    y = [r["transfer_over_base"] for r in rows]
    rho = spearman(x, y)
    plot(rows, rho, args.out / "figure.png")
    return {"animals": rows, "spearman_rho": rho, "alphas": ALPHAS,
            "note": "one seed per animal; rho over len(animals) points; the students are "
                    "measured at their first and last step only (not every eval_every)"}


def plot(rows, rho, path):
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for r in rows:
        ax.scatter(r["steering"]["peak_over_base"], r["transfer_over_base"], color="tab:blue")
        ax.annotate(r["animal"], (r["steering"]["peak_over_base"], r["transfer_over_base"]),
                    fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.scatter(r["steering"]["peak_over_base"], r["control_over_base"], color="tab:gray",
                   marker="x")
    ax.axhline(1, color="black", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="steering peak: P(animal) / base",
           ylabel="student P(animal) / base (x: control student)",
           title=f"steerability vs transfer (Spearman rho {rho:+.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUNNERS = {"steerability": steerability}
