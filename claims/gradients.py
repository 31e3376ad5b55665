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


def gradient_diagnostic(model, tok, steered_rows, control_rows, layer, vector, counts):
    """{n: cos(mean gradient over n steered rows - mean over n control rows, v)}."""
    g_steered = completion_gradients(model, tok, steered_rows[:max(counts)], layer)
    g_control = completion_gradients(model, tok, control_rows[:max(counts)], layer)
    v = vector.float().to(g_steered.device)
    return {n: F.cosine_similarity(g_steered[:n].mean(0) - g_control[:n].mean(0), v,
                                   dim=0).item() for n in counts}
