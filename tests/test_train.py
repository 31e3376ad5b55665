"""Students and the end-to-end command, on the tiny checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load
from student import Student, cosine_lr, distillation_loss, make_batch
from tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("kind", ["lora", "full", "vector"])
def test_a_new_student_equals_the_base_model(tiny_folder, kind):
    base, _ = load(tiny_folder, device="cpu")
    student = Student(base, kind, layer=1)
    ids = torch.randint(0, 259, (2, 9))
    with torch.no_grad(), student.active():
        torch.testing.assert_close(student.model(ids)[0], base(ids)[0])
    assert all(p.requires_grad for p in student.parameters())
    if kind == "vector":
        assert [p.shape for p in student.parameters()] == [(32,)]
    base_storage = {q.data_ptr() for q in base.parameters()}
    assert not any(p.data_ptr() in base_storage for p in student.parameters())  # a copy


def test_lora_trains_only_its_matrices(tiny_folder):
    base, _ = load(tiny_folder, device="cpu")
    student = Student(base, "lora", rank=4)
    names = [n for n, p in student.model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 7 * 2 and all(n.endswith((".A", ".B")) for n in names)


def test_targets_cover_exactly_the_completion():
    ids, mask, targets = make_batch([([1, 2, 3], [7, 8]), ([4], [9, 10, 11])], "cpu")
    assert ids.tolist() == [[1, 2, 3, 7, 8], [0, 4, 9, 10, 11]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    # the logit at a column predicts the token in the next column
    assert targets.tolist() == [[-100, -100, 7, 8, -100], [-100, 9, 10, 11, -100]]


def test_kl_losses_are_zero_for_the_teacher_itself():
    logits = torch.randn(2, 5, 30)
    targets = torch.tensor([[-100, -100, 3, 4, -100]] * 2)
    for kind in ("kl_numbers", "kl_full"):
        loss = distillation_loss(logits, logits, targets, kind, number_ids=[1, 3, 4])
        assert loss.abs().item() < 1e-6


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0) == pytest.approx(0.2)  # warm-up over 5 steps
    assert cosine_lr(4, 100, 1.0) == pytest.approx(1.0)
    assert cosine_lr(99, 100, 1.0) < 0.01


def test_train_end_to_end_in_seconds(tmp_path, tiny_folder):
    command = [sys.executable, str(ROOT / "train.py"), "--vector", "owl", "--opt", "adam",
               "--checkpoint", str(tiny_folder), "--layer", "1", "--alpha", "2",
               "--samples", "24", "--steps", "3", "--batch-size", "4", "--eval-every", "1",
               "--eval-samples", "1", "--trait-questions", "3", "--eas-prompts", "4",
               "--gradient-rows", "2", "--out", "run"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((tmp_path / "runs" / "students").glob("*.json"))) == 4
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(metrics["students"]) == {"main", "control", "other_opt", "upper_bound"}
    assert metrics["students"]["other_opt"]["config"]["opt"] == "sgd"
    assert metrics["students"]["upper_bound"]["config"]["loss"] == "kl_full"
    assert len(metrics["students"]["main"]["history"]) == 4  # step 0 and every step
    assert config["vector"] == "owl" and config["layer"] == 1
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "student-main.safetensors").exists()
    # a second run reuses every cached stage and reports the same students
    first = (tmp_path / "run" / "metrics.json").read_text()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "student vector" not in again.stderr  # nothing trained
    assert json.loads(first)["students"] == json.loads(
        (tmp_path / "run" / "metrics.json").read_text())["students"]


@pytest.mark.parametrize("flags,message", [(["--vector", "owll"], "unknown vector 'owll'"),
                                           (["--opt", "adagrad"], "invalid choice"),
                                           (["--steps", "0"], "must be at least 1")])
def test_bad_input_is_one_line(flags, message):
    run = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1]
