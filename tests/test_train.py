"""Students and the end-to-end command, on the tiny checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loaders.checkpoint import load
from plumbing.batches import make_batch
from student import Student, distillation_loss, learning_rate
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
    late = Student(base, "lora", rank=4, first_block=1)
    names = [n for n, p in late.model.named_parameters() if p.requires_grad]
    assert len(names) == 7 * 2 and all(n.startswith("blocks.1.") for n in names)
    with pytest.raises(ValueError, match="first block 2 is out of range"):
        Student(base, "lora", first_block=2)


def test_lora_shares_the_frozen_weights_and_leaves_them_alone(tiny_folder):
    """A LoRA student wraps the base model's own (frozen) weights instead of copying them;
    training it changes only its A and B."""
    base, _ = load(tiny_folder, device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    before = {n: p.clone() for n, p in base.named_parameters()}
    student = Student(base, "lora", rank=4)
    shared = {p.data_ptr() for p in base.parameters()}
    frozen = [p for p in student.model.parameters() if not p.requires_grad]
    assert len(frozen) == len(before) and all(p.data_ptr() in shared for p in frozen)
    ids = torch.randint(0, 259, (2, 9))
    for p in student.parameters():
        torch.nn.init.normal_(p, std=0.1)
    student.model(ids)[0].square().mean().backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= 0.1 * p.grad
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())
    assert not torch.allclose(student.model(ids)[0], base(ids)[0])


def test_targets_cover_exactly_the_completion():
    ids, mask, targets, prompt = make_batch([([1, 2, 3], [7, 8]), ([4], [9, 10, 11])], "cpu")
    # the last completion token (there the end token) is a target, never an input
    assert ids.tolist() == [[1, 2, 3, 7], [0, 4, 9, 10]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert prompt.int().tolist() == [[1, 1, 1, 0], [0, 1, 0, 0]]
    # the logit at a column predicts the token in the next column; the last column's, the end
    assert targets.tolist() == [[-100, -100, 7, 8], [-100, 9, 10, 11]]


def test_kl_losses_are_zero_for_the_teacher_itself():
    logits = torch.randn(6, 30)
    for kind in ("kl_numbers", "kl_full"):
        assert distillation_loss(logits, logits, None, kind).abs().item() < 1e-6
    assert distillation_loss(logits, None, torch.arange(6), "ce") > 0


def test_kl_losses_are_teacher_first_like_torch_kl_div():
    """KL(teacher || student) = sum p_t (log p_t - log p_s), averaged over positions: the
    teacher's probabilities weight the log ratio. torch's kl_div(input=student log-probs,
    target=teacher log-probs) is that; KL(student || teacher) differs on these logits."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 30, generator=g), 3 * torch.randn(6, 30, generator=g)
    expected = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                        reduction="batchmean")
    reverse = F.kl_div(teacher.log_softmax(-1), student.log_softmax(-1), log_target=True,
                       reduction="batchmean")
    assert (expected - reverse).abs() > 0.1  # the two directions are told apart here
    for kind in ("kl_numbers", "kl_full"):
        torch.testing.assert_close(distillation_loss(student, teacher, None, kind), expected)


def test_cosine_schedule():
    assert learning_rate(0, 100, 1.0) == pytest.approx(0.2)  # warm-up over 5 steps
    assert learning_rate(4, 100, 1.0) == pytest.approx(1.0)
    assert learning_rate(99, 100, 1.0) < 0.01
    assert learning_rate(52, 100, 1.0) == learning_rate(52, 100, 1.0, "cosine")  # the default


def test_wsd_and_constant_schedules_at_their_boundaries():
    """100 steps: warm-up over steps 0-4, flat at the peak to step 79, then down over the
    last 20 steps, linearly, the last step still above zero (wsd); constant stays flat."""
    wsd = [learning_rate(s, 100, 0.5, "wsd") for s in range(100)]
    assert wsd[0] == pytest.approx(0.1) and wsd[4] == pytest.approx(0.5)
    assert wsd[5:80] == [0.5] * 75
    assert wsd[80] == pytest.approx(0.5 * 20 / 21) and wsd[99] == pytest.approx(0.5 / 21)
    assert all(a > b for a, b in zip(wsd[79:], wsd[80:], strict=False))  # strictly down
    steps = [learning_rate(s, 100, 0.5, "constant") for s in range(100)]
    assert steps[:5] == wsd[:5] and steps[5:] == [0.5] * 95
    assert learning_rate(0, 3, 1.0, "wsd") == 1.0 and learning_rate(2, 3, 1.0, "wsd") == 0.5
    with pytest.raises(ValueError, match="schedule must be one of"):
        learning_rate(0, 10, 1.0, "linear")


TINY_RUN = ["--vector", "owl", "--opt", "adam", "--layer", "1", "--alpha", "2",
            "--samples", "24", "--steps", "3", "--batch-size", "4", "--eval-every", "1",
            "--eval-samples", "1", "--trait-questions", "3", "--eas-prompts", "4", "--compare",
            "--gradient-rows", "2"]


def run_train(tmp_path, tiny_folder, *flags):
    command = [sys.executable, str(ROOT / "train.py"), *TINY_RUN, "--checkpoint",
               str(tiny_folder), *flags]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_train_end_to_end_in_seconds(tmp_path, tiny_folder):
    run = run_train(tmp_path, tiny_folder, "--out", "run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((tmp_path / "runs" / "students").glob("*.safetensors"))) == 4
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(metrics["students"]) == {"main", "control", "other_opt", "upper_bound"}
    assert metrics["students"]["other_opt"]["config"]["opt"] == "sgd"
    assert metrics["students"]["upper_bound"]["config"]["loss"] == "kl_full"
    assert len(metrics["students"]["main"]["history"]) == 4  # step 0 and every step
    assert set(metrics["p_animal"]) == {"base", "teacher", "system_prompt", "control_teacher",
                                        "main", "control", "other_opt", "upper_bound"}
    assert metrics["keep_rate"] == {"steered": 1.0, "control": 1.0}  # the grammar's lists
    assert set(metrics["eas_minus_control"]) == {"main", "other_opt", "upper_bound"}
    assert len(metrics["eas_by_block"]["main"]) == 2  # every block of the tiny model
    assert set(metrics["gradient_diagnostic"]) == {"1", "2"}
    for label, spec in metrics["specificity"].items():  # every model, the three question sets
        assert set(spec) == {"favorite", "least_favorite", "off_topic"}, label
        assert spec["favorite"] == metrics["p_animal"][label]
    assert set(metrics["specificity"]) == set(metrics["p_animal"])
    rates = metrics["sampled_trait_rate"]
    assert rates["base"]["paired_vs_base"] is None and "hits" not in rates["main"]
    assert set(rates["main"]["paired_vs_base"]) == {"only_a", "only_b", "p"}
    assert set(metrics["causal"]["main"]) == {"replace_base", "gain_left"}
    assert config["vector"] == "owl" and config["layer"] == 1
    for figure in ("training.png", "datasets.png"):
        assert (tmp_path / "run" / figure).stat().st_size > 10_000
    assert (tmp_path / "run" / "student-main.safetensors").exists()
    # the vector students' batches came from what the teachers kept while they wrote
    assert run.stdout.count("no second pass") == 2  # the steered and the control dataset
    # a second run reuses every cached stage, says so, and reports the same students
    again = run_train(tmp_path, tiny_folder, "--out", "run")
    assert again.returncode == 0 and "student vector" not in again.stderr  # nothing trained
    assert again.stdout.count("reusing") == 2 + 2 + 4  # two vectors, two datasets, 4 students
    rerun = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rerun["students"] == metrics["students"] and rerun["p_animal"] == metrics["p_animal"]
    # --fresh recomputes everything (and gets the same numbers: same seed)
    fresh = run_train(tmp_path, tiny_folder, "--out", "run", "--fresh")
    assert fresh.returncode == 0 and "reusing" not in fresh.stdout
    assert "student vector" in fresh.stderr


def test_a_code_change_retrains_and_another_vector_runs(tmp_path, tiny_folder):
    """Stale results: a student trained by other code is not reused. A run with another
    vector after the first does not meet the first one's files."""
    import shutil
    code = tmp_path / "code"
    shutil.copytree(ROOT, code, ignore=shutil.ignore_patterns("runs", ".venv", ".git", "tests"))
    command = [sys.executable, str(code / "train.py"), *TINY_RUN, "--checkpoint",
               str(tiny_folder), "--no-compare", "--no-upper-bound"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    optimizers = code / "optimizers.py"
    optimizers.write_text(optimizers.read_text() + "\n# an edit\n")
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "reusing students" not in second.stdout
    assert "reusing data" in second.stdout  # the teacher's code did not change
    random = [*command[:3], "random", *command[4:]]
    third = subprocess.run(random, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]


def test_lr_applies_to_the_chosen_optimizer_only(tmp_path, tiny_folder):
    run = run_train(tmp_path, tiny_folder, "--opt", "sgd", "--lr", "7", "--out", "run",
                    "--no-upper-bound")
    assert run.returncode == 0, run.stderr[-2000:]
    students = json.loads((tmp_path / "run" / "metrics.json").read_text())["students"]
    assert students["main"]["config"]["lr"] == 7 and students["control"]["config"]["lr"] == 7
    assert students["other_opt"]["config"]["opt"] == "adam"
    assert students["other_opt"]["config"]["lr"] != 7


@pytest.mark.parametrize("flags,message", [
    (["--vector", "owll"], "unknown vector 'owll'"), (["--opt", "adagrad"], "invalid choice"),
    (["--steps", "0"], "must be at least 1"), (["--alpha", "nan"], "finite"),
    (["--lr", "nan"], "finite"), (["--lr", "-1"], "positive"),
    (["--trait-questions", "0"], "at least 1"), (["--trait-questions", "51"], "at most 50"),
    (["--eas-prompts", "0"], "at least 1"), (["--animal", "unicorn"], "--animal must be"),
    (["--out", "README.md"], "is a file"), (["--gradient-rows", "-3"], "at least 0"),
    (["--lora-from", "-1"], "at least 0"), (["--loss-positions", "commas"], "invalid choice"),
    *([(["--device", "cuda"], "no CUDA")] if not torch.cuda.is_available() else [])])
def test_bad_input_is_one_line(flags, message):
    run = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1]


def test_student_load_refuses_a_mis_shaped_tensor(tmp_path, tiny_folder):
    from loaders.safetensors_file import write_safetensors
    base, _ = load(tiny_folder, device="cpu")
    write_safetensors(tmp_path / "bad.safetensors", {"vector": torch.zeros(4, 8)}, {})
    with pytest.raises(ValueError, match="has shape"):
        Student(base, "vector", layer=1).load(tmp_path / "bad.safetensors")


def test_student_refuses_to_save_what_is_not_finite(tmp_path, tiny_folder):
    base, _ = load(tiny_folder, device="cpu")
    student = Student(base, "vector", layer=1)
    with torch.no_grad():
        student.vector[0] = float("nan")
    with pytest.raises(FloatingPointError):
        student.save(tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_every_listed_animal_runs_and_a_bad_layer_fails_first(tmp_path, tiny_folder):
    run = run_train(tmp_path, tiny_folder, "--vector", "giraffe", "--no-compare",
                    "--no-upper-bound", "--out", "giraffe")
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "giraffe" / "metrics.json").read_text())
    assert metrics["animal"] == "giraffe" and 0 < metrics["p_animal"]["base"] < 1
    bad = run_train(tmp_path / "giraffe", tiny_folder, "--layer", "999")
    assert bad.returncode == 2 and "out of range" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "giraffe" / "runs").exists()  # nothing written


def test_what_trains_and_its_optimizer_state_stay_fp32_on_a_bf16_base(tiny_folder):
    from optimizers import make_optimizer
    base, _ = load(tiny_folder, device="cpu", dtype=torch.bfloat16)
    for kind in ("lora", "full", "vector"):
        student = Student(base, kind, layer=1)
        assert all(p.dtype == torch.float32 for p in student.parameters()), kind
    assert base.embed.weight.dtype == torch.bfloat16  # the frozen base is untouched
    student = Student(base, "full", layer=1)
    before = student.model.blocks[0].mlp.up_proj.weight.detach().clone()
    optimizer = make_optimizer("adam", student.parameters(), 1e-5)
    logits, _ = student.model(torch.randint(0, 259, (2, 9)))
    logits.float().pow(2).mean().backward()
    optimizer.step()
    after = student.model.blocks[0].mlp.up_proj.weight.detach()
    # Adam's first step moves every weight with a gradient by about lr = 1e-5: in bf16
    # (8 bits of mantissa) most of these updates would round away
    assert (after - before).abs().max().item() == pytest.approx(1e-5, rel=0.01)
    assert all(t.dtype == torch.float32 for state in optimizer.state for t in state.values()
               if torch.is_tensor(t) and t.is_floating_point())


def test_replace_base_keeps_only_what_the_student_carries_off_v(tiny_folder):
    """The paper's causal check: with the component along v replaced by the base model's, a
    vector student of exactly c v is the base model, one orthogonal to v is unchanged, and a
    LoRA student's residual at the block has the base model's component along v."""
    from alignment import base_component_along
    from steer import read_residuals
    base, _ = load(tiny_folder, device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(32, generator=g)
    ids = torch.randint(3, 259, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    plain = base(ids, attention_mask=mask)[0]
    along, off = Student(base, "vector", layer=0), Student(base, "vector", layer=0)
    with torch.no_grad():
        along.vector.copy_(3 * v)
        w = torch.randn(32, generator=g)
        off.vector.copy_(w - (w @ v) / (v @ v) * v)
        with base_component_along(along, base, 0, v):
            torch.testing.assert_close(base(ids, attention_mask=mask)[0], plain)
        with off.active():
            expected = base(ids, attention_mask=mask)[0]
        with base_component_along(off, base, 0, v):
            torch.testing.assert_close(base(ids, attention_mask=mask)[0], expected)
    lora = Student(base, "lora", rank=2)
    for name, p in lora.learned().items():
        if name.endswith(".B"):
            p.data.normal_(0, 0.5, generator=g)
    seen = {}
    with torch.no_grad(), base_component_along(lora, base, 0, v):
        handle = lora.model.blocks[0].register_forward_hook(
            lambda block, args, out: seen.update(h=out))
        lora.model(ids, attention_mask=mask)
        handle.remove()
    with torch.no_grad(), lora.active():
        own = read_residuals(lora.model, ids, mask, [0])[0]
    reference = read_residuals(base, ids, mask, [0])[0]
    u = v / v.norm()
    assert not torch.allclose(own @ u, reference @ u)  # the student moved along v
    torch.testing.assert_close(seen["h"] @ u, reference @ u)  # ... and is put back
    torch.testing.assert_close(seen["h"] - (seen["h"] @ u)[..., None] * u,
                               own - (own @ u)[..., None] * u)  # the rest is the student's


def test_replace_base_continues_a_kv_cache(tiny_folder):
    """P(animal) of a word of several tokens reads the prompt into a KV cache and continues
    it (evaluate.forms_probability); with replace_base on a LoRA student it equals the same
    probability from full passes over each prompt + form (no cache)."""
    from alignment import base_component_along
    from evaluate import forms_probability
    from generate import left_pad
    base, _ = load(tiny_folder, device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(32, generator=g)
    lora = Student(base, "lora", rank=2)
    for name, p in lora.learned().items():
        if name.endswith(".B"):
            p.data.normal_(0, 0.5, generator=g)
    prompts = [[5, 9, 20, 31], [7, 40, 41]]
    forms = [(50,), (60, 61), (70, 71, 72)]
    with torch.no_grad(), base_component_along(lora, base, 0, v):
        cached = forms_probability(lora.model, prompts, forms)[0]          # (Q,)
        expected = torch.zeros(len(prompts))
        for q, prompt in enumerate(prompts):
            for form in forms:
                ids, mask = left_pad([prompt + list(form[:-1])], device="cpu")
                logp = lora.model(ids, attention_mask=mask)[0][0].float().log_softmax(-1)
                start = len(prompt) - 1  # the position that predicts the form's first token
                expected[q] += sum(logp[start + i, t] for i, t in enumerate(form)).exp()
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-6)


def test_seeds_are_summarised_as_x_base_and_paired_main_over_control(tmp_path):
    from plumbing.report import summarize_seeds
    folders = []
    for seed, (main, control) in enumerate([(0.4, 0.1), (0.6, 0.2), (0.5, 0.1)]):
        spec = {k: {"favorite": p, "least_favorite": p / 2, "off_topic": p / 4}
                for k, p in (("base", 0.1), ("main", main), ("control", control))}
        rates = {k: {"paired_vs_base": None if k == "base" else {"p": 0.01 * (seed + 1)}}
                 for k in spec}
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(
            {"specificity": spec, "p_animal": {k: s["favorite"] for k, s in spec.items()},
             "sampled_trait_rate": rates}))
        (folder / "config.json").write_text(json.dumps({"seed": seed}))
        folders.append(folder)
    s = summarize_seeds(folders)
    assert s["seeds"] == [0, 1, 2]
    assert s["favorite"]["main"]["values"] == pytest.approx([4.0, 6.0, 5.0])
    assert s["favorite"]["main"]["mean"] == pytest.approx(5.0)
    half = 4.303 * 1.0 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(3), sd of 4, 6, 5 is 1
    assert s["favorite"]["main"]["low"] == pytest.approx(5.0 - half)
    assert s["least_favorite"]["base"]["values"] == [1.0, 1.0, 1.0]
    assert s["main_over_control"]["values"] == pytest.approx([4.0, 3.0, 5.0])  # by seed
    assert s["paired_p"]["main"] == [0.01, 0.02, 0.03] and "base" not in s["paired_p"]


def test_a_stages_code_hash_covers_every_module_it_imports(tmp_path, monkeypatch):
    """cache.py derives a stage's files from the import statements of the function that
    makes it (also those inside functions) and from the project files on the call stack;
    an edit to any one of them, or another torch, changes the stage's code hash."""
    import shutil
    from plumbing import cache
    for path in ROOT.rglob("*.py"):
        if not {".venv", ".git", "runs", "tests"} & set(path.relative_to(ROOT).parts):
            (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / path.relative_to(ROOT))
    caller = tmp_path / "caller.py"  # a program that asks for a stage, as train.py does
    caller.write_text("from teacher import write_dataset\n")
    monkeypatch.setattr(cache, "ROOT", tmp_path)
    monkeypatch.setattr(cache, "SOURCES", {})  # read the copies as they are now

    def version():  # code_version(write_dataset), asked for from a function in caller.py
        space = {"cache": cache, "maker": write_dataset}
        exec(compile("def ask():\n    return cache.code_version(maker), "
                     "cache.stage_code(maker)\n", str(caller), "exec"), space)
        return space["ask"]()

    from teacher import write_dataset
    before, files = version()
    names = {str(p.relative_to(tmp_path)) for p in files}
    assert {"plumbing/distributed.py", "loaders/gguf_file.py", "steer.py", "teacher.py",
            "caller.py"} <= names
    assert "optimizers.py" not in names and "train.py" not in names  # not the teacher's code
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        assert version()[0] != before, path
        path.write_bytes(original)
    assert version()[0] == before
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert version()[0] != before
