"""Experiment: what Adam amplifies (experiments.py mechanism). No training.

At the base model, the gradient g of the loss on the steered rows (and on the control rows)
with respect to the weights of blocks 0..L; one SGD step (-g, rescaled) and one Adam-like step
(-sign g: Adam's first step) of the same size; how each moves the mean residual after block L
on held-out prompts (cosine with v); the share of |g|^2 held by the top 1% of coordinates, on
the base weights and on a LoRA student's own parameters (the paper's), steered against
control. Then the activation-gradient diagnostic (gradients.py) pooled over more and more
rows, against the band random directions give and against its label-permutation null
(for the cosine, and for the pooled difference's projection on v, whose null narrows).
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alignment import mean_residuals  # noqa: E402
from claims.gradients import gradient_diagnostic, permutation_null  # noqa: E402
from plumbing.batches import encode_rows, make_batch  # noqa: E402
from student import Student  # noqa: E402


def weight_gradient(lab, rows, params, batch_size=16, model=None):
    """The mean gradient of the completion loss (cross-entropy on the teacher's sampled
    tokens) over `rows`, with respect to `params` of `model` (default: the base model),
    flattened: (n_params,)."""
    model = model or lab.model
    device = lab.model.embed.weight.device
    examples = encode_rows(lab.tok, rows)
    total = None
    for start in range(0, len(examples), batch_size):
        ids, mask, targets, _ = make_batch(examples[start:start + batch_size], device)
        _, loss = model(ids, targets=targets, attention_mask=mask)
        grads = torch.autograd.grad(loss, params)
        flat = torch.cat([g.float().flatten() for g in grads]) * len(ids)
        total = flat if total is None else total + flat
    return total / len(examples)


def shift_cosine(lab, m, params, step):
    """Add `step` (flat) to params, measure cos(mean residual shift after block L, v),
    then restore the weights."""
    sizes = [p.numel() for p in params]
    with torch.no_grad():
        for p, d in zip(params, step.split(sizes), strict=True):
            p.add_(d.view_as(p).to(p.dtype))
        shift = (mean_residuals(lab.model, m.held_out, [lab.layer])[0]
                 - m.base_means[lab.layer])                                    # (d,)
        for p, d in zip(params, step.split(sizes), strict=True):
            p.sub_(d.view_as(p).to(p.dtype))
    return F.cosine_similarity(shift, m.v, dim=0).item(), shift.norm().item()


def mechanism(lab, args):
    s = lab.settings(0)
    teachers = {"steered": lab.teacher("steered"), "control": lab.teacher("control")}
    rows = {k: lab.data(s, t, k)["rows"] for k, t in teachers.items()}
    m = lab.measurer(s, teachers["steered"])
    params = [p for i, b in enumerate(lab.model.blocks) if i <= lab.layer
              for p in b.parameters() if p.dim() == 2]                     # the block linears
    for p in params:
        p.requires_grad_(True)
    try:
        g = {k: weight_gradient(lab, r, params) for k, r in rows.items()}
    finally:
        for p in params:
            p.requires_grad_(False)
    g["difference"] = g["steered"] - g["control"]
    n = g["steered"].numel()
    steps = {}
    for size in (1e-5, 1e-4):
        for k, grad in g.items():
            sgd, sign = equal_steps(grad, size)
            steps[f"{k} size {size:g}"] = {
                "sgd": shift_cosine(lab, m, params, sgd),
                "sign": shift_cosine(lab, m, params, sign)}
    top = {k: top_share(grad, 0.01) for k, grad in g.items()}
    counts = sorted({c for c in (1, 4, 16, 64, 256, 1024) if c < len(rows["steered"])}
                    | {min(1024, len(rows["steered"]), len(rows["control"]))})
    gradients = {}
    diagnostic = gradient_diagnostic(lab.model, lab.tok, rows["steered"], rows["control"],
                                     lab.layer, lab.vector, counts, gradients)
    band = random_band(lab.model.cfg.d_model, lab.vector)
    null = permutation_null(gradients["steered"], gradients["control"],
                            lab.vector.float().to(gradients["steered"].device))
    plot_mechanism(steps, diagnostic, band, args.out / "figure.png", null)
    return {"n_parameters": n, "rows": {k: len(r) for k, r in rows.items()},
            "step_shift_cosine": {k: {kind: {"cos_with_v": c, "shift_norm": norm}
                                      for kind, (c, norm) in v.items()}
                                  for k, v in steps.items()},
            "top_1pct_share_of_g2": top,
            "top_1pct_share_of_g2_lora": lora_top_share(lab, s, rows),
            "activation_gradient_cosine": diagnostic, "random_direction_band_95": band,
            "permutation_null": null}


def lora_top_share(lab, s, rows):
    """The paper's outlier measure on a LoRA student's own parameters (every block, at its
    initialisation: B = 0, so only the B matrices have a gradient), steered vs control."""
    student = Student(lab.model, "lora", rank=s.rank, scale=s.lora_scale, seed=s.seed)
    params = list(student.learned().values())
    return {k: top_share(weight_gradient(lab, r, params, model=student.model), 0.01)
            for k, r in rows.items()}


def equal_steps(grad, size):
    """Two steps of the same length, size * sqrt(n) for n weights:
        SGD's direction    -g / |g| * size * sqrt(n)
        Adam's first step  -size * sign(g)     (m_1 / sqrt(v_1) = g / |g| per coordinate)"""
    sgd = -grad / grad.norm() * size * math.sqrt(grad.numel())
    sign = -grad.sign() * size
    return sgd, sign


def top_share(grad, fraction):
    """The share of |g|^2 held by the largest `fraction` of coordinates."""
    g2 = grad.float() ** 2
    k = max(1, int(fraction * g2.numel()))
    return (g2.topk(k).values.sum() / g2.sum()).item()


def random_band(d, vector, n=2000, seed=0):
    """The 2.5% and 97.5% quantiles of cos(random Gaussian direction, v): about +-2/sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g)
    cos = F.cosine_similarity(r, vector.float().cpu()[None], dim=-1)
    return [cos.quantile(0.025).item(), cos.quantile(0.975).item()]


def plot_mechanism(steps, diagnostic, band, path, null=None):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = list(steps)
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], [steps[k]["sgd"][0] for k in labels], 0.4, label="SGD")
    axes[0].bar([i + 0.2 for i in x], [steps[k]["sign"][0] for k in labels], 0.4,
                label="sign (Adam's first step)")
    axes[0].set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
    axes[0].set(title="one step of equal size: cos(residual shift at L, v)")
    axes[0].legend(fontsize=8)
    counts = sorted(diagnostic)
    axes[1].plot(counts, [diagnostic[c] for c in counts], "o-", label="pooled gradient diff.")
    axes[1].axhspan(*band, color="gray", alpha=0.3, label="random directions (95%)")
    if null is not None:  # at the most rows pooled
        axes[1].errorbar([null["rows"][0]], [sum(null["band_95"]) / 2],
                         yerr=[[sum(null["band_95"]) / 2 - null["band_95"][0]],
                               [null["band_95"][1] - sum(null["band_95"]) / 2]],
                         fmt="none", ecolor="C3", capsize=4,
                         label=f"label-permutation null (95%), p = {null['p']:.2g}; "
                               f"projection on v: p = {null['projection']['p']:.2g}")
    axes[1].set(xscale="log", xlabel="rows pooled", ylabel="cos with v",
                title="activation gradient: steered - control rows")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUNNERS = {"mechanism": mechanism}
