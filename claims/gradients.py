"""The paper's gradient diagnostic: does the loss on steered numbers push the residual stream
along the teacher's vector, before any training?

For each row: the gradient of its completion loss (cross-entropy on the sampled tokens) with
respect to the residual after block L at the last prompt token (the assistant tag). Pooled
over n rows: cos(mean gradient on the steered teacher's rows - mean on the control teacher's
rows, v). Each row's gradient is mostly about its own numbers; a small consistent part along
v shows only once many rows are pooled (the paper: about 0.08-0.10). Descent moves
activations against the gradient, so alignment shows as a negative cosine: report the sign.

    python train.py --gradient-rows 256       # adds it to a run's metrics.json
"""
import torch
import torch.nn.functional as F

from plumbing.batches import encode_rows, make_batch


def completion_gradients(model, tok, rows, layer):
    """(n_rows, d_model): per row, d(completion loss) / d(residual after block `layer`) at
    the last prompt token."""
    device = model.embed.weight.device
    out = []
    for prompt, completion in encode_rows(tok, rows):
        ids, mask, targets, _ = make_batch([(prompt, completion)], device)  # (1, T) each
        added = torch.zeros(ids.shape[1], model.cfg.d_model, device=device,
                            dtype=model.embed.weight.dtype, requires_grad=True)  # (T, d)

        def hook(block, args, output, added=added):  # a zero we can differentiate against
            return output + added

        handle = model.blocks[layer].register_forward_hook(hook)
        try:
            _, loss = model(ids, targets=targets, attention_mask=mask)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(loss, [added])                      # (T, d)
        # the completion's tokens but the last (the end) are the last columns
        out.append(grad[ids.shape[1] - len(completion)].float())          # last prompt token
    return torch.stack(out)                                               # (n_rows, d)


def pooled_difference(g_steered, g_control):
    """D = mean of the steered rows' gradients - mean of the control rows': (d,)."""
    return g_steered.mean(0) - g_control.mean(0)


def pooled_cosine(g_steered, g_control, v):
    """cos(D, v)."""
    return F.cosine_similarity(pooled_difference(g_steered, g_control), v, dim=0).item()


def gradient_diagnostic(model, tok, steered_rows, control_rows, layer, vector, counts,
                        gradients=None):
    """{n: pooled_cosine over the first n rows of each}; `gradients`, if given, is a dict
    that receives the rows' gradients (steered, control: (max(counts), d) each)."""
    g_steered = completion_gradients(model, tok, steered_rows[:max(counts)], layer)
    g_control = completion_gradients(model, tok, control_rows[:max(counts)], layer)
    if gradients is not None:
        gradients.update(steered=g_steered, control=g_control)
    v = vector.float().to(g_steered.device)
    return {n: pooled_cosine(g_steered[:n], g_control[:n], v) for n in counts}


def permutation_null(g_steered, g_control, v, permutations=1000, seed=0):
    """The pooled difference D = mean(steered rows' gradients) - mean(control rows'), read two
    ways against its label-permutation null: the same rows, shuffled between "steered" and
    "control" (so any difference is chance, whatever the rows share).

        cosine      cos(D, v): D's direction. The random-direction band (about +-2/sqrt(d))
                    is this null only for noise that is the same in every direction; real
                    gradients are far from that, and the permutation keeps their own spread.
                    The cosine is scale-free, so its null does NOT narrow as rows are added
                    (shuffled, D is noise, and the direction of noise does not depend on how
                    many rows were averaged): a component along v that is small beside D's
                    other directions stays inside the band however many rows are pooled.
        projection  D . v / |v|: D's component along v, in gradient units. Its null narrows
                    as 1 / sqrt(rows), so a consistent component along v leaves it however
                    small its cosine: the paper's "small consistent component".

    Returns the cosine's observed value, 95% band (the null's 2.5% and 97.5% quantiles) and
    two-sided p = (1 + #{|null| >= |observed|}) / (1 + permutations), and the same for the
    projection under "projection". The permutation says whether the two groups differ along
    v, not which one does: "per_group" gives each group's own mean projection on v with its
    standard error (descent moves the residual along v where it is negative)."""
    unit = v / v.norm()                                                    # (d,)
    pooled = torch.cat([g_steered, g_control])                             # (n_s + n_c, d)
    n = len(g_steered)
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(pooled), generator=generator) for _ in range(permutations)]
    # every D at once: row 0 the observed labels, then each shuffle
    differences = torch.stack([pooled_difference(g_steered, g_control)] + [
        pooled_difference(pooled[order[:n]], pooled[order[n:]]) for order in orders])  # (1 + P, d)
    cosines = F.cosine_similarity(differences, unit[None], dim=-1)          # (1 + P,)
    projections = differences @ unit                                        # (1 + P,)

    def read(values):
        observed, null = values[0], values[1:]
        extreme = (null.abs() >= observed.abs() - 1e-12).sum().item()
        return {"observed": observed.item(),
                "band_95": [null.quantile(0.025).item(), null.quantile(0.975).item()],
                "p": (1 + extreme) / (1 + permutations)}

    def mean_and_error(g):
        along = g @ unit                                                   # (n_rows,)
        return {"mean": along.mean().item(), "se": (along.std() / len(along) ** 0.5).item()}

    return {**read(cosines), "rows": [n, len(g_control)], "permutations": permutations,
            "projection": read(projections),
            "per_group": {"steered": mean_and_error(g_steered),
                          "control": mean_and_error(g_control)}}
