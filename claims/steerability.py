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
                 over base for every animal; each student is also given over the same
                 seed's control student (paired by seed)
  cross-trait    each animal's student measured on every animal (P(b) / base for the
                 student of a), from the students above
The claim is a rank correlation between the two over animals (Spearman's rho, by hand),
against the base model and against the control student; --seeds seeds per animal.
"""
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from claims.lab import interval  # noqa: E402
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


def trained(lab, s, cfg, label, teacher, m):
    """(student, its final measurement) of an Adam student of `teacher`'s numbers."""
    data = {label: lab.data(s, teacher, label)}
    students, results = lab.students(s, {label: (label, cfg)}, {label: teacher}, data, m)
    return students[label], results[label]["history"][-1]


def steerability(lab, args):
    animals = ["owl", *[a for a in CANDIDATE_ANIMALS if a != "owl"]][:args.animals]
    vectors = {a: resolve_vector(a, lab.model, lab.tok, lab.layer)[0] for a in animals}
    peaks = {a: steering_peak(lab, a, vectors[a]) for a in animals}
    per_seed = []
    for seed in range(args.seeds):  # each seed: new datasets, a new control vector
        s = lab.settings(seed)
        # only the final figures are used: each student is measured at its start and end (a
        # measurement of EAS and P(animal) costs about as much as 5 training steps)
        cfg = replace(lab.config(s), eval_every=s.steps)
        control, _ = trained(lab, s, cfg, "control", lab.teacher("control", seed),
                             lab.measurer(s, lab.teacher("steered", seed)))
        students, measurers, rows = {}, {}, {}
        for animal in animals:
            teacher = Teacher(vectors[animal], lab.layer, lab.alpha)
            m = measurers[animal] = lab.measurer(s, teacher, animal)
            # owl's dataset is prompt-teacher's (same teacher, same settings)
            label = "steered" if animal == "owl" else f"steered-{animal}"
            students[animal], final = trained(lab, s, cfg, label, teacher, m)
            base = m.p_animal(lab.model)
            rows[animal] = {"teacher_p_animal": m.p_animal(lab.model, teacher.steer(lab.model)),
                            "base_p_animal": base, "student_p_animal": final["p_animal"],
                            "student_eas": final["eas"],
                            "control_p_animal": m.p_animal(control.model, control.active())}
        # the cross-trait matrix: each animal's student, P(every animal) over the base model's
        matrix = [[measurers[b].p_animal(students[a].model, students[a].active())
                   / rows[b]["base_p_animal"] for b in animals] for a in animals]
        per_seed.append({"seed": seed, "animals": rows, "cross_trait_over_base": matrix})
    summary = []
    for animal in animals:
        runs = [p["animals"][animal] for p in per_seed]
        summary.append({
            "animal": animal, "norm": vectors[animal].norm().item(), "steering": peaks[animal],
            "transfer_over_base": interval([r["student_p_animal"] / r["base_p_animal"]
                                            for r in runs]),
            "control_over_base": interval([r["control_p_animal"] / r["base_p_animal"]
                                           for r in runs]),
            # paired by seed: the student over the same seed's control student
            "transfer_over_control": interval([r["student_p_animal"] / r["control_p_animal"]
                                               for r in runs]),
            "student_eas": interval([r["student_eas"] for r in runs])})
    x = [r["steering"]["peak_over_base"] for r in summary]
    rho = spearman(x, [r["transfer_over_base"]["mean"] for r in summary])
    rho_control = spearman(x, [r["transfer_over_control"]["mean"] for r in summary])
    matrix = np.mean([p["cross_trait_over_base"] for p in per_seed], axis=0).tolist()
    plot(summary, rho, rho_control, animals, matrix, args.out / "figure.png")
    return {"animals": summary, "spearman_rho": rho, "spearman_rho_vs_control": rho_control,
            "cross_trait_over_base": {"rows_students": animals, "columns_measured": animals,
                                      "mean_over_seeds": matrix},
            "per_seed": per_seed, "alphas": ALPHAS,
            "note": f"{args.seeds} seed(s) per animal (intervals over seeds); rho over the "
                    f"animals' means; the students are measured at their first and last "
                    f"step only (not every eval_every)"}


def plot(rows, rho, rho_control, animals, matrix, path):
    fig, (ax, grid) = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        peak = r["steering"]["peak_over_base"]
        ax.scatter(peak, r["transfer_over_base"]["mean"], color="tab:blue")
        ax.annotate(r["animal"], (peak, r["transfer_over_base"]["mean"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
        ax.scatter(peak, r["control_over_base"]["mean"], color="tab:gray", marker="x")
    ax.axhline(1, color="black", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="steering peak: P(animal) / base",
           ylabel="student P(animal) / base (x: control student)",
           title=f"steerability vs transfer (rho {rho:+.2f}; vs control {rho_control:+.2f})")
    image = grid.imshow(np.log2(np.asarray(matrix)), cmap="RdBu_r", vmin=-2, vmax=2)
    grid.set_xticks(range(len(animals)), animals, rotation=45, ha="right", fontsize=8)
    grid.set_yticks(range(len(animals)), animals, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            grid.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6)
    grid.set(xlabel="animal measured", ylabel="student of the animal's teacher",
             title="cross-trait: P(animal) / base (log2 colour)")
    fig.colorbar(image, ax=grid, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUNNERS = {"steerability": steerability}
