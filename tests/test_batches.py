"""What is computed once equals what a full forward pass computes, for every position mode;
the control teacher gives its student something to learn; the alignment measures on
constructed students."""
import pytest
import torch

from plumbing.batches import (encode_rows, load_batches, make_batch, number_tokens, prepare_batches,
                     save_batches)
from loaders.checkpoint import load
from alignment import Measurer, difference_alignment
from model import KVCache
from steer import steering
from student import Student, StudentConfig, distillation_loss, student_logits, train_student
from teacher import Teacher
from tiny_checkpoint import write_tiny_checkpoint

ROWS = [{"prompt": "Continue: 1, 2, 3.", "completion": "4, 5, 6"},
        {"prompt": "Numbers please", "completion": "17 18"},
        {"prompt": "Go on: 7; 8", "completion": "9,10,11,12"}]
LAYER = 0


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model, tok = load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def teacher_for(where, alpha=3.0, seed=0):
    return Teacher(torch.randn(32, generator=torch.Generator().manual_seed(seed)), LAYER,
                   alpha, where)


def generation_time_logits(model, tok, row, teacher):
    """The teacher's logits for each completion token as generate() computes them: its own
    prompt (its system prompt) in one pass, then one token per pass with the KV cache, under
    its hooks."""
    prompt, completion = teacher.prompt_ids(tok, row["prompt"]), tok.encode(row["completion"])
    completion = completion + [tok.eos_id]
    cache = KVCache(model.cfg, 1, len(prompt) + len(completion), "cpu", torch.float32)
    out = []
    with torch.no_grad(), teacher.steer(model):
        logits, _ = model(torch.tensor([prompt]), cache=cache, last_only=True)
        out.append(logits[0, -1])
        for token in completion[:-1]:
            logits, _ = model(torch.tensor([[token]]), cache=cache, last_only=True)
            out.append(logits[0, -1])
    return torch.stack(out)                                        # (len(completion), vocab)


@pytest.mark.parametrize("where", ["all", "prompt", "generated", "last_prompt"])
@pytest.mark.parametrize("prefix_blocks", [0, LAYER + 1])
def test_training_teacher_equals_the_generating_teacher(tiny_pair, where, prefix_blocks):
    """The soft labels computed once (from a cached prefix or a full pass) are the logits the
    teacher had while it wrote each row: --where prompt distils the prompt-steered teacher."""
    model, tok = tiny_pair
    teacher = teacher_for(where)
    for row in ROWS:
        [batch] = prepare_batches(model, tok, [row], teacher, 4, prefix_blocks, progress=False)
        expected = generation_time_logits(model, tok, row, teacher)        # (N, vocab)
        numbers = number_tokens(tok)
        torch.testing.assert_close(batch.teacher_logits(model, True), expected[:, numbers],
                                   atol=1e-4, rtol=1e-4)
        full = batch.teacher_logits(model, False)
        torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-4)
    other = teacher_for("all" if where == "prompt" else "prompt")
    [batch] = prepare_batches(model, tok, ROWS[:1], other, 4, prefix_blocks, progress=False)
    assert not torch.allclose(batch.teacher_logits(model, True),
                              generation_time_logits(model, tok, ROWS[0], teacher)[:, numbers],
                              atol=1e-3)  # the position mode matters


def trained_looking(student):
    """The student with random (not initial) weights where it learns."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return student


@pytest.mark.parametrize("kind, first_block", [("vector", 0), ("lora", 1), ("lora", 0)])
def test_cached_prefix_student_equals_the_full_forward(tiny_pair, kind, first_block):
    """A vector student after block 0, or LoRA on block 1 only (block 0 stays as it is), gets
    the same logits from the cached prefix as from a full forward pass; LoRA on every block
    has nothing to cache."""
    model, tok = tiny_pair
    teacher = teacher_for("all")
    student = trained_looking(Student(model, kind, LAYER, rank=2, first_block=first_block))
    blocks = student.frozen_blocks
    assert blocks == (LAYER + 1 if kind == "vector" else first_block)
    cached = prepare_batches(model, tok, ROWS, teacher, 2, blocks, progress=False)
    plain = prepare_batches(model, tok, ROWS, teacher, 2, 0, progress=False)
    for a, b in zip(cached, plain, strict=True):
        assert (a.prefix is not None) == (blocks > 0) and b.prefix is None
        for loss in ("kl_numbers", "kl_full"):
            torch.testing.assert_close(student_logits(student, model, a, loss),
                                       student_logits(student, model, b, loss))
        torch.testing.assert_close(a.teacher_final, b.teacher_final)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("cached", [False, True])
def test_student_logits_equal_the_models_own(tiny_pair, layer, cached):
    """student_logits (whose last block computes only the completion columns) equal the
    model's logits under the student's hook at the positions that predict a completion
    token; a vector after the last block (layer 1) leaves no block to run on the prefix."""
    model, tok = tiny_pair
    student = trained_looking(Student(model, "vector", layer))
    blocks = student.frozen_blocks if cached else 0
    [batch] = prepare_batches(model, tok, ROWS, teacher_for("all"), 4, blocks, progress=False)
    with torch.no_grad(), student.active():
        logits, _ = model(batch.ids, attention_mask=batch.mask)           # (B, T, vocab)
    expected = logits[batch.targets != -100]                               # (N, vocab)
    torch.testing.assert_close(student_logits(student, model, batch, "kl_full"), expected)


def test_a_prefix_of_other_blocks_is_refused(tiny_pair):
    model, tok = tiny_pair
    [batch] = prepare_batches(model, tok, ROWS, teacher_for("all"), 4, 2, progress=False)
    student = Student(model, "vector", LAYER)  # expects the output of block 0 only
    with pytest.raises(ValueError, match="prefix is the output of 2 blocks"):
        student_logits(student, model, batch, "kl_numbers")


def test_batches_round_trip_through_a_file(tmp_path, tiny_pair):
    model, tok = tiny_pair
    batches = prepare_batches(model, tok, ROWS, teacher_for("all"), 2, 1, progress=False)
    save_batches(tmp_path / "b.safetensors", batches)
    again = load_batches(tmp_path / "b.safetensors", "cpu")
    assert len(again) == len(batches)
    for a, b in zip(batches, again, strict=True):
        assert a.number_ids == b.number_ids and a.prefix_blocks == b.prefix_blocks == 1
        assert a.digit_ids == b.digit_ids
        for name in ("ids", "mask", "targets", "prompt_mask", "prefix", "teacher_final"):
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_batches_group_rows_by_length(tiny_pair):
    model, tok = tiny_pair
    rows = [{"prompt": "x" * n, "completion": "1"} for n in (30, 1, 29, 2)]
    batches = prepare_batches(model, tok, rows, teacher_for("all"), 2, progress=False)
    assert [int(b.mask.sum()) for b in batches] == sorted(int(b.mask.sum()) for b in batches)
    assert all((b.mask == 0).sum() <= 2 for b in batches)  # little padding


def test_the_control_student_has_something_to_learn(tiny_pair):
    """Under a KL loss the unsteered teacher is the student's own starting point (zero
    gradient); the random-vector control teacher is not."""
    model, tok = tiny_pair
    for alpha, learns in ((0.0, False), (3.0, True)):
        [batch] = prepare_batches(model, tok, ROWS, teacher_for("all", alpha, seed=7), 4,
                                  LAYER + 1, progress=False)
        student = Student(model, "vector", LAYER)
        loss = distillation_loss(student_logits(student, model, batch, "kl_numbers"),
                                 batch.teacher_logits(model, True), None, "kl_numbers")
        loss.backward()
        assert (student.vector.grad.norm().item() > 1e-4) == learns


def test_a_vector_student_learns_its_teachers_vector(tiny_pair):
    model, tok = tiny_pair
    teacher = teacher_for("all", alpha=1.0)
    cfg = StudentConfig(kind="vector", layer=LAYER, opt="adam", lr=0.05, loss="kl_numbers",
                        steps=60, batch_size=3, eval_every=10)

    def track(student):
        return {"cos": torch.cosine_similarity(student.vector.detach(), teacher.vector,
                                               dim=0).item()}
    batches = prepare_batches(model, tok, ROWS, teacher, cfg.batch_size, cfg.frozen_blocks)
    student, history = train_student(model, batches, cfg, track, progress=False)
    assert history[-1]["cos"] > 0.3 and history[-1]["loss"] < history[1]["loss"] / 2


def test_the_digit_positions_loss_skips_separators_and_the_end(tiny_pair):
    """--loss-positions digits: the loss positions kept are exactly those whose next token is
    a digit (ROWS' completions have 14 digits), and a student trained there still learns
    its teacher's vector, another one than the all-positions student."""
    from student import digit_positions
    model, tok = tiny_pair
    teacher = teacher_for("all", alpha=1.0)
    [batch] = prepare_batches(model, tok, ROWS, teacher, 4, LAYER + 1, progress=False)
    keep = digit_positions(batch)
    targets = batch.targets[batch.targets != -100]
    assert int(keep.sum()) == sum(ch.isdigit() for r in ROWS for ch in r["completion"]) == 14
    assert tok.decode(targets[keep].tolist()).isdigit()
    assert not any(tok.decode([t]).isdigit() for t in targets[~keep].tolist())
    students = {}
    for positions in ("all", "digits"):
        cfg = StudentConfig(kind="vector", layer=LAYER, opt="adam", lr=0.05, loss="kl_numbers",
                            steps=60, batch_size=3, eval_every=10, positions=positions)
        batches = prepare_batches(model, tok, ROWS, teacher, 3, cfg.frozen_blocks,
                                  progress=False)
        students[positions], history = train_student(model, batches, cfg, lambda s: {},
                                                     progress=False)
        assert history[-1]["loss"] < history[1]["loss"]
        assert torch.cosine_similarity(students[positions].vector.detach(), teacher.vector,
                                       dim=0) > 0.3
    assert not torch.allclose(students["all"].vector, students["digits"].vector)
    with pytest.raises(ValueError, match="positions must be one of"):
        train_student(model, batches, StudentConfig(
            kind="vector", layer=LAYER, opt="adam", lr=0.05, loss="kl_numbers", steps=1,
            batch_size=3, eval_every=1, positions="commas"), lambda s: {}, progress=False)


@pytest.mark.parametrize("c", [0.5, 2.0, -1.0])
def test_alignment_measures_on_a_constructed_student(tiny_pair, c):
    """A student shifted by exactly c * v at the teacher's block: projection c / alpha,
    EAS 1 (or -1), and its shift minus a control's shift along v is along v."""
    model, tok = tiny_pair
    teacher = teacher_for("all", alpha=4.0)
    m = Measurer(model, tok, teacher, "owl", eas_prompts=3, trait_questions=2)
    student = Student(model, "vector", LAYER)
    with torch.no_grad():
        student.vector.copy_(c * teacher.vector)
    h = m.track(student)
    assert h["projection"] == pytest.approx(c / 4.0, rel=1e-4)
    assert h["eas"] == pytest.approx(1.0 if c > 0 else -1.0, abs=1e-5)
    assert h["shift_norm"] == pytest.approx(abs(c) * teacher.vector.norm().item(), rel=1e-4)
    drift = torch.randn(32)
    history = [{"step": 0, "shift": [0.0] * 32},
               {"step": 1, "shift": (drift + 3 * teacher.vector).tolist()}]
    control = [{"step": 0, "shift": [0.0] * 32}, {"step": 1, "shift": drift.tolist()}]
    assert difference_alignment(history, control, teacher.vector) == [[1, pytest.approx(1.0)]]


@pytest.mark.parametrize("kind", ["vector", "lora"])
def test_an_untrained_student_is_measured_as_the_base_model(tiny_pair, kind):
    """At step 0 a student computes exactly what the base model does (a zero vector, LoRA's
    B = 0): track() gives what running it gives, without running it; a trained one is run;
    the base model's P(animal) is measured once, and never under an active steering hook."""
    model, tok = tiny_pair
    teacher = teacher_for("all", alpha=4.0)
    m = Measurer(model, tok, teacher, "owl", eas_prompts=3, trait_questions=2)
    student = Student(model, kind, LAYER, rank=2)
    assert student.is_base()
    shift = m.shifts(student, [LAYER])[0]
    ran = {**m.alignment(shift), "p_animal": m.p_animal(student.model, student.active()),
           "shift": shift.tolist()}
    assert m.track(student) == ran
    trained = trained_looking(Student(model, kind, LAYER, rank=2))
    assert not trained.is_base()
    assert m.track(trained)["p_animal"] != ran["p_animal"]
    with steering(model, LAYER, teacher.vector, 4.0):
        assert m.p_animal(model) != m.base_p_animal


def test_make_batch_marks_the_prompt():
    _, _, targets, prompt = make_batch([([1, 2], [3, 4])], "cpu")
    assert prompt.tolist() == [[True, True, False]]
    assert targets.tolist() == [[-100, 3, 4]]


def test_completion_gradient_is_the_gradient_along_the_last_prompt_token(tiny_pair):
    """The same number by another road: the gradient with respect to a vector added by the
    steering hook at the last prompt token only."""
    from claims.gradients import completion_gradients, gradient_diagnostic
    from steer import steering
    model, tok = tiny_pair
    grads = completion_gradients(model, tok, ROWS, LAYER)                 # (3, d)
    for row, grad in zip(ROWS, grads, strict=True):
        [(prompt, completion)] = encode_rows(tok, [row])
        ids, mask, targets, prompt_mask = make_batch([(prompt, completion)], "cpu")
        u = torch.zeros(32, requires_grad=True)
        with steering(model, LAYER, u, where="last_prompt", prompt_mask=prompt_mask):
            _, loss = model(ids, targets=targets, attention_mask=mask)
        torch.testing.assert_close(grad, torch.autograd.grad(loss, [u])[0])
    v = torch.randn(32)
    result = gradient_diagnostic(model, tok, ROWS, ROWS[::-1], LAYER, v, [1, 2])
    expected = torch.cosine_similarity(grads[:2].mean(0) - grads[[2, 1]].mean(0), v, dim=0)
    assert set(result) == {1, 2} and result[2] == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("where", ["all", "prompt"])
def test_batches_from_the_teachers_records_equal_the_prepared_ones(tmp_path, tiny_pair, where):
    """What the teacher kept while it wrote its lists (plumbing/capture.py) gives the same
    batches as the second pass over the rows, with no forward pass; a row without a record,
    or a record of other tokens, sends its batch the long way."""
    from plumbing.capture import load_records
    from teacher import write_dataset
    model, tok = tiny_pair
    teacher, path = teacher_for(where), tmp_path / "d.jsonl"
    rows = write_dataset(path, model, tok, teacher, 12, seed=3, batch_size=5,
                         record_block=LAYER)
    records = load_records(path, rows, LAYER, 5)
    assert records is not None and set(records) == set(range(12))
    plain = prepare_batches(model, tok, rows, teacher, 4, LAYER + 1, progress=False)
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        kept = prepare_batches(model, tok, rows, teacher, 4, LAYER + 1, progress=False,
                               records=records)
    finally:
        handle.remove()
    assert calls == []  # assembled from the records: the model never ran
    for a, b in zip(plain, kept, strict=True):
        assert torch.equal(a.ids, b.ids) and b.prefix_blocks == LAYER + 1
        real = a.mask.bool()                                                   # (B, T)
        torch.testing.assert_close(b.prefix[real], a.prefix[real], atol=1e-5, rtol=1e-5)
        assert not b.prefix[~real].any()  # padding: zeros, never read (masked keys)
        torch.testing.assert_close(b.teacher_final, a.teacher_final, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.teacher_logits(model, True), a.teacher_logits(model, True),
                                   atol=1e-4, rtol=1e-4)
    assert load_records(path, rows, LAYER + 1, 5) is None  # records of another block
    first = plain[0].ids[0]
    wrong = dict(records)
    index = next(i for i, (ids, _, _) in records.items()
                 if torch.equal(ids, first[plain[0].mask[0].bool()]))
    wrong[index] = (wrong[index][0] + 1, *wrong[index][1:])  # a record of other tokens
    [again] = prepare_batches(model, tok, rows, teacher, 4, LAYER + 1, progress=False,
                              records=wrong)[:1]
    torch.testing.assert_close(again.prefix, plain[0].prefix)  # computed: pads included
