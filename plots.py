"""The figures of a training run: EAS and trait score over steps, and the trait rates."""
import matplotlib

matplotlib.use("Agg")  # draw to files; no screen needed
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"main": "{opt} (steered data)", "other_opt": "{opt} (steered data)",
          "control": "{opt} (control data)",
          "upper_bound": "{opt}, full-vocabulary KL (ordinary distillation, upper bound)"}


def plot_run(results, final, path, args):
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for label, r in results.items():
        steps = [h["step"] for h in r["history"]]
        name = LABELS[label].format(opt=r["config"]["opt"])
        style = ":" if label == "upper_bound" else "--" if label == "control" else "-"
        axes[0].plot(steps, [h["eas"] for h in r["history"]], style, marker="o", label=name)
        axes[1].plot(steps, [h["trait"] for h in r["history"]], style, marker="o", label=name)
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set(xlabel="step", ylabel=f"EAS = cos(v_student, v_teacher), block {args.layer}",
                title="alignment with the teacher's vector")
    axes[1].set(xlabel="step", ylabel=f"P({args.animal}) after the answer prefix",
                title="trait score")
    axes[0].legend(fontsize=8)
    bars = ["base", "teacher", *results]
    rates = [final[b]["rate"] for b in bars]
    errors = [[final[b]["rate"] - final[b]["low"] for b in bars],
              [final[b]["high"] - final[b]["rate"] for b in bars]]
    axes[2].bar(range(len(bars)), rates, yerr=errors, capsize=3,
                color=["grey", "black", *[f"C{i}" for i in range(len(results))]])
    axes[2].set_xticks(range(len(bars)), [b.replace("_", "\n") for b in bars], fontsize=8)
    axes[2].set(ylabel=f"sampled rate of '{args.animal}' after the prefix (95% CI)",
                title="trait rate: base, teacher, students")
    fig.suptitle(f"{args.student} students, {args.loss} loss, teacher: {args.vector} vector, "
                 f"block {args.layer}, alpha {args.alpha:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
