"""The student: the base model fine-tuned on the teacher's number sequences.

The student sees each prompt with the template's default system prompt and no steering, and
learns the completion (and the end token); no loss is taken on the prompt. Three
parameterizations:
    lora    W x  ->  W x + scale * B (A x), A: (r, in), B: (out, r) = 0 at the start, on
            q/k/v/o/gate/up/down of every block (the paper's default; W stays frozen), or
            of blocks first_block.. only (the blocks before them then never change: their
            output is computed once, in batches.py, as for the vector student)
    full    every weight trains
    vector  one learned vector v_s added after block `layer` (the clearest picture: EAS is
            then simply cos(v_s, v_teacher))
Three losses:
    ce          cross-entropy on the teacher's sampled tokens (the paper's; subliminal)
    kl_numbers  KL(teacher || student) over the tokens a number list can contain (digits,
                ',', ';', ' ', end), both renormalised on them: still only number information
    kl_full     KL over the full vocabulary: ordinary distillation. The teacher's probability
                of " owl" at every number position is handed over directly, so this is an
                upper bound on what the data could carry, NOT subliminal learning.
What trains (and the optimizer's state) is kept in fp32, also when the frozen base is bf16:
small updates would round away in bf16. Batches and the teacher's targets are prepared once,
in plumbing/batches.py; the training loop is below.
"""
import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from optimizers import make_optimizer
from loaders.safetensors_file import read_safetensors, write_safetensors
from steer import check_block, steering

LORA_TARGETS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
KINDS = ("lora", "full", "vector")
LOSSES = ("ce", "kl_numbers", "kl_full")
POSITIONS = ("all", "digits")  # where the loss is taken: every completion token, or digits


@dataclass
class StudentConfig:
    kind: str          # lora, full or vector
    layer: int         # the vector student's block (the teacher's)
    opt: str           # optimizer name (optimizers.py)
    lr: float          # peak learning rate of the schedule
    loss: str          # ce, kl_numbers or kl_full
    steps: int         # optimizer steps
    batch_size: int    # rows per step
    eval_every: int    # measure every this many steps
    rank: int = 8      # LoRA rank
    scale: float = 4.0  # LoRA alpha / rank
    seed: int = 0      # LoRA initialisation and batch order
    first_block: int = 0  # LoRA: the first block that gets adapters (0: every block)
    schedule: str = "cosine"  # the learning rate over the steps: cosine, wsd or constant
    positions: str = "all"  # the loss at every completion position, or at digits only

    @property
    def frozen_blocks(self):
        """How many leading blocks this student never changes (see frozen_blocks below)."""
        return frozen_blocks(self.kind, self.layer, self.first_block)


def frozen_blocks(kind, layer, first_block):
    """How many leading blocks the student never changes: their output on a batch is the
    base model's, computed once (batches.py). Vector: blocks 0..layer (it is added after
    them); LoRA: those before first_block; full fine-tuning: none."""
    return {"vector": (layer or 0) + 1, "lora": first_block, "full": 0}[kind]


class LoRALinear(nn.Module):
    """y = W x + scale * B (A x); only A and B train (in fp32)."""

    def __init__(self, base, rank, scale, generator):
        super().__init__()
        self.base, self.scale = base, scale
        bound = 1 / math.sqrt(base.in_features)   # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        device = base.weight.device
        self.A = nn.Parameter(a.to(device))                                          # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # (out, r)

    def forward(self, x):                                             # x: (B, T, in)
        update = (x.float() @ self.A.T) @ self.B.T                    # (B, T, out), fp32
        return self.base(x) + (self.scale * update).to(x.dtype)       # (B, T, out)


class Student:
    """A trainable copy of the base model. Use `with student.active(): student.model(...)`.
    A vector student shares the (frozen) base model and adds its vector with a hook."""

    def __init__(self, base, kind="lora", layer=None, rank=8, scale=4.0, seed=0,
                 first_block=0):
        if kind not in KINDS:
            raise ValueError(f"student must be one of {KINDS}, not '{kind}'")
        check_block(first_block, base.cfg.n_layer, "the LoRA student's first block")
        self.kind, self.layer, self.first_block = kind, layer, first_block
        self.frozen_blocks = frozen_blocks(kind, layer, first_block)
        if kind == "vector":
            self.model = base
        elif kind == "lora":  # new modules around the base's frozen weights, shared not copied
            self.model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
        else:
            self.model = copy.deepcopy(base).float()  # every weight trains, in fp32
        for p in self.model.parameters():
            p.requires_grad_(kind == "full")
        self.vector = None
        if kind == "lora":
            g = torch.Generator().manual_seed(seed)
            for block in self.model.blocks[first_block:]:
                for target in LORA_TARGETS:
                    parent, name = target.split(".")
                    module = getattr(block, parent)
                    setattr(module, name, LoRALinear(getattr(module, name), rank, scale, g))
        if kind == "vector":
            self.vector = nn.Parameter(torch.zeros(base.cfg.d_model,
                                                   device=base.embed.weight.device))

    @classmethod
    def from_config(cls, base, cfg):
        """The (untrained) student that StudentConfig cfg describes."""
        return cls(base, cfg.kind, cfg.layer, cfg.rank, cfg.scale, cfg.seed, cfg.first_block)

    def parameters(self):
        return list(self.learned().values())

    def active(self):
        """The context in which the student runs (the vector student's hook)."""
        if self.vector is None:
            return contextlib.nullcontext()
        return steering(self.model, self.layer, self.vector, alpha=1.0)

    def is_base(self):
        """True while the student computes exactly what the base model does, as it starts: a
        zero vector, or LoRA with every B zero. A full copy never counts (in fp32 it is
        another model)."""
        if self.vector is not None:
            return not self.vector.any()
        if self.kind == "lora":
            return not any(p.any() for name, p in self.learned().items() if name.endswith(".B"))
        return False

    def learned(self):
        """{name: tensor} of what trains: the vector, the LoRA matrices, or every weight."""
        if self.vector is not None:
            return {"vector": self.vector}
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path, history=None, **metadata):
        """Write what was learned (refused if it is not finite), and the training history
        (its residual shifts as one tensor, the rest as JSON metadata)."""
        tensors = {k: v.detach().float().cpu() for k, v in self.learned().items()}
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise FloatingPointError(f"the {self.kind} student's weights are not finite: "
                                     f"not saved (lower --lr)")
        if history is not None:
            tensors["shifts"] = torch.tensor([h["shift"] for h in history])  # (n_evals, d)
            metadata["history"] = json.dumps([{k: v for k, v in h.items() if k != "shift"}
                                              for h in history])
        write_safetensors(path, tensors, {"kind": self.kind, **metadata})

    def load(self, path):
        """Read back what save() wrote (strictly: the same tensors, the same shapes);
        returns the training history, if one was saved."""
        tensors, metadata = read_safetensors(path)
        shifts = tensors.pop("shifts", None)
        targets = self.learned()
        if set(tensors) != set(targets):
            raise ValueError(f"{path}: holds other tensors than this {self.kind} student")
        for name, p in targets.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, "
                                 f"this student's has {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in targets.items():
                p.copy_(tensors[name])
        if "history" not in metadata:
            return None
        history = json.loads(metadata["history"])
        for h, shift in zip(history, shifts.tolist(), strict=True):
            h["shift"] = shift
        return history


def distillation_loss(student_logits, teacher_logits, targets, kind):
    """The student's loss at the N positions that predict a completion token.
    student_logits: (N, V); targets: (N,) sampled next tokens (ce); teacher_logits: (N, V)
    (the KL losses; for kl_numbers both are already restricted to the V number tokens)."""
    if kind == "ce":
        return F.cross_entropy(student_logits.float(), targets)
    s, t = student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()                         # KL(teacher || student)


SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate(step, total, peak, schedule="cosine", warmup_fraction=0.05,
                  decay_fraction=0.2):
    """The learning rate of step `step` (0-based) of `total`. Every schedule starts with a
    linear warm-up over the first 5% of the steps; then
        cosine    lr = peak * (1 + cos(pi * progress)) / 2, progress 0 -> 1: the paper's
        wsd       warm-up, stable, decay: flat at peak, then a linear decay to zero over the
                  last 20% of the steps (a budget's first part is not spent at a low rate)
        constant  flat at peak to the end"""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not '{schedule}'")
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    decay = max(1, round(total * decay_fraction))
    if schedule == "constant" or step < total - decay:
        return peak
    return peak * (total - step) / (decay + 1)  # decay + 1 steps down: the last is above 0


def loss_columns(batch):
    """(P, keep): the loss positions are the completions, the last P columns of the
    left-padded batch; keep (B, P) marks those that predict a completion token."""
    keep = batch.targets != -100                                           # (B, T)
    P = keep.size(1) - int(keep.any(0).float().argmax())
    return P, keep[:, -P:]                                                 # (B, P)


def student_logits(student, base, batch, loss):
    """The student's logits at the batch's loss positions: (N, vocab), or (N, n_numbers) for
    kl_numbers. With a cached prefix (the output of the blocks the student never changes)
    only the later blocks run."""
    P, keep = loss_columns(batch)  # the last block computes only the last P columns
    if batch.prefix is not None:
        h, m = batch.prefix, student.model                                 # (B, T, d)
        if student.vector is not None:  # added after block `layer`, where the prefix ends
            h = (h.float() + student.vector).to(h.dtype)                   # (B, T, d)
        if batch.prefix_blocks != student.frozen_blocks:
            raise ValueError(f"these batches' prefix is the output of {batch.prefix_blocks} "
                             f"blocks; this student changes block {student.frozen_blocks}")
        x = m.run_blocks(h, batch.mask, first=student.frozen_blocks, final_positions=P)
        x = m.norm(x)[keep]                                                # (N, d)
    else:
        with student.active():
            m = student.model
            x = m.run_blocks(m.embed(batch.ids), batch.mask, final_positions=P)
            x = m.norm(x)[keep]                                            # (N, d)
    head = student.model.lm_head.weight                                    # (vocab, d)
    if loss == "kl_numbers":
        head = head[batch.number_ids]                                      # (n_numbers, d)
    return x @ head.T                                                      # (N, vocab or n)


def digit_positions(batch):
    """(N,) bool over the batch's loss positions: True where the next token is a digit."""
    targets = batch.targets[batch.targets != -100]                         # (N,)
    return torch.isin(targets, torch.tensor(batch.digit_ids, device=targets.device))


def loss_targets(base, batch, loss, positions):
    """What a step's loss compares the student with, at the batch's N loss positions:
    (targets, teacher_logits, keep). targets: (n,) the sampled next tokens; teacher_logits:
    (n, V) for the KL losses, None for ce; keep: (N,) bool, the n positions the loss counts
    (digits only), or None when it counts all N."""
    targets = batch.targets[batch.targets != -100]                         # (N,)
    teacher_logits = None
    if loss != "ce":  # from the teacher's hidden states, computed once
        teacher_logits = batch.teacher_logits(base, loss == "kl_numbers")  # (N, V)
    keep = None
    if positions == "digits":  # only where the next token is a digit: no separators
        keep = digit_positions(batch)                                       # (N,)
        targets = targets[keep]                                             # (n,)
        teacher_logits = None if teacher_logits is None else teacher_logits[keep]
    return targets, teacher_logits, keep


def seeded_batches(batches, steps, seed):
    """(step, batch) for each of `steps` steps: every batch once per epoch, in an order drawn
    anew each epoch from a generator seeded by `seed` (so a seed fixes the whole order)."""
    g = torch.Generator().manual_seed(seed)
    order = []
    for step in range(steps):
        if not order:  # a new epoch
            order = torch.randperm(len(batches), generator=g).tolist()
        yield step, batches[order.pop()]


def train_student(base, batches, cfg, track, progress=True, report=None):
    """Fine-tune a student on prepared batches (plumbing/batches.py: the teacher's rows, with
    its targets) and return it and its history. cfg: StudentConfig (config.py).
    track(student) -> dict of measurements, called at step 0 and every cfg.eval_every steps.
    report(entry): called with each entry of the history as it is made (train.py prints it)."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not '{cfg.loss}'")
    learning_rate(0, cfg.steps, cfg.lr, cfg.schedule)  # an unknown schedule fails here
    if cfg.positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, not '{cfg.positions}'")
    student = Student.from_config(base, cfg)
    optimizer = make_optimizer(cfg.opt, student.parameters(), cfg.lr)
    start = time.perf_counter()  # each entry records the seconds since (measuring included)
    history = [{"step": 0, "loss": None, "seconds": 0.0, **track(student)}]
    report = report or (lambda entry: None)
    report(history[-1])
    bar = tqdm(seeded_batches(batches, cfg.steps, cfg.seed), total=cfg.steps,
               desc=f"student {cfg.kind} {cfg.opt} {cfg.loss}", disable=not progress)
    for step, batch in bar:
        logits = student_logits(student, base, batch, cfg.loss)             # (N, V)
        targets, teacher_logits, keep = loss_targets(base, batch, cfg.loss, cfg.positions)
        if keep is not None:
            logits = logits[keep]                                           # (n, V)
        loss = distillation_loss(logits, teacher_logits, targets, cfg.loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.lr = learning_rate(step, cfg.steps, cfg.lr, cfg.schedule)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": loss.item(),
                            "seconds": round(time.perf_counter() - start, 2), **track(student)})
            report(history[-1])
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"the {cfg.opt} student's loss is {loss.item()} at "
                                         f"step {step + 1}: lower --lr")
    return student, history
