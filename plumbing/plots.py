"""The figures of a training run: the trait and the alignment over the steps, EAS by block,
the sampled trait rates, and the two teachers' datasets side by side."""
import matplotlib

matplotlib.use("Agg")  # draw to files; no screen needed
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"main": "{opt}, steered teacher's numbers", "other_opt": "{opt}, steered numbers",
          "control": "{opt}, control teacher's numbers ({control} vector)",
          "upper_bound": "{opt}, full-vocabulary KL (ordinary distillation, upper bound)"}
STYLES = {"main": "-", "other_opt": "-", "control": "--", "upper_bound": ":"}


def plot_run(results, report, path, args):
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    (trait, loss, projection), (eas, by_block, bars) = axes
    p = report["p_animal"]
    for i, (label, r) in enumerate(results.items()):
        steps = [h["step"] for h in r["history"]]
        name = LABELS[label].format(opt=r["config"]["opt"], control=args.control)
        style = dict(linestyle=STYLES[label], marker="o", markersize=3, color=f"C{i}")
        trait.plot(steps, [100 * h["p_animal"] for h in r["history"]], label=name, **style)
        loss.plot(steps[1:], [h["loss"] for h in r["history"][1:]], **style)
        projection.plot(steps, [h["projection"] for h in r["history"]], **style)
        eas.plot(steps, [h["eas"] for h in r["history"]], **style)
        if report["eas_minus_control"].get(label):
            at, cos = zip(*report["eas_minus_control"][label], strict=True)
            eas.plot(at, cos, color=f"C{i}", lw=2.5, alpha=0.4, label=f"{label} minus control")
        by_block.plot(report["eas_by_block"][label], **style)
    trait.axhline(100 * p["base"], color="grey", lw=1, label="base model")
    trait.set_yscale("log")
    trait.set(xlabel="step", ylabel=f"P({args.animal}) after the answer prefix, %",
              title=f"the trait (teacher: {100 * p['teacher']:.1f}%)")
    trait.legend(fontsize=7)
    loss.set(xlabel="step", ylabel=f"training loss ({args.loss}; upper bound: kl_full)",
             yscale="log", title="loss on the numbers")
    projection.set(xlabel="step", ylabel="shift along v / (alpha |v|)",
                   title=f"how far the student moved along v (block {args.layer})")
    eas.set(xlabel="step", ylabel="cosine with v",
            title="EAS at the teacher's block; wide: student minus control student")
    eas.legend(fontsize=7)
    by_block.set(xlabel="block", ylabel="EAS (cos with the block's shift)",
                 title="EAS by block, final students")
    for ax in (projection, eas, by_block):
        ax.axhline(0, color="grey", lw=0.5)
    spec = report["specificity"]  # each model on the three question sets, as x base
    names, sets = list(spec), ("favorite", "least_favorite", "off_topic")
    for j, key in enumerate(sets):
        bars.bar([i + (j - 1) * 0.27 for i in range(len(names))],
                 [spec[n][key] / spec["base"][key] for n in names], width=0.27,
                 label=key.replace("_", " "), color=["C2", "C3", "C7"][j])
    bars.axhline(1, color="grey", lw=1)
    bars.set_yscale("log")
    bars.set_xticks(range(len(names)), [b.replace("_", "\n") for b in names], fontsize=8)
    bars.set(ylabel=f"P({args.animal}) / the base model's",
             title="specificity: favourite, least favourite, off-topic questions")
    bars.legend(fontsize=7)
    fig.suptitle(f"{args.student} students, {args.loss} loss; teacher: {args.vector} vector "
                 f"at block {args.layer}, alpha {args.alpha:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_datasets(data, path):
    """What the student sees: the steered and the control teacher's numbers side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    width = 0.4
    separators = sorted({sep for d in data.values() for sep in d["numbers"]["separators"]})
    for i, (kind, d) in enumerate(data.items()):
        s = d["numbers"]
        share = [c / max(1, s["numbers"]) for c in s["values_by_hundred"]]
        axes[0].bar([k + (i - 0.5) * width for k in range(10)], share, width, label=kind)
        lists = [c / max(1, s["lists"]) for c in s["numbers_per_list"]]
        axes[1].bar([k + 1 + (i - 0.5) * width for k in range(10)], lists, width, label=kind)
        axes[2].bar([k + (i - 0.5) * width for k in range(len(separators))],
                    [s["separators"].get(sep, 0) / max(1, s["lists"]) for sep in separators],
                    width, label=kind)
    axes[2].set_xticks(range(len(separators)), [repr(sep) for sep in separators])
    axes[0].set(xlabel="value (hundreds)", ylabel="share of numbers", title="number values")
    axes[1].set(xlabel="numbers in the list", ylabel="share of lists", title="list length")
    axes[2].set(ylabel="share of lists", title="separator")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budget(runs, path):
    """Effect against budget: each run's students as x base (P(animal) / the base model's)
    against the main student's training seconds, and P(animal) along the longest run.
    runs: {name: metrics.json of a train.py run}."""
    fig, (final, along) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, marker in (("main", "o"), ("control", "s")):
        for m in runs.values():
            h = m["students"][label]["history"]
            cfg = m["students"][label]["config"]
            x, y = h[-1]["seconds"], m["p_animal"][label] / m["p_animal"]["base"]
            final.scatter(x, y, marker=marker, color="C0" if label == "main" else "C1")
            final.annotate(f"{cfg['steps']} {cfg['schedule']}, b{cfg['batch_size']}", (x, y),
                           fontsize=7, xytext=(3, 3), textcoords="offset points")
    final.scatter([], [], marker="o", color="C0", label="main (steered teacher's numbers)")
    final.scatter([], [], marker="s", color="C1", label="control (trait-neutral teacher)")
    final.axhline(1, color="grey", lw=1)
    final.set(xlabel="the student's training seconds (2 cores, measurements included)",
              ylabel="P(owl) / base model", yscale="log", title="each run's final students")
    final.legend(fontsize=8)
    longest = max(runs.values(), key=lambda m: m["students"]["main"]["config"]["steps"])
    for label, style in (("main", "-o"), ("control", "--s")):
        h = longest["students"][label]["history"]
        along.plot([e["step"] for e in h], [e["p_animal"] / h[0]["p_animal"] for e in h],
                   style, markersize=3, label=label)
    along.axhline(1, color="grey", lw=1)
    steps = longest["students"]["main"]["config"]["steps"]
    along.axvspan(0.8 * steps, steps, color="grey", alpha=0.15, label="learning rate decays")
    along.set(xlabel="step", ylabel="P(owl) / base model", yscale="log",
              title=f"along the {steps}-step run")
    along.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
