"""The teacher's targets, kept while the teacher writes its lists.

A vector student trains on two things per row (batches.py): the unsteered residual after
block L at every position (what its vector is added to), and the steered teacher's final
hidden state at every position that predicts a completion token (its targets). Both were
computed while the teacher sampled the row: the prompt's in the prompt pass, each token's
when it was fed back to sample the next. A Recorder keeps them then, so that
batches.prepare_batches need not run the model over every row a second time (on 2 CPU cores
that second pass is about a minute per 256-row dataset).

    with Recorder(model, block=L) as rec, teacher.steer(model):
        out = generate(model, ids, ...)
    records = rec.rows(ids, out)       # per row: (ids, prefix, final), or None

A row gets a record only if it ended with the end token: only then did every position it
needs pass through the model. tests/test_batches.py checks that recorded batches equal the
prepared ones.
"""
import torch

from loaders.safetensors_file import read_safetensors, write_safetensors


class Recorder:
    """Forward hooks, while active, on block `block` (its output before any steering hook
    adds to it: the hook is put first) and on the final norm (its last position)."""

    def __init__(self, model, block):
        self.model, self.block = model, block
        self.residual, self.final = [], []   # one (B, T, d) and one (B, d) per forward pass

    def __enter__(self):
        def keep_residual(module, args, output):                           # (B, T, d)
            self.residual.append(output.detach().clone())

        def keep_final(module, args, output):                              # (B, T, d)
            self.final.append(output[:, -1].detach().clone())              # (B, d)

        self.handles = [
            self.model.blocks[self.block].register_forward_hook(keep_residual, prepend=True),
            self.model.norm.register_forward_hook(keep_final)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def rows(self, prompts, completions):
        """Per row of one generate() call (one sample per prompt): a record, or None if the
        row never ended (the passes it needed did not all run). A record is
            ids (p + n,): the prompt's p tokens, then the completion's n (without the end)
            prefix (p + n, d): block `block`'s unsteered output at those tokens
            final (n + 1, d): the final hidden states that sampled each completion token and
                then the end token (the student's targets)
        Pass 0 read the left-padded prompts (P columns); pass k >= 1 fed the token sampled
        at step k - 1, so a completion of n tokens that then ended needed passes 0..n."""
        P = self.residual[0].shape[1]
        assert self.residual[0].shape[0] == len(prompts), "one sample per prompt only"
        records = []
        for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            n = len(completion)
            if n + 1 > len(self.residual):  # it ran out of steps before its end token
                records.append(None)
                continue
            # the prompt's real columns are the last len(prompt) of the P (left padding)
            prefix = torch.cat([self.residual[0][b, P - len(prompt):]]            # (p, d)
                               + [self.residual[k][b] for k in range(1, n + 1)])  # (p + n, d)
            final = torch.stack([self.final[k][b] for k in range(n + 1)])        # (n + 1, d)
            records.append((torch.tensor(prompt + completion), prefix, final))
        return records


def record_path(dataset, start):
    """The file of the records of the generation batch that starts at row `start`."""
    return dataset.with_name(f"{dataset.stem}.record{start}.safetensors")


FIELDS = ("ids", "prefix", "final")


def save_records(path, block, first_index, records):
    """One batch's records: tensors '<row index>.ids', '.prefix' and '.final'."""
    tensors = {f"{first_index + i}.{name}": t.cpu() for i, record in enumerate(records)
               if record is not None for name, t in zip(FIELDS, record, strict=True)}
    write_safetensors(path, tensors, {"block": str(block)})


def load_records(dataset, rows, block, batch_size):
    """{row index: (ids, prefix, final)} for every row of `rows`, read from the record files
    beside `dataset` (teacher.write_dataset's, one per batch of batch_size); None if any row
    has none of that block (an older dataset, a row that never ended, an unreadable file):
    the caller then computes the batches the long way."""
    tensors = {}
    for start in sorted({r["index"] // batch_size * batch_size for r in rows}):
        try:
            found, meta = read_safetensors(record_path(dataset, start))
        except (OSError, ValueError):
            return None
        if meta.get("block") != str(block):
            return None
        tensors.update(found)
    if not all(f"{r['index']}.ids" in tensors for r in rows):
        return None
    return {r["index"]: tuple(tensors[f"{r['index']}.{name}"] for name in FIELDS)
            for r in rows}
