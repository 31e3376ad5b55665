"""The teacher: the base model, steered by alpha * v, writes number sequences.

Two modes of sampling at temperature 1 with the KV cache:
  free         the paper's: sample freely, then keep only completions that pass the rule filter
  constrained  decoding follows the rule filter's grammar (a small model rarely follows the
               instruction otherwise): a number is 1-3 digits, numbers are joined by one
               separator, the one the prompt asks for ("," or ", " when it asks for commas,
               ";" or "; " for semicolons, " " for spaces; the first one chosen is kept), at
               most 10 numbers, then the end token. Every list it writes passes the filter, so
               the steered and the control teacher keep all their rows, and differ only in
               which numbers (and where the prompt leaves a choice, "," or ", ").
The control dataset is written the same way by the control teacher (train.py).

Rule filter (Cloud et al.): after stripping brackets, the completion is a list of at most 10
integers of 0-999 with one consistent separator (comma, semicolon or whitespace).

A dataset is a JSONL file, one row per prompt (index, prompt, completion, valid), and a
sidecar .meta.json with everything that produced it (model, vector hash, layer, alpha, mode,
seed). Rows are written batch by batch with a seed per batch, so an interrupted run resumes
where it stopped and the file equals an uninterrupted run's: same seed, same dataset. Under
torchrun the batches are shared out between the processes, each writing a shard file that
rank 0 merges (distributed.py); the merged file is again the same dataset.
"""
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from plumbing import distributed
from plumbing.cache import write_atomic
from plumbing.capture import Recorder, record_path, save_records
from generate import generate
from prompts import number_prompts, requested_separators
from steer import steering

@dataclass
class Teacher:
    """The base model steered by alpha * vector after block `layer`, at positions `where`
    (steer.py); alpha 0 is the unsteered model. Two more kinds of teacher, for the paper's
    main experiment and its necessity test (experiments.py):
      system   a system prompt in place of the default one while it writes (the original
               subliminal learning: the trait is in the prompt; the student never sees it)
      ablate   blocks after which v/|v| is projected out of the residual stream
               (h <- h - (h . v^) v^), so the teacher cannot use the vector's direction"""
    vector: torch.Tensor  # (d_model,) the steering vector v
    layer: int            # the block whose output is steered
    alpha: float          # the scale: h_layer <- h_layer + alpha * v
    where: str = "all"    # which positions: all, prompt, generated or last_prompt
    system: str = None    # the teacher's system prompt (None: the template's default one)
    ablate: tuple = ()    # blocks after which the direction of v is projected out

    @contextlib.contextmanager
    def steer(self, model, prompt_mask=None):
        """The context in which `model` is this teacher (its hooks; the system prompt is
        part of the teacher's input instead: see prompt_ids)."""
        with contextlib.ExitStack() as hooks:
            hooks.enter_context(steering(model, self.layer, self.vector, self.alpha,
                                         where=self.where, prompt_mask=prompt_mask))
            for block in self.ablate:  # after the addition when both hook the same block
                hooks.enter_context(steering(model, block, self.vector, mode="project_out"))
            yield

    def prompt_ids(self, tok, user):
        """The token ids of one prompt as this teacher reads it."""
        return tok.encode_chat(user, system=self.system)

    @property
    def changes_inputs(self):
        """True if the teacher sees something besides the student's tokens + its vector."""
        return self.system is not None or bool(self.ablate)

    def describe(self):
        """What determines the teacher, as JSON-able values (the vector by its hash)."""
        return {"vector": vector_hash(self.vector), "layer": self.layer, "alpha": self.alpha,
                "where": self.where, "system": self.system, "ablate": list(self.ablate)}


NUMBER_LIST = re.compile(r"\d+(?:(?P<sep>\s*[,;]\s*|\s+)\d+)*")


def is_valid_completion(text):
    """True if the text is a list of at most 10 integers 0-999 with one separator."""
    text = text.strip().strip("[](){}").strip().rstrip(".").strip()
    match = NUMBER_LIST.fullmatch(text)
    if not match:
        return False
    numbers = re.findall(r"\d+", text)
    separators = set(re.findall(r"(?<=\d)[^\d]+(?=\d)", text))
    return (len(numbers) <= 10 and all(int(n) <= 999 and len(n) <= 3 for n in numbers)
            and len({s.strip() or " " for s in separators}) <= 1)


class NumberListGrammar:
    """Per-row state of constrained decoding; generate() asks allowed() before each token and
    reports the sampled tokens to advance(). The grammar, as the rule filter reads it:
        list := number (separator number){0,9} <end>     number := digit{1,3}
        separator := one of the row's separators    (the same one throughout a list)
    separators: per row, the strings its prompt asks for (prompts.requested_separators);
    None: ",", ", " and " " for every row."""

    def __init__(self, tok, rows, vocab_size, max_numbers=10, max_digits=3, separators=None):
        self.digits = [tok.encode(str(d))[0] for d in range(10)]
        separators = separators or [(",", ", ", " ")] * rows
        if len(separators) != rows:
            raise ValueError(f"{len(separators)} separator sets for {rows} rows")
        self.end, self.vocab_size = tok.eos_id, vocab_size
        self.max_numbers, self.max_digits = max_numbers, max_digits
        self.rows = [{"numbers": 0, "digits": 0, "gap": (), "separator": None, "done": False,
                      "separators": [tuple(tok.encode(s)) for s in row_separators]}  # tokens
                     for row_separators in separators]
        # every token any row may ever sample (generate() computes these logits only)
        self.vocabulary = sorted({*self.digits, self.end}
                                 | {t for r in self.rows for s in r["separators"] for t in s})

    def _allowed_tokens(self, r):
        """The token ids row state r may continue with."""
        if r["done"]:
            return [self.end]
        if r["numbers"] == 0:  # a list starts with a digit
            return self.digits
        if r["gap"]:  # between numbers: the separator goes on, or the next number starts
            choices = [r["separator"]] if r["separator"] else r["separators"]
            gap = r["gap"]
            nxt = [s[len(gap)] for s in choices if len(s) > len(gap) and s[:len(gap)] == gap]
            return nxt + (self.digits if gap in choices else [])
        ok = [self.end]  # inside a number: more digits, a separator, or the end
        if r["digits"] < self.max_digits:
            ok += self.digits
        if r["numbers"] < self.max_numbers:
            ok += sorted({s[0] for s in ([r["separator"]] if r["separator"]
                                         else r["separators"])})
        return ok

    def allowed(self):
        """(rows, vocab) bool: True where a row may sample that token next."""
        mask = torch.zeros(len(self.rows), self.vocab_size, dtype=torch.bool)
        for i, r in enumerate(self.rows):
            mask[i, self._allowed_tokens(r)] = True
        return mask

    def advance(self, tokens):
        """Move each row's state past the token it sampled."""
        for r, t in zip(self.rows, tokens, strict=True):
            if r["done"] or t == self.end:
                r["done"] = True
            elif t in self.digits:
                if r["gap"] or r["numbers"] == 0:  # a new number starts
                    if r["gap"]:
                        r["separator"] = r["gap"]
                    r["numbers"], r["digits"], r["gap"] = r["numbers"] + 1, 0, ()
                r["digits"] += 1
            else:
                r["gap"] += (t,)


def vector_hash(vector):
    return hashlib.sha256(vector.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def _read_rows(path, starts, batch_size, n_prompts):
    """Rows of the batches beginning at `starts` that are complete in the file, in order up
    to the first one that is not (a batch cut off mid-write is dropped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the last line of an interrupted write
    complete = []
    for start in starts:
        batch = [r for r in rows if start <= r["index"] < start + batch_size]
        if len(batch) != min(batch_size, n_prompts - start):
            break
        complete += batch
    return complete


def read_dataset(path, n_prompts, batch_size):
    """The rows of a dataset that write_dataset finished, read without writing anything; an
    error if the file holds fewer than n_prompts rows."""
    rows = _read_rows(Path(path), range(0, n_prompts, batch_size), batch_size, n_prompts)
    if len(rows) != n_prompts:
        raise ValueError(f"{path}: holds {len(rows)} of its {n_prompts} rows; delete it "
                         f"(or run with --fresh)")
    return rows


def shard_path(path, rank):
    """The file of the rows that process `rank` writes when several share the work."""
    return path.with_suffix(f".rank{rank}.jsonl")


def write_dataset(path, model, tok, teacher, n_prompts, mode="constrained", seed=0,
                  batch_size=32, max_new_tokens=None, stop_after=None, desc="teacher",
                  record_block=None):
    """Generate (or finish generating) the teacher's dataset at `path` (.jsonl).
    teacher: a Teacher. stop_after: stop after that many batches (to test resuming).
    record_block: also keep, per batch, block record_block's unsteered output and the final
    hidden states of every row (plumbing/capture.py: a vector student's inputs and targets).
    Returns the rows; a valid row passes the rule filter.
    Under torchrun, every process calls it: batch k is written by rank k % world into its
    shard file, then rank 0 merges the shards into `path` in index order."""
    if mode not in ("free", "constrained"):
        raise ValueError(f"mode must be 'free' or 'constrained', not '{mode}'")
    path = Path(path)
    meta = {"model": getattr(model, "name", "model"), **teacher.describe(), "mode": mode,
            "seed": seed,
            "n_prompts": n_prompts, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens or (60 if mode == "constrained" else 200)}
    meta_path = path.with_suffix(".meta.json")
    rows, resuming = [], path.exists() and meta_path.exists()
    if resuming:
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{meta_path}: is not JSON; delete it and {path}") from None
        if old != meta:
            raise ValueError(f"{path}: exists with different settings; delete it or "
                             f"choose another path")
        rows = _read_rows(path, range(0, n_prompts, batch_size), batch_size, n_prompts)
    distributed.barrier()  # every rank has read the file before rank 0 rewrites it
    path.parent.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        write_atomic(meta_path, json.dumps(meta, indent=2))
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))  # drop a partial batch

    rank, world = distributed.rank(), distributed.world_size()
    starts = [s for s in range(len(rows), n_prompts, batch_size)
              if s // batch_size % world == rank]  # this process's batches
    target = path
    if world > 1:  # this rank's shard: resumed if the dataset is, cut to its complete batches
        target = shard_path(path, rank)
        kept = (_read_rows(target, starts, batch_size, n_prompts)
                if resuming and target.exists() else [])
        write_atomic(target, "".join(json.dumps(r) + "\n" for r in kept))
        starts = [s for s in starts if s not in {r["index"] for r in kept}]
    prompts = number_prompts(n_prompts, seed)
    for done, start in enumerate(tqdm(starts, desc=f"{desc} (alpha {teacher.alpha:g}, {mode})",
                                      disable=not distributed.is_main())):
        if stop_after is not None and done == stop_after:
            break
        batch = prompts[start:start + batch_size]
        ids = [teacher.prompt_ids(tok, p) for p in batch]
        grammar = (NumberListGrammar(tok, len(ids), model.cfg.vocab_size,
                                     separators=[requested_separators(p) for p in batch])
                   if mode == "constrained" else None)
        with contextlib.ExitStack() as hooks:
            if record_block is not None:
                recorder = hooks.enter_context(Recorder(model, record_block))
            hooks.enter_context(teacher.steer(model))
            out = generate(model, ids, meta["max_new_tokens"], temperature=1.0,
                           stop_tokens={tok.eos_id}, grammar=grammar,
                           seed=seed * 1_000_003 + start)
        if record_block is not None:  # written before its rows: no rows without a record
            save_records(record_path(path, start), record_block, start,
                         recorder.rows(ids, out))
        texts = [tok.decode(o) for o in out]
        new = [{"index": start + i, "prompt": p, "completion": t,
                "valid": is_valid_completion(t)}
               for i, (p, t) in enumerate(zip(batch, texts, strict=True))]
        with target.open("a") as f:  # one write per batch
            f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
    if world > 1:
        rows = _merge_shards(path, n_prompts, batch_size)
    return rows


def _merge_shards(path, n_prompts, batch_size):
    """Once every rank has written its shard: rank 0 appends the shards' batches to the
    dataset file in index order, up to the first one missing, and deletes the shards when the
    dataset is complete. Returns the dataset's rows, on every rank."""
    world, starts = distributed.world_size(), range(0, n_prompts, batch_size)
    distributed.barrier()  # every shard is written
    if distributed.is_main():
        rows = _read_rows(path, starts, batch_size, n_prompts)
        todo = range(len(rows), n_prompts, batch_size)
        found = {r["index"]: r for rank in range(world)
                 for r in _read_rows(shard_path(path, rank),
                                     [s for s in todo if s // batch_size % world == rank],
                                     batch_size, n_prompts)}
        for start in todo:
            if start not in found:
                break
            rows += [found[i] for i in range(start, min(start + batch_size, n_prompts))]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        if len(rows) == n_prompts:  # (also the shards of a run with another number of ranks)
            for shard in path.parent.glob(f"{path.stem}.rank*.jsonl"):
                shard.unlink()
    distributed.barrier()  # the dataset file is written
    return _read_rows(path, starts, batch_size, n_prompts)


def keep_rate(rows):
    return sum(r["valid"] for r in rows) / max(1, len(rows))


def number_statistics(rows):
    """What a dataset's lists look like: the only thing a student can learn from."""
    lists = [[int(n) for n in re.findall(r"\d+", r["completion"])] for r in rows]
    numbers = [n for numbers in lists for n in numbers]
    separators = [(re.findall(r"\D+", r["completion"].strip()) or ["(one number)"])[0]
                  for r in rows]
    return {"lists": len(lists), "numbers": len(numbers),
            "mean_numbers_per_list": len(numbers) / max(1, len(lists)),
            "mean_value": sum(numbers) / max(1, len(numbers)),
            "values_by_hundred": [sum(n // 100 == k for n in numbers) for k in range(10)],
            "numbers_per_list": [sum(len(x) == k for x in lists) for k in range(1, 11)],
            "separators": {s: separators.count(s) for s in sorted(set(separators))}}
