"""The teacher: the base model, steered by alpha * v, writes number sequences.

Two modes of sampling at temperature 1 with the KV cache:
  free         the paper's: sample freely, then keep only completions that pass the rule filter
  constrained  only digits, ',', ' ' and the end token can be sampled (a small model rarely
               follows the instruction otherwise), the list is cut after its 10th number
               (a small model seldom stops by itself), and the rule filter still applies
The control dataset is written the same way by the unsteered model (alpha 0).

Rule filter (Cloud et al.): after stripping brackets, the completion is a list of at most 10
integers of 0-999 with one consistent separator (comma, semicolon or whitespace).

A dataset is a JSONL file, one row per prompt (index, prompt, completion, valid), and a
sidecar .meta.json with everything that produced it (model, vector hash, layer, alpha, mode,
seed). Rows are written batch by batch with a seed per batch, so an interrupted run resumes
where it stopped and the file equals an uninterrupted run's: same seed, same dataset.
"""
import hashlib
import json
import re
from pathlib import Path

from tqdm import tqdm

from generate import generate
from prompts import number_prompts
from steer import steering

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


def first_numbers(text, limit=10):
    """The text up to the end of its `limit`-th number (all of it if it has fewer)."""
    ends = [m.end() for m in re.finditer(r"\d+", text)]
    return text[:ends[limit - 1]] if len(ends) > limit else text


def number_tokens(tok):
    """The tokens a number list can contain: the ten digits, ',', ' ' and the end token."""
    ids = {tok.encode(str(d))[0] for d in range(10)} | set(tok.encode(", ")) | {tok.eos_id}
    return sorted(ids)


def vector_hash(vector):
    return hashlib.sha256(vector.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def _read_rows(path, batch_size, n_prompts):
    """Rows of complete batches already in the file (a batch cut off mid-write is dropped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the last line of an interrupted write
    complete = []
    for start in range(0, n_prompts, batch_size):
        batch = [r for r in rows if start <= r["index"] < start + batch_size]
        if len(batch) != min(batch_size, n_prompts - start):
            break
        complete += batch
    return complete


def write_dataset(path, model, tok, vector, layer, alpha, n_prompts, mode="constrained",
                  seed=0, batch_size=32, where="all", max_new_tokens=None, stop_after=None):
    """Generate (or finish generating) the teacher's dataset at `path` (.jsonl). alpha 0 is
    the control teacher. stop_after: stop after that many batches (to test resuming).
    Returns the rows; a valid row passes the rule filter."""
    if mode not in ("free", "constrained"):
        raise ValueError(f"mode must be 'free' or 'constrained', not '{mode}'")
    path = Path(path)
    meta = {"model": getattr(model, "name", "model"), "vector": vector_hash(vector),
            "layer": layer, "alpha": alpha, "where": where, "mode": mode, "seed": seed,
            "n_prompts": n_prompts, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens or (60 if mode == "constrained" else 200)}
    meta_path = path.with_suffix(".meta.json")
    rows = []
    if path.exists() and meta_path.exists():
        if json.loads(meta_path.read_text()) != meta:
            raise ValueError(f"{path}: exists with different settings; delete it or "
                             f"choose another path")
        rows = _read_rows(path, batch_size, n_prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # drop any partial batch

    prompts = number_prompts(n_prompts, seed)
    allowed = number_tokens(tok) if mode == "constrained" else None
    starts = range(len(rows), n_prompts, batch_size)
    for done, start in enumerate(tqdm(starts, desc=f"teacher (alpha {alpha}, {mode})")):
        if stop_after is not None and done == stop_after:
            break
        batch = prompts[start:start + batch_size]
        ids = [tok.encode_chat(p) for p in batch]
        with steering(model, layer, vector, alpha, where=where):
            out = generate(model, ids, meta["max_new_tokens"], temperature=1.0,
                           stop_tokens={tok.eos_id}, allowed_tokens=allowed,
                           seed=seed * 1_000_003 + start)
        texts = [tok.decode(o) for o in out]
        if mode == "constrained":
            texts = [first_numbers(t) for t in texts]
        new = [{"index": start + i, "prompt": p, "completion": t,
                "valid": is_valid_completion(t)}
               for i, (p, t) in enumerate(zip(batch, texts, strict=True))]
        with path.open("a") as f:  # one write per batch
            f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
    return rows


def keep_rate(rows):
    return sum(r["valid"] for r in rows) / max(1, len(rows))
