"""Past one GPU (distributed.py): torchrun with 2 processes on the CPU (gloo) writes the same
teacher dataset and reports the same students as a single process.

Run as a script, this file is what each process does in the dataset test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS, BATCH = 22, 3  # 8 batches, the last one short


def torchrun(*command, cwd=None):
    """`command` (a script and its arguments) in 2 processes, as torchrun starts them."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", *command], cwd)


def alone(*command, cwd=None):
    return run([sys.executable, *command], cwd)


def run(command, cwd):
    # one thread per process in both, so the float sums are the same
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def write_the_dataset(folder, checkpoint, interrupted):
    """What every process runs: a dataset of the tiny model's steered teacher, whole, or first
    interrupted (each rank stops after a few of its batches and rank 1 leaves half a row)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from plumbing import distributed
    from loaders.checkpoint import load
    from teacher import Teacher, shard_path, write_dataset
    distributed.init()
    model, tok = load(checkpoint, device="cpu")
    teacher = Teacher(torch.randn(32, generator=torch.Generator().manual_seed(0)), 1, 2.0)
    path = folder / "data.jsonl"
    if interrupted:  # rank 0 writes batches 0, 2 and 4, rank 1 only batch 1
        stop = 3 if distributed.is_main() else 1
        rows = write_dataset(path, model, tok, teacher, N_PROMPTS, batch_size=BATCH,
                             stop_after=stop)
        assert [r["index"] for r in rows] == list(range(9))  # batches 0-2; 4 waits in a shard
        if distributed.rank() == 1:
            with shard_path(path, 1).open("a") as f:
                f.write('{"index": 9, "prompt": "cut off mid-wri')
        distributed.barrier()
    write_dataset(path, model, tok, teacher, N_PROMPTS, batch_size=BATCH)
    distributed.finish()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_checkpoint import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_two_processes_write_the_single_process_dataset(tmp_path, tiny_folder):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    alone(__file__, str(tmp_path / "one"), str(tiny_folder), "whole")
    torchrun(__file__, str(tmp_path / "two"), str(tiny_folder), "interrupted")
    one, two = (tmp_path / "one" / "data.jsonl").read_text(), (tmp_path / "two" / "data.jsonl")
    assert len(one.splitlines()) == N_PROMPTS
    assert two.read_text() == one  # byte for byte
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["data.jsonl",
                                                                     "data.meta.json"]
    assert (tmp_path / "two" / "data.meta.json").read_text() == \
        (tmp_path / "one" / "data.meta.json").read_text()


FLAGS = ["--vector", "owl", "--opt", "adam", "--layer", "1", "--alpha", "2", "--samples", "24",
         "--teacher-batch", "8", "--steps", "3", "--batch-size", "4", "--eval-every", "1",
         "--eval-samples", "1", "--trait-questions", "3", "--eas-prompts", "4", "--compare",
         "--upper-bound-steps", "3", "--gradient-rows", "0", "--out", "run"]


def test_two_processes_train_the_single_process_students(tmp_path, tiny_folder):
    """The 4 students are shared out (main, other_opt: rank 0; control, upper_bound: rank 1),
    rank 0 evaluates: everything measured equals a single process's (fp32 on the CPU)."""
    command = [str(ROOT / "train.py"), *FLAGS, "--checkpoint", str(tiny_folder)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    alone(*command, cwd=tmp_path / "one")
    two = torchrun(*command, cwd=tmp_path / "two")
    metrics = [json.loads((tmp_path / run / "run" / "metrics.json").read_text())
               for run in ("one", "two")]
    for m in metrics:  # the seconds a run and each student's measurements took
        m.pop("seconds")
        for key in ("command", "written_utc"):  # how and when each process was started
            m["code"].pop(key)
        for s in m["students"].values():
            for h in s["history"]:
                h.pop("seconds")
    assert metrics[0]["students"] == metrics[1]["students"]
    assert metrics[0]["p_animal"] == metrics[1]["p_animal"]
    assert metrics[0] == metrics[1]
    assert set(metrics[1]["students"]) == {"main", "control", "other_opt", "upper_bound"}
    for data in ("one", "two"):  # the datasets, byte for byte
        assert len(list((tmp_path / data / "runs" / "data").glob("*.jsonl"))) == 2
    for path in (tmp_path / "one" / "runs" / "data").glob("*.jsonl"):
        assert (tmp_path / "two" / "runs" / "data" / path.name).read_text() == path.read_text()
    assert two.stdout.count("trained by another rank") == 2  # control and upper_bound
    assert two.stdout.count("wrote run/config.json") == 1   # rank 0 alone writes


if __name__ == "__main__":  # one process of test_two_processes_write_the_single_process_dataset
    write_the_dataset(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "interrupted")
