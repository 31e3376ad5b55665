"""Past one GPU: the same run in several processes, with torch.distributed.

    torchrun --nproc-per-node 4 train.py --vector owl --opt adam --preset paper

torchrun starts N copies of train.py and gives each, in its environment, its RANK (0..N-1),
the WORLD_SIZE (N) and its LOCAL_RANK (which GPU of this machine is its own). Two stages are
split between them:
  the teacher's data  batch k of the prompts is written by rank k % N into its own shard file;
                      rank 0 then merges the shards in index order (teacher.write_dataset).
                      Every batch is sampled with a seed of its own, so the merged file is the
                      one a single process writes.
  the students        main, control, other_opt and upper_bound are dealt out in turn; each rank
                      trains and saves its own (cached by cache.py), then rank 0 loads the
                      others' and does the evaluation, the figures and the JSON alone.
What every rank needs (the steering vector) is made by rank 0 first, then read by the others
from the cache. The ranks wait for each other at barriers and send nothing else: the files
under runs/ are the messages (so: one machine, or a filesystem shared by all of them).
Without torchrun's variables, or with one process, this is a single process and
torch.distributed is not used at all.

The process group is gloo's, also on GPUs: it only ever holds barriers (no tensor is sent, so
NCCL would bring nothing), and a rank may wait at one for as long as another trains students,
longer than NCCL's watchdog allows by default.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

WAIT = datetime.timedelta(hours=24)  # the longest a rank waits at a barrier for the others


def init():
    """Join torchrun's process group if this process is one of several; a no-op otherwise.
    On a GPU machine, this rank's GPU (LOCAL_RANK) becomes its "cuda" device (more processes
    than GPUs share them)."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group("gloo", timeout=WAIT)


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    """Wait here until every rank has come here."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may write a cached file), then the others (which find
    it there)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def mine(items):
    """The items this rank works on: item i goes to rank i % world_size()."""
    return [item for i, item in enumerate(items) if i % world_size() == rank()]
