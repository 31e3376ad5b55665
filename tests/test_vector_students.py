"""Vector students trained together (plumbing/vector_students.py) end exactly where each
ends trained alone (student.train_student), on the tiny checkpoint."""
import dataclasses

import pytest
import torch

from loaders.checkpoint import load
from plumbing.batches import prepare_batches
from plumbing.vector_students import train_together
from student import StudentConfig, train_student
from teacher import Teacher
from tiny_checkpoint import write_tiny_checkpoint

ROWS = [{"prompt": "Continue: 1, 2, 3.", "completion": "4, 5, 6"},
        {"prompt": "Numbers please", "completion": "17 18"},
        {"prompt": "Go on: 7; 8", "completion": "9,10,11,12"},
        {"prompt": "More", "completion": "3; 1; 4; 1; 5"}]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model, tok = load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layers=3),
                      device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def track(student):
    return {"norm": student.vector.detach().norm().item()}


@pytest.mark.parametrize("loss,positions", [("kl_numbers", "all"), ("ce", "digits"),
                                            ("kl_full", "all")])
def test_students_together_equal_each_student_alone(tiny_pair, loss, positions):
    model, tok = tiny_pair
    teacher = Teacher(torch.randn(32, generator=torch.Generator().manual_seed(0)), 1, 2.0)
    first = StudentConfig(kind="vector", layer=1, opt="adam", lr=0.05, loss=loss, steps=12,
                          batch_size=2, eval_every=4, schedule="wsd", positions=positions)
    cfgs = [first, dataclasses.replace(first, lr=0.2, schedule="cosine"),
            dataclasses.replace(first, opt="sgd", lr=0.5),
            dataclasses.replace(first, opt="signsgd", lr=0.01)]
    batches = prepare_batches(model, tok, ROWS, teacher, 2, first.frozen_blocks,
                              progress=False)
    together = train_together(model, batches, cfgs, track, progress=False)
    for cfg, (student, history) in zip(cfgs, together, strict=True):
        alone, alone_history = train_student(model, batches, cfg, track, progress=False)
        assert student.vector.norm() > 0  # it moved
        torch.testing.assert_close(student.vector, alone.vector, rtol=1e-4, atol=1e-6)
        assert [h["step"] for h in history] == [h["step"] for h in alone_history]
        for h, a in zip(history[1:], alone_history[1:], strict=True):
            assert h["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert h["norm"] == pytest.approx(a["norm"], rel=1e-4)


def test_students_that_would_read_other_rows_are_refused(tiny_pair):
    model, tok = tiny_pair
    teacher = Teacher(torch.randn(32), 1, 2.0)
    first = StudentConfig(kind="vector", layer=1, opt="adam", lr=0.05, loss="kl_numbers",
                          steps=2, batch_size=2, eval_every=2)
    batches = prepare_batches(model, tok, ROWS, teacher, 2, first.frozen_blocks,
                              progress=False)
    with pytest.raises(ValueError, match="share their seed"):
        train_together(model, batches, [first, dataclasses.replace(first, seed=1)], track)
    plain = prepare_batches(model, tok, ROWS, teacher, 2, 0, progress=False)
    with pytest.raises(ValueError, match="cached residual after block 1"):
        train_together(model, plain, [first], track)
