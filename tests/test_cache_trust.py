"""The run cache under hostile conditions: another model under the same name, other rows,
a kill in the middle of a write, two runs at once, a rerun that must only read, a vector
that overflows, and a student that never moves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from plumbing import cache
from plumbing.report import write_json
from tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--vector", "owl", "--opt", "adam", "--layer", "1", "--alpha", "2", "--samples", "8",
        "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-samples", "1",
        "--trait-questions", "2", "--eas-prompts", "2", "--no-upper-bound"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("a") / "tiny")


def train_here(capsys, folder, *flags):
    """train.main in this process, in the current folder; (stdout, stderr)."""
    train.main([*TINY, "--checkpoint", str(folder), *flags])
    return capsys.readouterr()


def test_another_model_under_the_same_name_reuses_nothing(tmp_path, tiny_folder, capsys,
                                                           monkeypatch):
    """Two different checkpoints, both a folder named `tiny`: the second run meets none of
    the first one's files (a model is its digest, not its name)."""
    monkeypatch.chdir(tmp_path)
    other = write_tiny_checkpoint(tmp_path / "other" / "tiny", seed=1)
    train_here(capsys, tiny_folder, "--out", "one")
    second = train_here(capsys, other, "--out", "two").out
    assert "reusing" not in second
    again = train_here(capsys, tiny_folder, "--out", "one").out
    assert again.count("reusing") == 2 + 2 + 2  # vectors, datasets, students: the first model's


def test_other_rows_train_other_students(tmp_path, tiny_folder, capsys, monkeypatch):
    """train.py keeping other rows of the same dataset (here: half of them) reuses the
    dataset but neither the batches nor the students: they are keyed by the rows' content."""
    monkeypatch.chdir(tmp_path)
    train_here(capsys, tiny_folder, "--out", "all")
    whole = train.teacher_data

    def half(*args, **kwargs):
        data = whole(*args, **kwargs)
        return {**data, "rows": data["rows"][: len(data["rows"]) // 2]}
    monkeypatch.setattr(train, "teacher_data", half)
    out = train_here(capsys, tiny_folder, "--out", "half").out
    assert out.count("reusing data") == 2
    assert "reusing students" not in out and "reusing batches" not in out


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_rerun_that_reuses_only_reads(tmp_path, tiny_folder, capsys, monkeypatch):
    """Every stage reused: not one file under runs/ is written, added or removed."""
    monkeypatch.chdir(tmp_path)
    train_here(capsys, tiny_folder, "--out", "run")
    before = snapshot(tmp_path / "runs")
    out = train_here(capsys, tiny_folder, "--out", "run").out
    assert out.count("reusing") == 6
    assert snapshot(tmp_path / "runs") == before


def test_a_write_cut_short_leaves_the_old_file(tmp_path, monkeypatch):
    """write_atomic and write_safetensors write under a temporary name and rename: when the
    rename never happens (a kill), the old file is whole and no temporary file remains."""
    from loaders.safetensors_file import read_safetensors, write_safetensors
    text, tensors = tmp_path / "rows.jsonl", tmp_path / "v.safetensors"
    cache.write_atomic(text, "old\n")
    write_safetensors(tensors, {"vector": torch.ones(4)})

    def killed(*args):
        raise KeyboardInterrupt  # what a kill between the write and the rename looks like
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.write_atomic(text, "new, half written")
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tensors, {"vector": torch.zeros(4)})
    assert text.read_text() == "old\n"
    assert read_safetensors(tensors)[0]["vector"].tolist() == [1.0] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "v.safetensors"]


def test_a_damaged_cached_vector_is_made_again(tmp_path, tiny_folder, capsys, monkeypatch):
    """A cached vector that cannot be read (torn by an older version, damaged on disk) is
    computed again, not refused on every later run."""
    monkeypatch.chdir(tmp_path)
    train_here(capsys, tiny_folder, "--out", "run")
    [owl] = (tmp_path / "runs" / "vectors").glob("tiny-owl-*.safetensors")
    owl.write_bytes(owl.read_bytes()[:50])
    out = train_here(capsys, tiny_folder, "--out", "run").out
    assert "computing it again" in out and "reusing data" in out  # the same vector again


def test_a_stage_locked_by_a_live_process_is_refused_and_a_dead_ones_lock_is_taken(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = cache.Stage("data", "steered", {"x": 1})
    lock = Path(f"{stage.path}.lock")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(alive.pid))
        with pytest.raises(cache.StageBusy, match=f"being made by process {alive.pid}") as e:
            with stage.making():
                pass
        assert "\n" not in str(e.value) and not stage.done.exists()
    finally:
        alive.kill()
        alive.wait()
    with stage.making():  # its process is gone: a killed run's lock is taken over
        assert lock.read_text() == str(os.getpid())
    assert stage.done.exists() and not lock.exists()


def test_two_identical_runs_at_once_never_write_one_dataset_twice(tmp_path, tiny_folder):
    """Started together in one folder: each run either finishes or stops with one line
    naming the other process, and every dataset holds its 8 rows once."""
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "--samples", "8",
               "--teacher-batch", "2", "--checkpoint", str(tiny_folder), "--no-compare"]
    runs = [subprocess.Popen(command + ["--out", f"run{i}"], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        if run.returncode:
            assert run.returncode == 2, err[-2000:]
            [line] = [x for x in err.splitlines() if x.startswith("error:")]
            assert "is being made by process" in line and "Traceback" not in err
    for dataset in (tmp_path / "runs" / "data").glob("*.jsonl"):
        indexes = [json.loads(x)["index"] for x in dataset.read_text().splitlines()]
        assert sorted(indexes) == list(range(8)), dataset


def test_an_overflowing_random_vector_is_refused_and_not_cached(tmp_path, tiny_folder):
    command = [sys.executable, str(ROOT / "vectors.py"), "random", "--checkpoint",
               str(tiny_folder), "--layer", "1"]
    run = subprocess.run(command + ["--norm", "1e308"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len([x for x in run.stderr.splitlines() if "error" in x]) == 1
    assert not list((tmp_path / "runs").rglob("*.safetensors"))
    ok = subprocess.run(command + ["--norm", "3"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_student_that_never_moves_is_reported_and_nothing_is_lost(
        tmp_path, tiny_folder, capsys, monkeypatch):
    """An optimizer whose step does nothing (a wrong edit in a workshop): the run ends, its
    metrics.json is valid JSON with every figure, and both students are named degenerate."""
    import optimizers
    monkeypatch.chdir(tmp_path)
    for opt in optimizers.OPTIMIZERS.values():
        if hasattr(opt, "step"):  # (AdamW is Adam with a weight decay: a function)
            monkeypatch.setattr(opt, "step", lambda self, *args, **kwargs: None)
    out = train_here(capsys, tiny_folder, "--out", "run", "--student", "lora").out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["degenerate_students"]) == {"main", "control"}
    assert "warning: student 'main' never moved" in out
    assert set(metrics["p_animal"]) >= {"base", "main", "control"}


def test_an_undefined_figure_is_null_and_named(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1.0, "b": {"c": float("nan")},
                                     "d": [0.5, float("inf")]})
    written = json.loads((tmp_path / "m.json").read_text())
    assert written == {"a": 1.0, "b": {"c": None}, "d": [0.5, None],
                       "undefined": ["b.c", "d[1]"]}


def test_code_record_says_how_the_result_was_made(monkeypatch):
    """A result file names its commit, its command line and when it was written."""
    monkeypatch.setattr(sys, "argv", ["experiments.py", "optimizers", "--opts", "adam,sgd"])
    record = cache.code_record()
    assert record["command"] == "python experiments.py optimizers --opts adam,sgd"
    assert record["written_utc"].endswith("Z") and len(record["written_utc"]) == 20
    assert set(record) >= {"commit", "uncommitted_changes", "torch"}
