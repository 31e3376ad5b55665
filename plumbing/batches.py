"""Training batches, prepared once, with what never changes computed once.

A student sees the same rows many times, and part of what it computes on them never changes:
  - the teacher's final hidden state at each completion position: its logits, over the
    number tokens (kl_numbers) or the whole vocabulary (kl_full), are one product with the
    output head away, instead of a teacher forward pass every step;
  - the output of the blocks the student never changes (student.frozen_blocks): for a vector
    added after block L, blocks 0..L; for LoRA on blocks L.. only, blocks 0..L-1. A step
    then runs only the later blocks (4 or 5 of SmolLM2's 30 at L = 25), and kl_numbers needs
    only the 14 number-token rows of the output head instead of all 49,152.
Rows are grouped by length, so a batch carries little padding. tests/test_batches.py checks
that the cached numbers equal those of a full forward pass.
"""
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

from loaders.safetensors_file import read_safetensors, write_safetensors
from steer import steered_positions


def number_tokens(tok):
    """The tokens a number list can contain: the ten digits, ',', ';', ' ' and the end
    token."""
    ids = ({tok.encode(str(d))[0] for d in range(10)} | set(tok.encode(", ")) | set(tok.encode(";"))
           | {tok.eos_id})
    return sorted(ids)


def encode_rows(tok, rows, teacher=None):
    """(prompt ids, completion ids + end token) per row: the prompt as the student reads it
    (the default system prompt), or as `teacher` read it (teacher.Teacher.prompt_ids)."""
    return [(teacher.prompt_ids(tok, r["prompt"]) if teacher else tok.encode_chat(r["prompt"]),
             tok.encode(r["completion"]) + [tok.eos_id]) for r in rows]


def make_batch(examples, device):
    """Left-padded ids and mask (B, T); targets (B, T): the next token at positions that
    predict a completion token, -100 elsewhere; prompt_mask (B, T): True at prompt tokens."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    prompt_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(examples):
        seq = prompt + completion
        start = width - len(seq)
        first = width - len(completion)          # column of the first completion token
        ids[row, start:] = torch.tensor(seq)
        mask[row, start:] = 1
        prompt_mask[row, start:first] = True
        targets[row, first - 1:width - 1] = torch.tensor(completion)
    return ids.to(device), mask.to(device), targets.to(device), prompt_mask.to(device)


@dataclass
class Batch:
    ids: torch.Tensor          # (B, T) prompt + completion, left-padded
    mask: torch.Tensor         # (B, T) 1 at real tokens, 0 at padding
    targets: torch.Tensor      # (B, T) next completion token, -100 where no loss is taken
    prompt_mask: torch.Tensor  # (B, T) True at prompt tokens (what where="prompt" steers)
    number_ids: list           # the number tokens (kl_numbers' vocabulary)
    prefix: torch.Tensor = None          # (B, T, d) unsteered residual after prefix_blocks
    prefix_blocks: int = 0               # how many blocks the prefix has run (0: no prefix)
    teacher_final: torch.Tensor = None   # (N, d) teacher's final hidden state, loss positions

    def teacher_logits(self, base, numbers_only):
        """(N, n_numbers) or (N, vocab): the teacher's logits at the loss positions."""
        head = base.lm_head.weight                                          # (vocab, d)
        head = head[self.number_ids] if numbers_only else head
        return (self.teacher_final @ head.T).float()

    def teacher_hidden(self, base, teacher):
        """(B, T, d): the steered teacher's final hidden states on this batch, with the
        steering applied at exactly the positions it had while the teacher wrote the rows."""
        with torch.no_grad():
            if self.prefix_blocks == teacher.layer + 1:  # start after the teacher's block
                chosen = steered_positions(teacher.where, False, self.prefix, self.prompt_mask)
                change = teacher.alpha * teacher.vector.to(self.prefix)             # (d,)
                h = self.prefix + (change if chosen is None else change * chosen)  # (B, T, d)
                return base.norm(base.run_blocks(h, self.mask, first=teacher.layer + 1))
            with teacher.steer(base, prompt_mask=self.prompt_mask):
                return base.norm(base.run_blocks(base.embed(self.ids), self.mask))


def prepare_batches(base, tok, rows, teacher, batch_size, prefix_blocks=0, progress=True):
    """The rows in batches of up to batch_size, grouped by length; each with the teacher's
    final hidden state at its loss positions, and (prefix_blocks > 0: the blocks a student
    never changes, student.frozen_blocks) the unsteered residual after that many blocks.
    A teacher with its own system prompt (or ablation) reads the rows as it did when it
    wrote them: its prompt, the same completion; a completion's positions are the last
    columns of both left-padded batches."""
    device = base.embed.weight.device
    pairs = zip(encode_rows(tok, rows), encode_rows(tok, rows, teacher), strict=True)
    pairs = sorted(pairs, key=lambda p: len(p[0][0]) + len(p[0][1]))  # by the student's length
    numbers = number_tokens(tok)
    batches = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="teacher targets",
                      disable=not progress):
        chunk = pairs[start:start + batch_size]
        batch = Batch(*make_batch([student for student, _ in chunk], device), numbers)
        if prefix_blocks:
            with torch.no_grad():  # blocks 0..prefix_blocks - 1, unsteered: (B, T, d)
                batch.prefix = base.run_blocks(base.embed(batch.ids), batch.mask,
                                               last=prefix_blocks)
                batch.prefix_blocks = prefix_blocks
        if teacher.changes_inputs:  # the teacher's own view of the same rows
            view = Batch(*make_batch([seen for _, seen in chunk], device), numbers)
            batch.teacher_final = view.teacher_hidden(base, teacher)[view.targets != -100]
        else:
            batch.teacher_final = batch.teacher_hidden(base, teacher)[batch.targets != -100]
        batches.append(batch)
    return batches


TENSORS = [f.name for f in fields(Batch) if f.name not in ("number_ids", "prefix_blocks")]


def save_batches(path, batches):
    """One safetensors file: tensor '<batch>.<field>' for every field that is set."""
    tensors = {f"{i}.{name}": getattr(b, name).cpu() for i, b in enumerate(batches)
               for name in TENSORS if getattr(b, name) is not None}
    write_safetensors(path, tensors, {"number_ids": ",".join(map(str, batches[0].number_ids)),
                                      "prefix_blocks": batches[0].prefix_blocks})


def load_batches(path, device):
    tensors, metadata = read_safetensors(path)
    numbers = [int(i) for i in metadata["number_ids"].split(",")]
    count = 1 + max(int(name.split(".")[0]) for name in tensors)
    prefix_blocks = int(metadata.get("prefix_blocks", 0))
    return [Batch(**{name: tensors[f"{i}.{name}"].to(device) if f"{i}.{name}" in tensors
                     else None for name in TENSORS}, number_ids=numbers,
                  prefix_blocks=prefix_blocks) for i in range(count)]
