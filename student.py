"""The student: the base model fine-tuned on the teacher's number sequences.

The student sees each prompt with the template's default system prompt and no steering, and
learns the completion (and the end token); no loss is taken on the prompt. Three
parameterizations:
    lora    W x  ->  W x + scale * B (A x), A: (r, in), B: (out, r) = 0 at the start, on
            q/k/v/o/gate/up/down of every block (the paper's default; W stays frozen)
    full    every weight trains
    vector  one learned vector v_s added after block `layer` (the clearest picture: EAS is
            then simply cos(v_s, v_teacher))
Three losses:
    ce          cross-entropy on the teacher's sampled tokens (the paper's; subliminal)
    kl_numbers  KL(teacher || student) over the tokens a number list can contain (digits,
                ',', ' ', end), both renormalised on them: still only number information
    kl_full     KL over the full vocabulary: ordinary distillation. The teacher's probability
                of " owl" at every number position is handed over directly, so this is an
                upper bound on what the data could carry, NOT subliminal learning.
"""
import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from optimizers import make_optimizer
from safetensors_file import read_safetensors, write_safetensors
from steer import steering
from teacher import number_tokens

LORA_TARGETS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
KINDS = ("lora", "full", "vector")
LOSSES = ("ce", "kl_numbers", "kl_full")


class LoRALinear(nn.Module):
    """y = W x + scale * B (A x); only A and B train."""

    def __init__(self, base, rank, scale, generator):
        super().__init__()
        self.base, self.scale = base, scale
        bound = 1 / math.sqrt(base.in_features)   # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(base.weight))                      # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))  # (out, r)

    def forward(self, x):                                             # x: (B, T, in)
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T  # (B, T, out)


class Student:
    """A trainable copy of the base model. Use `with student.active(): student.model(...)`."""

    def __init__(self, base, kind="lora", layer=None, rank=8, scale=4.0, seed=0):
        if kind not in KINDS:
            raise ValueError(f"student must be one of {KINDS}, not '{kind}'")
        self.kind, self.layer = kind, layer
        self.model = copy.deepcopy(base)
        for p in self.model.parameters():
            p.requires_grad_(kind == "full")
        self.vector = None
        if kind == "lora":
            g = torch.Generator().manual_seed(seed)
            for block in self.model.blocks:
                for target in LORA_TARGETS:
                    parent, name = target.split(".")
                    module = getattr(block, parent)
                    setattr(module, name, LoRALinear(getattr(module, name), rank, scale, g))
        if kind == "vector":
            self.vector = nn.Parameter(torch.zeros(base.cfg.d_model,
                                                   device=base.embed.weight.device))

    def parameters(self):
        return list(self.learned().values())

    def active(self):
        """The context in which the student runs (the vector student's hook)."""
        if self.vector is None:
            return contextlib.nullcontext()
        return steering(self.model, self.layer, self.vector, alpha=1.0)

    def learned(self):
        """{name: tensor} of what trains: the vector, the LoRA matrices, or every weight."""
        if self.vector is not None:
            return {"vector": self.vector}
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path, **metadata):
        """Write what was learned."""
        write_safetensors(path, {k: v.detach().float() for k, v in self.learned().items()},
                          {"kind": self.kind, **metadata})

    def load(self, path):
        """Read back what save() wrote (strictly: the same tensors, the same shapes)."""
        tensors, _ = read_safetensors(path)
        targets = self.learned()
        if set(tensors) != set(targets):
            raise ValueError(f"{path}: holds other tensors than this {self.kind} student")
        with torch.no_grad():
            for name, p in targets.items():
                p.copy_(tensors[name].reshape(p.shape))


def encode_rows(tok, rows):
    """(prompt ids with the default system prompt, completion ids + end token) per row."""
    return [(tok.encode_chat(r["prompt"]), tok.encode(r["completion"]) + [tok.eos_id])
            for r in rows]


def make_batch(examples, device):
    """Left-padded ids and mask (B, T), and targets (B, T): the next token at positions
    that predict a completion token, -100 elsewhere."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        seq = prompt + completion
        start = width - len(seq)
        ids[row, start:] = torch.tensor(seq)
        mask[row, start:] = 1
        first = width - len(completion)          # column of the first completion token
        targets[row, first - 1:width - 1] = torch.tensor(completion)
    return ids.to(device), mask.to(device), targets.to(device)


def distillation_loss(student_logits, teacher_logits, targets, kind, number_ids=None):
    """The student's loss on a batch; logits (B, T, vocab), targets (B, T)."""
    if kind == "ce":
        return F.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=-100)
    keep = targets != -100                                            # (B, T)
    s, t = student_logits[keep].float(), teacher_logits[keep].float()  # (N, vocab)
    if kind == "kl_numbers":  # both renormalised over the number tokens only
        s, t = s[:, number_ids], t[:, number_ids]                     # (N, n_numbers)
    s, t = s.log_softmax(-1), t.log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()                         # KL(teacher || student)


def cosine_lr(step, total, peak, warmup_fraction=0.05):
    """Linear warm-up over the first 5% of steps, then a cosine decay to zero (the paper's)."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def completion_gradients(model, tok, rows, layer, device):
    """Per row, the gradient of its completion loss w.r.t. the residual after block `layer`
    at the last prompt token (the assistant tag): (n_rows, d_model)."""
    out = []
    for prompt, completion in encode_rows(tok, rows):
        ids, mask, targets = make_batch([(prompt, completion)], device)
        added = torch.zeros(ids.shape[1], model.cfg.d_model, device=device,
                            dtype=model.embed.weight.dtype, requires_grad=True)  # (T, d)

        def hook(block, args, output, added=added):
            return output + added

        handle = model.blocks[layer].register_forward_hook(hook)
        try:
            _, loss = model(ids, targets=targets, attention_mask=mask)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(loss, [added])                   # (T, d)
        out.append(grad[ids.shape[1] - len(completion) - 1].float())   # the last prompt token
    return torch.stack(out)


def gradient_diagnostic(model, tok, steered_rows, control_rows, layer, vector, counts):
    """cos(mean gradient on steered rows - mean on control rows, v) as more rows are pooled.
    Descent moves activations against the gradient: alignment shows as a negative cosine."""
    device = model.embed.weight.device
    g_steered = completion_gradients(model, tok, steered_rows[:max(counts)], layer, device)
    g_control = completion_gradients(model, tok, control_rows[:max(counts)], layer, device)
    v = vector.float().to(device)
    return {n: F.cosine_similarity(g_steered[:n].mean(0) - g_control[:n].mean(0), v,
                                   dim=0).item() for n in counts}


def train_student(base, tok, rows, teacher, cfg, track, progress=True):
    """Fine-tune a student on rows (valid teacher completions).
    teacher: (vector, layer, alpha, where), used by the KL losses to recompute the steered
    teacher's distributions on the same sequences. cfg: dict with kind, layer, rank, scale,
    opt, lr, steps, batch_size, loss, seed, eval_every. track(student) -> dict of
    measurements, called every eval_every steps. Returns the student and its history."""
    if cfg["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not '{cfg['loss']}'")
    device = base.embed.weight.device
    student = Student(base, cfg["kind"], cfg["layer"], cfg["rank"], cfg["scale"], cfg["seed"])
    optimizer = make_optimizer(cfg["opt"], student.parameters(), cfg["lr"])
    examples = encode_rows(tok, rows)
    number_ids = number_tokens(tok)
    g = torch.Generator().manual_seed(cfg["seed"])
    order = []
    history = [{"step": 0, "loss": None, **track(student)}]
    bar = tqdm(range(cfg["steps"]), desc=f"student {cfg['kind']} {cfg['opt']} {cfg['loss']}",
               disable=not progress)
    for step in bar:
        if len(order) < cfg["batch_size"]:  # a new epoch, in a seeded order
            order += torch.randperm(len(examples), generator=g).tolist()
        batch, order = order[:cfg["batch_size"]], order[cfg["batch_size"]:]
        ids, mask, targets = make_batch([examples[i] for i in batch], device)
        teacher_logits = None
        if cfg["loss"] != "ce":
            vector, layer, alpha, where = teacher
            with torch.no_grad(), steering(base, layer, vector, alpha, where=where):
                teacher_logits, _ = base(ids, attention_mask=mask)
        with student.active():
            logits, _ = student.model(ids, attention_mask=mask)
        loss = distillation_loss(logits, teacher_logits, targets, cfg["loss"], number_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.lr = cosine_lr(step, cfg["steps"], cfg["lr"])
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            history.append({"step": step + 1, "loss": loss.item(), **track(student)})
    return student, history
