"""The optimizer experiment (experiments.py optimizers); its mechanism is claims/mechanism.py.

optimizers  students on the same steered numbers with Adam, AdamW, RMSProp, sign-SGD, SGD and
            SGD with momentum, each at three learning rates (a quarter of, equal to, and four
            times train.py's default), compared at MATCHED training loss: Adam's loss over
            the whole dataset after --steps is the target, and every other optimizer's run
            (up to --steps x --match-factor steps, its loss over the dataset measured at every
            measurement) is read where it first reaches it (or, if it stalls, at its lowest
            loss), against P(owl) there. Optionally (--full) full fine-tuning with Adam
            and SGD. The CPU preset's students are single vectors; the paper preset's are
            LoRA. On 2 cores, LoRA on every block costs several seconds a step; LoRA on the
            teacher's block and after it (--lora-from layer) about half a second.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402
from config import LEARNING_RATES  # noqa: E402
from claims.lab import interval, summarize  # noqa: E402
from student import distillation_loss, student_logits  # noqa: E402

OPTS = ["adam", "adamw", "rmsprop", "signsgd", "sgd", "sgdm"]
LR_FACTORS = (0.25, 1.0, 4.0)


def sweep_label(opt, lr):
    """A sweep student's label (and cache name): the seed spread reuses seed 0's by it."""
    return f"{opt} lr {lr:g}"


def data_loss(lab, student, batches, loss):
    """The student's mean loss over every batch of its dataset (not one noisy minibatch)."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = student_logits(student, lab.model, batch, loss)
            teacher = None if loss == "ce" else batch.teacher_logits(lab.model,
                                                                     loss == "kl_numbers")
            total += distillation_loss(logits, teacher, batch.targets[batch.targets != -100],
                                       loss).item()
    return total / len(batches)


class WithDataLoss:
    """A Measurer (alignment.py) whose track() also measures the loss over the whole dataset,
    so that every measurement of a student's history says how far its training has come."""

    def __init__(self, m, lab, batches, loss):
        self.m, self.lab, self.batches, self.loss = m, lab, batches, loss

    def describe(self):  # (part of the students' cache key)
        return {**self.m.describe(), "data_loss": True}

    def track(self, student):
        return {**self.m.track(student),
                "data_loss": data_loss(self.lab, student, self.batches[student.kind], self.loss)}

    def __getattr__(self, name):  # everything else is the measurer's own
        return getattr(self.m, name)


def reading(measurement):
    """What a comparison reports of one measurement of a student's history."""
    return {k: measurement[k] for k in ("step", "data_loss", "p_animal", "eas")}


def matched_point(history, target):
    """The first measurement after step 0 whose loss over the whole dataset is at most
    `target`, or None if the run never gets there."""
    return next((h for h in history[1:]
                 if math.isfinite(h["data_loss"]) and h["data_loss"] <= target), None)


def choose_matched(runs, target):
    """Of one optimizer's runs ({label: {"history": [...], ...}}): the one that reaches the
    target loss first (fewest steps; a tie: the lower loss there), with the measurement at
    that step; if none reaches it, the one that came closest (its lowest loss), marked
    stalled. -> (label, measurement, stalled)."""
    reached = {label: matched_point(r["history"], target) for label, r in runs.items()}
    hits = {label: h for label, h in reached.items() if h is not None}
    if hits:
        label = min(hits, key=lambda k: (hits[k]["step"], hits[k]["data_loss"]))
        return label, hits[label], False
    best = {label: min((h for h in r["history"][1:] if math.isfinite(h["data_loss"])),
                       key=lambda h: h["data_loss"], default=None)
            for label, r in runs.items()}
    best = {label: h for label, h in best.items() if h is not None}
    if not best:  # every run diverged
        return None, None, True
    label = min(best, key=lambda k: best[k]["data_loss"])
    return label, best[label], True


def adam_at_loss(adam_history, loss):
    """Where Adam's run first reached `loss` (a stalled optimizer's lowest): the comparison
    at matched loss turned around, so that a stalled optimizer is still compared with Adam at
    the same loss (None if Adam never got there)."""
    at = matched_point(adam_history, loss)
    return None if at is None else reading(at)


def optimizers(lab, args):
    s = lab.settings(0)
    teacher = lab.teacher("steered")
    data = {"steered": lab.data(s, teacher, "steered")}
    plan = {}
    opts = args.opts or OPTS
    adam_default = sweep_label("adam", LEARNING_RATES[(s.student, "adam")])
    for opt in opts:  # Adam sets the target in s.steps; the others may take match_factor x
        default = LEARNING_RATES[(s.student, opt)]
        steps = s.steps if opt == "adam" else s.steps * args.match_factor
        for factor in LR_FACTORS:
            plan[sweep_label(opt, default * factor)] = (
                "steered", lab.config(s, opt, default * factor, steps=steps))
    full = args.full if args.full is not None else args.preset == "paper"
    if full:
        for opt in ("adam", "sgd"):
            plan[f"full {opt}"] = ("steered", lab.config(s, opt, kind="full"))
    frozen = {cfg.kind: cfg.frozen_blocks for _, cfg in plan.values()}
    batches = {kind: train.teacher_targets(s, lab.model, lab.tok, teacher, data["steered"],
                                           "steered", s.batch_size, blocks)
               for kind, blocks in frozen.items()}
    m = WithDataLoss(lab.measurer(s, teacher), lab, batches, s.loss)
    students, results = lab.students(s, plan, {"steered": teacher}, data, m)
    runs = {}
    for label, (_, cfg) in plan.items():
        history = results[label]["history"]
        summary = summarize(m, students[label], history, lab.vector)
        summary.pop("final_shift")
        for h, measured in zip(summary["curve"], history, strict=True):
            h.pop("shift")
            h["data_loss"] = measured["data_loss"]
        runs[label] = {"opt": cfg.opt, "kind": cfg.kind, "lr": cfg.lr, "steps": cfg.steps,
                       **summary, "data_loss": history[-1]["data_loss"], "history": history}
    base = m.p_animal(lab.model)
    target = runs[adam_default]["data_loss"]
    chosen = {}
    for opt in opts:  # the learning rate that reaches Adam's loss first, and where
        mine = {k: r for k, r in runs.items() if r["opt"] == opt and r["kind"] == s.student}
        label, at, stalled = choose_matched(mine, target)
        if label is not None:
            chosen[opt] = {**runs[label], "stalled": stalled, "matched": reading(at)}
    for c in chosen.values():  # a stalled optimizer: Adam read at the loss it did reach
        if c["stalled"]:
            c["adam_at_its_loss"] = adam_at_loss(runs[adam_default]["history"],
                                                 c["matched"]["data_loss"])
    for label in plan:
        if label.startswith("full"):
            chosen[label] = runs[label]
    for r in runs.values():
        r.pop("history")  # (its figures are in the curve)
    for r in chosen.values():
        r.pop("history", None)
    seeds = seed_spread(lab, args, chosen, batches)
    plot_optimizers(runs, chosen, base, args.out / "figure.png", target)
    return {"base_p_animal": base, "matched_loss_target": target, "runs": runs,
            "chosen": chosen, "seeds": seeds, "match_factor": args.match_factor,
            "note": "target: Adam's loss over the whole dataset at its default learning rate "
                    "after --steps; chosen: per optimizer, the learning rate that reaches "
                    "it first (within --steps x --match-factor steps; 'matched' is that "
                    "measurement) or, if none does, the lowest loss reached (stalled: true; "
                    "then adam_at_its_loss: Adam where it first reached that loss)"}


def seed_spread(lab, args, chosen, batches):
    """Every optimizer chosen (not full fine-tuning) at its matched settings, over args.seeds
    seeds (new data each): P(animal) over base, EAS and the loss over the dataset, read at the
    step where seed 0 reached Adam's loss (or came closest), and P(animal) over Adam's on the
    same seed (paired: the same data). Seed 0's students are the sweep's own (the same label,
    settings and data: reused)."""
    setups = []  # per seed: (settings, teacher, data, measurer), made once for every optimizer
    for seed in range(args.seeds):
        s = lab.settings(seed)
        teacher = lab.teacher("steered")
        data = {"steered": lab.data(s, teacher, "steered")}
        seed_batches = batches if seed == 0 else {
            kind: train.teacher_targets(s, lab.model, lab.tok, teacher, data["steered"],
                                        "steered", s.batch_size, b[0].prefix_blocks)
            for kind, b in batches.items()}
        setups.append((s, teacher, data,
                       WithDataLoss(lab.measurer(s, teacher), lab, seed_batches, s.loss)))
    out = {}
    for opt in [o for o in chosen if not o.startswith("full")]:
        values, eas, losses = [], [], []
        at = chosen[opt].get("matched", {}).get("step", chosen[opt]["steps"])
        for s, teacher, data, m in setups:
            cfg = lab.config(s, opt, chosen[opt]["lr"], steps=chosen[opt]["steps"])
            label = sweep_label(opt, chosen[opt]["lr"])
            _, results = lab.students(s, {label: ("steered", cfg)}, {"steered": teacher},
                                      data, m)
            h = next(h for h in results[label]["history"] if h["step"] == at)
            values.append(h["p_animal"] / m.p_animal(lab.model))
            eas.append(h["eas"])
            losses.append(h["data_loss"])
        out[opt] = {"lr": chosen[opt]["lr"], "step": at, "p_animal_over_base": interval(values),
                    "eas": interval(eas), "data_loss": interval(losses)}
    adam = out.get("adam", {}).get("p_animal_over_base", {}).get("values")
    for opt in out:  # paired over Adam: the same seed's data, each read at its matched step
        if adam and opt != "adam":
            out[opt]["over_adam"] = interval(
                [v / a if a > 0 else float("nan")
                 for v, a in zip(out[opt]["p_animal_over_base"]["values"], adam, strict=True)])
    return out


def plot_optimizers(runs, chosen, base, path, target=None):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for opt in chosen:
        mine = sorted([r for label, r in runs.items() if r["opt"] == opt
                       and (r["kind"] != "full") == (not opt.startswith("full"))
                       or label == opt], key=lambda r: r["data_loss"])
        line, = axes[0].plot([r["data_loss"] for r in mine],
                             [r["p_animal"] / base for r in mine], "o", label=opt)
        for r in mine:  # each learning rate's path through training, to its final point
            points = [h for h in r["curve"][1:] if math.isfinite(h["data_loss"])]
            axes[0].plot([h["data_loss"] for h in points], [h["p_animal"] / base for h in points],
                         "-", color=line.get_color(), lw=0.8, alpha=0.6)
        c = chosen[opt]["curve"]
        line, = axes[1].plot([h["step"] for h in c[1:]], [h["data_loss"] for h in c[1:]],
                             label=f"{opt} (lr {chosen[opt]['lr']:g})")
        if "matched" in chosen[opt]:  # where it reached Adam's loss (or came closest)
            at = chosen[opt]["matched"]
            axes[1].plot([at["step"]], [at["data_loss"]], "o", color=line.get_color(),
                         mfc="none" if chosen[opt]["stalled"] else line.get_color())
            axes[1].annotate(f"{at['p_animal'] / base:.2f}x", (at["step"], at["data_loss"]),
                             fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].axhline(1, color="black", ls=":", lw=1)
    if target is not None:
        axes[0].axvline(target, color="black", ls=":", lw=1)
        axes[1].axhline(target, color="black", ls=":", lw=1, label="Adam's loss (target)")
    axes[0].set(xscale="log", xlabel="loss over the dataset", ylabel="P(owl) / base",
                title="trait against loss along training (dot: each learning rate's end)")
    axes[1].set(yscale="log", xlabel="step", ylabel="loss over the whole dataset",
                title="loss curves; dot: reached the target (open: stalled), x base there")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUNNERS = {"optimizers": optimizers}
