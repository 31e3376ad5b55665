"""Several vector students trained side by side in one forward pass: a speed-up, same result.

A vector student is one learned vector v_k added after block L of the frozen base model.
K of them that read the same batches in the same order (one dataset and one seed: an
optimizer or learning-rate sweep) can share every step's forward and backward pass:

    h        the batch's cached residual after block L            (B, T, d)
    h_k      h + v_k, for k = 1..K, stacked                       (K, B, T, d)
    blocks L+1.. run once on all K*B rows                          (K*B, P, d)
    loss     sum_k loss_k, loss_k = student k's own distillation loss on its B rows

loss_j does not depend on v_k for j != k, so d(loss)/d(v_k) = d(loss_k)/d(v_k): each vector
gets exactly the gradient it would get alone, and keeps its own optimizer, learning rate
and schedule. tests/test_vector_students.py checks that K students trained together end
where train_student takes each one alone.

Why: on a GPU a vector-student step of the 135M model is bound by kernel launches, not
arithmetic (about 60 steps a second on an H200), so K students in one step cost little
more than one. On a CPU the arithmetic grows with K and the gain is smaller.
`python bench/bench_train.py --together 8` prints both, side by side.
"""
import math
import time

import torch
from tqdm import tqdm

from optimizers import make_optimizer
from student import (Student, distillation_loss, learning_rate, loss_columns,
                     loss_targets, seeded_batches)

# what decides which rows a step reads and how they are scored: shared by all K students
SHARED = ("kind", "layer", "loss", "positions", "steps", "batch_size", "seed", "eval_every")


def together_logits(students, batch, loss):
    """(K, N, V) logits of K vector students at the batch's N loss positions, in one pass
    (V: the number tokens for kl_numbers, else the vocabulary). The batch must carry the
    cached residual after the students' block (plumbing/batches.py)."""
    first, m = students[0], students[0].model
    if batch.prefix is None or batch.prefix_blocks != first.frozen_blocks:
        raise ValueError("vector students together need batches with the cached residual "
                         f"after block {first.layer} (prepare_batches' prefix_blocks)")
    P, keep = loss_columns(batch)                                          # keep: (B, P)
    h = batch.prefix                                                       # (B, T, d)
    K, (B, T, d) = len(students), h.shape
    vectors = torch.stack([s.vector for s in students])                   # (K, d), fp32
    h = (h.float()[None] + vectors[:, None, None, :]).to(h.dtype)         # (K, B, T, d)
    mask = batch.mask.repeat(K, 1)                                        # (K*B, T)
    x = m.run_blocks(h.reshape(K * B, T, d), mask, first=first.frozen_blocks,
                     final_positions=P)                                   # (K*B, P, d)
    x = m.norm(x).view(K, B, P, d)[:, keep]                               # (K, N, d)
    head = m.lm_head.weight                                               # (vocab, d)
    if loss == "kl_numbers":
        head = head[batch.number_ids]                                     # (n_numbers, d)
    return x @ head.T                                                     # (K, N, V)


def train_together(base, batches, cfgs, track, progress=True):
    """Train the vector students cfgs (StudentConfig, kind "vector") side by side on the
    same prepared batches: [(student, history)] in cfgs' order, as train_student returns
    for each. They must agree on SHARED; optimizer, learning rate and schedule may differ."""
    first = cfgs[0]
    for cfg in cfgs:
        for key in SHARED:
            if getattr(cfg, key) != getattr(first, key):
                raise ValueError(f"students trained together must share their {key}: "
                                 f"{getattr(cfg, key)} is not {getattr(first, key)}")
        learning_rate(0, cfg.steps, cfg.lr, cfg.schedule)  # an unknown schedule fails here
    if first.kind != "vector":
        raise ValueError(f"only vector students train together, not {first.kind}")
    students = [Student.from_config(base, cfg) for cfg in cfgs]
    optimizers = [make_optimizer(cfg.opt, s.parameters(), cfg.lr)
                  for cfg, s in zip(cfgs, students, strict=True)]
    start = time.perf_counter()
    histories = [[{"step": 0, "loss": None, "seconds": 0.0, **track(s)}] for s in students]
    bar = tqdm(seeded_batches(batches, first.steps, first.seed), total=first.steps,
               desc=f"{len(cfgs)} vector students together", disable=not progress)
    for step, batch in bar:  # the batch order train_student uses
        logits = together_logits(students, batch, first.loss)             # (K, N, V)
        targets, teacher_logits, keep = loss_targets(base, batch, first.loss,
                                                     first.positions)
        if keep is not None:
            logits = logits[:, keep]                                       # (K, n, V)
        losses = torch.stack([distillation_loss(one, teacher_logits, targets, first.loss)
                              for one in logits])                         # (K,)
        for optimizer in optimizers:
            optimizer.zero_grad()
        losses.sum().backward()  # each vector's gradient is its own student's (above)
        for cfg, optimizer in zip(cfgs, optimizers, strict=True):
            optimizer.lr = learning_rate(step, cfg.steps, cfg.lr, cfg.schedule)
            optimizer.step()
        if (step + 1) % first.eval_every == 0 or step + 1 == first.steps:
            seconds = round(time.perf_counter() - start, 2)
            for cfg, s, history, loss in zip(cfgs, students, histories, losses.tolist(),
                                             strict=True):
                history.append({"step": step + 1, "loss": loss, "seconds": seconds,
                                **track(s)})
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the {cfg.opt} student's loss is {loss} at "
                                             f"step {step + 1}: lower --lr")
    return list(zip(students, histories, strict=True))
