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


def pooled_cosine(g_steered, g_control, v):
    """cos(mean of the steered rows' gradients - mean of the control rows', v)."""
    return F.cosine_similarity(g_steered.mean(0) - g_control.mean(0), v, dim=0).item()


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
    """The pooled cosine against its label-permutation null: the same rows, shuffled
    between "steered" and "control" (so any difference is chance, whatever the rows share).
    The random-direction band (about +-2/sqrt(d)) is this null only for gradients whose noise
    is the same in every direction; real gradients are far from that, and the permutation
    keeps their own spread. A consistent component along v shows as an observed cosine that
    leaves the null's band as rows are added (the noise of a mean shrinks, the component
    stays). Returns the observed cosine, the null's 2.5% and 97.5% quantiles, and the
    two-sided p = (1 + #{|null| >= |observed|}) / (1 + permutations)."""
    observed = pooled_cosine(g_steered, g_control, v)
    pooled = torch.cat([g_steered, g_control])                             # (n_s + n_c, d)
    n = len(g_steered)
    generator = torch.Generator().manual_seed(seed)
    null = torch.tensor([pooled_cosine(pooled[order[:n]], pooled[order[n:]], v)
                         for order in (torch.randperm(len(pooled), generator=generator)
                                       for _ in range(permutations))])     # (permutations,)
    extreme = (null.abs() >= abs(observed) - 1e-12).sum().item()
    return {"observed": observed, "rows": [n, len(g_control)], "permutations": permutations,
            "band_95": [null.quantile(0.025).item(), null.quantile(0.975).item()],
            "p": (1 + extreme) / (1 + permutations)}
