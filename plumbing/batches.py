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


def digit_tokens(tok):
    """The ten digits' tokens (where --loss-positions digits takes the loss)."""
    return sorted(tok.encode(str(d))[0] for d in range(10))


def number_tokens(tok):
    """The tokens a number list can contain: the ten digits, ',', ';', ' ' and the end
    token."""
    ids = (set(digit_tokens(tok)) | set(tok.encode(", ")) | set(tok.encode(";"))
           | {tok.eos_id})
    return sorted(ids)


def encode_rows(tok, rows, teacher=None):
    """(prompt ids, completion ids + end token) per row: the prompt as the student reads it
    (the default system prompt), or as `teacher` read it (teacher.Teacher.prompt_ids)."""
    return [(teacher.prompt_ids(tok, r["prompt"]) if teacher else tok.encode_chat(r["prompt"]),
             tok.encode(r["completion"]) + [tok.eos_id]) for r in rows]


def make_batch(examples, device):
    """Left-padded ids and mask (B, T); targets (B, T): the next token at positions that
    predict a completion token, -100 elsewhere; prompt_mask (B, T): True at prompt tokens.
    examples: (prompt ids, completion ids) pairs, each completion ending with the end token,
    which is a target but never an input (no position after it predicts anything)."""
    width = max(len(p) + len(c) - 1 for p, c in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    prompt_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(examples):
        seq = prompt + completion[:-1]           # the inputs: all but the last target
        start = width - len(seq)
        ids[row, start:] = torch.tensor(seq)
        mask[row, start:] = 1
        prompt_mask[row, start:start + len(prompt)] = True
        # the last prompt token predicts the first completion token, ..., the last column
        # predicts the end token
        targets[row, width - len(completion):] = torch.tensor(completion)
    return ids.to(device), mask.to(device), targets.to(device), prompt_mask.to(device)


@dataclass
class Batch:
    ids: torch.Tensor          # (B, T) prompt + completion, left-padded
    mask: torch.Tensor         # (B, T) 1 at real tokens, 0 at padding
    targets: torch.Tensor      # (B, T) next completion token, -100 where no loss is taken
    prompt_mask: torch.Tensor  # (B, T) True at prompt tokens (what where="prompt" steers)
    number_ids: list           # the number tokens (kl_numbers' vocabulary)
    digit_ids: list            # the digits among them
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


def prepare_batches(base, tok, rows, teacher, batch_size, prefix_blocks=0, progress=True,
                    records=None):
    """The rows in batches of up to batch_size, grouped by length; each with the teacher's
    final hidden state at its loss positions, and (prefix_blocks > 0: the blocks a student
    never changes, student.frozen_blocks) the unsteered residual after that many blocks.
    A teacher with its own system prompt (or ablation) reads the rows as it did when it
    wrote them: its prompt, the same completion; a completion's positions are the last
    columns of both left-padded batches.
    records: {row index: (ids, prefix, final)}, kept while the teacher wrote the rows
    (capture.py, prefix after block prefix_blocks - 1): a batch whose rows all have one is
    assembled from them, with no forward pass."""
    device = base.embed.weight.device
    examples = list(zip(rows, encode_rows(tok, rows), encode_rows(tok, rows, teacher),
                        strict=True))  # (row, the student's view, the teacher's view)
    examples.sort(key=lambda e: len(e[1][0]) + len(e[1][1]))  # by the student's length
    numbers, digits = number_tokens(tok), digit_tokens(tok)
    batches = []
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher targets",
                      disable=not progress):
        chunk = examples[start:start + batch_size]
        batch = Batch(*make_batch([student for _, student, _ in chunk], device), numbers,
                      digits)
        kept = [records.get(row["index"]) for row, _, _ in chunk] if records else None
        if kept and assemble(batch, kept, prefix_blocks):
            batches.append(batch)
            continue
        if prefix_blocks:
            with torch.no_grad():  # blocks 0..prefix_blocks - 1, unsteered: (B, T, d)
                batch.prefix = base.run_blocks(base.embed(batch.ids), batch.mask,
                                               last=prefix_blocks)
                batch.prefix_blocks = prefix_blocks
        if teacher.changes_inputs:  # the teacher's own view of the same rows
            view = Batch(*make_batch([seen for _, _, seen in chunk], device), numbers,
                         digits)
            batch.teacher_final = view.teacher_hidden(base, teacher)[view.targets != -100]
        else:
            batch.teacher_final = batch.teacher_hidden(base, teacher)[batch.targets != -100]
        batches.append(batch)
    return batches


def assemble(batch, kept, prefix_blocks):
    """Fill the batch's prefix (B, T, d) and teacher_final (N, d) from its rows' records;
    False (nothing changed) if a row has none, or its record read other tokens than the
    batch (a completion whose text re-encodes differently)."""
    B, T = batch.ids.shape
    for row, record in enumerate(kept):
        real = batch.ids[row][batch.mask[row].bool()]     # the row's tokens, without padding
        if record is None or not torch.equal(record[0].to(real), real):
            return False
    d = kept[0][1].shape[-1]
    batch.prefix = torch.zeros(B, T, d, dtype=kept[0][1].dtype, device=batch.ids.device)
    for row, (ids, prefix, _) in enumerate(kept):
        batch.prefix[row, T - len(ids):] = prefix          # left padding: the last columns
    # the loss positions, row by row and left to right, are each row's last n + 1 columns
    batch.teacher_final = torch.cat([final for _, _, final in kept]).to(batch.ids.device)
    batch.prefix_blocks = prefix_blocks
    return True


TENSORS = [f.name for f in fields(Batch)
           if f.name not in ("number_ids", "digit_ids", "prefix_blocks")]


def save_batches(path, batches):
    """One safetensors file: tensor '<batch>.<field>' for every field that is set."""
    tensors = {f"{i}.{name}": getattr(b, name).cpu() for i, b in enumerate(batches)
               for name in TENSORS if getattr(b, name) is not None}
    write_safetensors(path, tensors, {"number_ids": ",".join(map(str, batches[0].number_ids)),
                                      "digit_ids": ",".join(map(str, batches[0].digit_ids)),
                                      "prefix_blocks": batches[0].prefix_blocks})


def load_batches(path, device):
    tensors, metadata = read_safetensors(path)
    numbers = [int(i) for i in metadata["number_ids"].split(",")]
    digits = [int(i) for i in metadata["digit_ids"].split(",")]
    count = 1 + max(int(name.split(".")[0]) for name in tensors)
    prefix_blocks = int(metadata.get("prefix_blocks", 0))
    return [Batch(**{name: tensors[f"{i}.{name}"].to(device) if f"{i}.{name}" in tensors
                     else None for name in TENSORS}, number_ids=numbers, digit_ids=digits,
                  prefix_blocks=prefix_blocks) for i in range(count)]
