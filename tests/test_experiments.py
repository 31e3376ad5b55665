"""The claims experiments (experiments.py), end to end on the tiny checkpoint, and the parts
they add: the prompted and the ablated teacher, the projection, the mechanism's steps."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumbing.batches import number_tokens, prepare_batches
from loaders.checkpoint import load
from claims.mechanism import equal_steps, top_share
from claims.steerability import spearman
from claims.lab import interval
from steer import read_residuals, steering
from teacher import Teacher
from test_batches import generation_time_logits
from tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": "Continue: 1, 2, 3.", "completion": "4, 5, 6"},
        {"prompt": "Numbers please", "completion": "17 18"},
        {"prompt": "Go on: 7; 8", "completion": "9,10,11,12"}]
TINY = ["--layer", "1", "--alpha", "2", "--samples", "8", "--steps", "2", "--batch-size", "4",
        "--eval-every", "2", "--trait-questions", "2", "--eas-prompts", "2", "--seeds", "2",
        "--animals", "2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_pair(tiny_folder):
    model, tok = load(tiny_folder, device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


@pytest.mark.parametrize("ablate", [(), (1,), (0, 1)])
@pytest.mark.parametrize("prefix_blocks", [0, 1, 2])  # none, LoRA on block 1.., vector
def test_prompted_teacher_trains_on_what_it_wrote(tiny_pair, ablate, prefix_blocks):
    """A teacher with its own system prompt (and v projected out) gives the student, who
    reads the rows with the default prompt, the logits the teacher had while writing them."""
    model, tok = tiny_pair
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    teacher = Teacher(v, 1, 0.0, system="You love owls. Owls are your favorite.", ablate=ablate)
    batches = prepare_batches(model, tok, ROWS, teacher, 4, prefix_blocks, progress=False)
    [batch] = batches                                  # three rows of different lengths
    order = sorted(ROWS, key=lambda r: len(tok.encode_chat(r["prompt"]))
                   + len(tok.encode(r["completion"])))
    expected = torch.cat([generation_time_logits(model, tok, r, teacher) for r in order])
    torch.testing.assert_close(batch.teacher_logits(model, False), expected, atol=1e-4,
                               rtol=1e-4)
    # the student's rows (the default system prompt), not the teacher's
    shortest = tok.encode_chat(order[0]["prompt"]) + tok.encode(order[0]["completion"])
    assert batch.ids[0][batch.mask[0].bool()].tolist() == shortest
    plain = Teacher(v, 1, 0.0)
    [other] = prepare_batches(model, tok, ROWS, plain, 4, prefix_blocks, progress=False)
    assert not torch.allclose(other.teacher_logits(model, True),
                              batch.teacher_logits(model, True), atol=1e-3)
    assert number_tokens(tok) == batch.number_ids


def test_projection_removes_exactly_the_component_along_v(tiny):
    """h <- h - (h . v^) v^ at the block: the component along v is gone, the rest is the
    unhooked residual's, to rounding."""
    v = torch.zeros(32)
    v[3], v[7] = 3.0, -4.0                              # |v| = 5, v^ = (0.6, -0.8) there
    ids = torch.randint(0, 100, (2, 6))
    h = read_residuals(tiny, ids, layers=[0])[0]                                # (B, T, d)
    with steering(tiny, 0, v, mode="project_out"):
        projected = read_residuals(tiny, ids, layers=[0])[0]
    v_hat = v / 5
    expected = h - (h @ v_hat)[..., None] * v_hat
    torch.testing.assert_close(projected, expected)
    assert (projected @ v_hat).abs().max() < 1e-5
    others = [i for i in range(32) if i not in (3, 7)]
    torch.testing.assert_close(projected[..., others], h[..., others])


def test_mechanism_steps_have_the_stated_sizes():
    g = torch.tensor([3.0, -0.001, 0.5, 0.0002, -40.0])
    sgd, sign = equal_steps(g, 1e-3)
    assert sgd.norm().item() == pytest.approx(1e-3 * 5 ** 0.5)
    assert sign.norm().item() == pytest.approx(1e-3 * 5 ** 0.5)
    assert torch.allclose(sign.abs(), torch.full((5,), 1e-3))       # every weight moves by lr
    assert torch.allclose(sgd / sgd.norm(), -g / g.norm())          # along -g
    assert (sign * g < 0).all()                                     # both descend
    assert top_share(torch.tensor([10.0] + [1.0] * 99), 0.01) == pytest.approx(100 / 199)


def test_labels_with_dots_get_their_own_files(tmp_path, monkeypatch):
    """A '.' in a stage label is not a suffix: 'adam lr 0.5' and 'adam lr 0.25' once shared
    one file, and the optimizers experiment reused one student for every learning rate."""
    from plumbing import cache
    monkeypatch.setattr(cache, "RUNS", tmp_path)
    a, b = cache.Stage("students", "adam lr 0.5", {}), cache.Stage("students", "adam lr 0.25", {})
    assert a.path.with_suffix(".safetensors") != b.path.with_suffix(".safetensors")
    assert a.done != b.done and "." not in a.path.name


def test_an_undefined_figure_does_not_cost_the_result(tmp_path):
    """A diverged run's NaN (or a ratio over a zero) is written as null and named, not a crash
    at the end of an experiment that took hours; numpy numbers are written as numbers."""
    import numpy as np
    import experiments
    args = experiments.parse_args(["optimizers", "--out", str(tmp_path)])
    experiments.write_result(args, {"over_adam": {"mean": float("nan"), "values": [1.5]},
                                    "p": np.float32(0.25)}, started=0.0)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["over_adam"] == {"mean": None, "values": [1.5]}
    assert result["undefined"] == ["over_adam.mean"] and result["p"] == 0.25


def test_statistics():
    assert interval([1.0])["low"] is None
    i = interval([1.0, 2.0, 3.0])
    assert i["mean"] == 2.0 and i["low"] == pytest.approx(2 - 4.303 / 3 ** 0.5)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_cpu_defaults_and_their_overrides():
    """necessity's CPU default is its own smaller budget (12 students); its flags, or prompt-
    teacher's budget given as flags, win; the paper preset takes train.py's settings."""
    from experiments import parse_args
    own = parse_args(["necessity"])
    assert (own.samples, own.steps, own.eval_every) == (96, 96, 32)
    shared = parse_args(["necessity", "--samples", "128", "--steps", "128"])
    teacher = parse_args(["prompt-teacher"])
    assert shared.samples == teacher.samples == 128 and shared.steps == 128
    assert teacher.steps is None  # train.py's cpu preset: 128 steps
    paper = parse_args(["necessity", "--preset", "paper"])
    assert paper.samples is None and paper.steps is None
    assert own.seeds == teacher.seeds == 3 and parse_args(["steerability"]).seeds == 1
    assert parse_args(["steerability", "--seeds", "2"]).seeds == 2
    assert parse_args(["steerability", "--preset", "paper"]).seeds == 3


def run(tmp_path, tiny_folder, name, *flags):
    command = [sys.executable, str(ROOT / "experiments.py"), name, *TINY, "--checkpoint",
               str(tiny_folder), *flags]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_every_experiment_runs_end_to_end(tmp_path, tiny_folder):
    """Each writes result.json and figure.png; layers runs what it reads first; a second run
    reuses every stage."""
    expected = {"prompt-teacher": "summary", "necessity": "inference_time",
                "random": "final", "mechanism": "activation_gradient_cosine",
                "layers": "by_block", "steerability": "spearman_rho"}
    for name, key in expected.items():
        result = run(tmp_path, tiny_folder, name)
        assert result.returncode == 0, result.stderr[-3000:]
        out = tmp_path / "runs" / "experiments" / name
        data = json.loads((out / "result.json").read_text())
        assert key in data and data["experiment"] == name and data["claim"]
        assert (out / "figure.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "runs/experiments/prompt-teacher/result.json").read_text())
    assert set(summary["summary"]) == {"prompt", "steered", "control"}
    assert len(summary["summary"]["prompt"]["p_animal"]["values"]) == 2      # two seeds
    optimizers = json.loads((tmp_path / "runs/experiments/optimizers/result.json").read_text())
    assert set(optimizers["chosen"]) == {"adam", "adamw", "rmsprop", "signsgd", "sgd", "sgdm"}
    assert len(optimizers["runs"]) == 18
    adam = [r["data_loss"] for r in optimizers["runs"].values() if r["opt"] == "adam"]
    assert len(set(adam)) == 3  # three learning rates, three students
    assert set(optimizers["seeds"]) == set(optimizers["chosen"])  # every optimizer's seeds
    steer = json.loads((tmp_path / "runs/experiments/steerability/result.json").read_text())
    assert len(steer["per_seed"]) == 2 and "spearman_rho_vs_control" in steer
    matrix = steer["cross_trait_over_base"]["mean_over_seeds"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    for animal in steer["animals"]:  # each student over its seed's control, paired
        ratios = [p["animals"][animal["animal"]]["student_p_animal"]
                  / p["animals"][animal["animal"]]["control_p_animal"] for p in steer["per_seed"]]
        assert animal["transfer_over_control"]["values"] == pytest.approx(ratios)
    nec = json.loads((tmp_path / "runs/experiments/necessity/result.json").read_text())
    for kind in ("ablate-L", "ablate-all", "control"):  # paired by seed
        assert nec["prompt_minus"][kind]["eas"]["values"] == pytest.approx(
            [p["prompt"]["eas"] - p[kind]["eas"] for p in nec["per_seed"]])
    mech = json.loads((tmp_path / "runs/experiments/mechanism/result.json").read_text())
    assert set(mech["top_1pct_share_of_g2_lora"]) == {"steered", "control"}
    null = mech["permutation_null"]
    assert null["band_95"][0] <= null["band_95"][1] and 0 < null["p"] <= 1
    assert 0 < null["projection"]["p"] <= 1
    again = run(tmp_path, tiny_folder, "necessity")
    assert again.returncode == 0 and "student vector" not in again.stderr  # all reused


def test_optimizers_with_lora_on_the_late_blocks(tmp_path, tiny_folder):
    """--student lora --lora-from layer: LoRA students on the teacher's block and after it
    (block 1 of the tiny model's two), trained from the cached output of block 0; --opts
    keeps two of the six optimizers; --match-factor 2 lets SGD take twice Adam's steps, and
    each optimizer is read where its loss over the dataset first reaches Adam's."""
    result = run(tmp_path, tiny_folder, "optimizers", "--student", "lora", "--lora-from",
                 "layer", "--opts", "sgd,adam", "--match-factor", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "runs/experiments/optimizers/result.json").read_text())
    assert {r["kind"] for r in data["runs"].values()} == {"lora"} and len(data["runs"]) == 6
    assert list(data["chosen"]) == ["adam", "sgd"] and set(data["seeds"]) == {"adam", "sgd"}
    assert len(data["seeds"]["sgd"]["eas"]["values"]) == 2
    over_adam = data["seeds"]["sgd"]["over_adam"]["values"]  # paired: the same seed's data
    assert over_adam == pytest.approx([v / a for v, a in zip(
        data["seeds"]["sgd"]["p_animal_over_base"]["values"],
        data["seeds"]["adam"]["p_animal_over_base"]["values"], strict=True)])
    assert "over_adam" not in data["seeds"]["adam"]
    assert all(r["eas_by_block"][0] == 0 for r in data["runs"].values())  # block 0 unchanged
    assert data["settings"]["lora_from"] == "layer"
    assert {r["opt"]: r["steps"] for r in data["runs"].values()} == {"adam": 2, "sgd": 4}
    for opt, chosen in data["chosen"].items():  # where it reached the target, or came closest
        at, curve = chosen["matched"], chosen["curve"]
        assert at in [{k: h[k] for k in at} for h in curve[1:]], opt
        reached = at["data_loss"] <= data["matched_loss_target"]
        assert chosen["stalled"] != reached and data["seeds"][opt]["step"] == at["step"]
        assert ("adam_at_its_loss" in chosen) == chosen["stalled"]  # Adam at a stalled loss


def test_the_matched_loss_rule_on_a_constructed_history():
    """The learning rate that reaches the target first wins, read at that step; when none
    reaches it the lowest loss is taken and marked stalled; a diverged run never counts."""
    from claims.optimizer_choice import choose_matched

    def run_of(*losses):
        return {"history": [{"step": 16 * i, "data_loss": x, "p_animal": i / 100}
                            for i, x in enumerate(losses)]}
    runs = {"slow": run_of(1.0, 0.5, 0.2, 0.1), "fast": run_of(1.0, 0.3, 0.12, 0.11),
            "diverged": run_of(1.0, float("nan"), float("nan"), float("nan"))}
    label, at, stalled = choose_matched(runs, 0.15)
    assert (label, at["step"], at["p_animal"], stalled) == ("fast", 32, 0.02, False)
    label, at, stalled = choose_matched(runs, 0.105)  # only "slow" gets there, at its end
    assert (label, at["step"], stalled) == ("slow", 48, False)
    label, at, stalled = choose_matched(runs, 0.01)   # nobody: the closest, stalled
    assert (label, at["data_loss"], at["step"], stalled) == ("slow", 0.1, 48, True)
    assert choose_matched({"diverged": runs["diverged"]}, 0.5) == (None, None, True)


def test_a_stalled_optimizer_meets_adam_at_its_own_loss():
    """Turned around: Adam is read at the first measurement that reaches the stalled
    optimizer's lowest loss (and nowhere if Adam never gets there)."""
    from claims.optimizer_choice import adam_at_loss
    adam = [{"step": 16 * i, "data_loss": x, "p_animal": i / 100, "eas": i / 10}
            for i, x in enumerate((1.0, 0.4, 0.05, 0.01))]
    assert adam_at_loss(adam, 0.3) == {"step": 32, "data_loss": 0.05, "p_animal": 0.02,
                                       "eas": 0.2}
    assert adam_at_loss(adam, 0.4)["step"] == 16
    assert adam_at_loss(adam, 0.001) is None


def test_prompt_teacher_with_every_teacher(tmp_path, tiny_folder):
    """--teachers: the steered teacher on the prompt's positions only and the trait-neutral
    control train students too; each student's P(owl) is divided by each control's, seed by
    seed (the ratios are recomputed here from the per-seed figures)."""
    result = run(tmp_path, tiny_folder, "prompt-teacher", "--teachers",
                 "neutral,steered-prompt,prompt,control")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "runs/experiments/prompt-teacher/result.json").read_text())
    assert list(data["summary"]) == ["prompt", "steered-prompt", "control", "neutral"]
    ratios = data["over_controls"]
    assert set(ratios) == {"prompt", "steered-prompt"}
    for kind in ratios:
        for control in ("control", "neutral"):
            expected = [s[kind]["p_animal"] / s[control]["p_animal"] for s in data["per_seed"]]
            assert ratios[kind][control]["values"] == pytest.approx(expected)
    teachers = data["teachers_p_animal"][0]
    assert teachers["steered-prompt"] != teachers["prompt"]
    assert data["settings"]["teachers"] == ["prompt", "steered-prompt", "control", "neutral"]


@pytest.mark.parametrize("flags,message", [
    (["prompt-teacher", "--teachers", "steered"], "prompt among them"),
    (["prompt-teacher", "--teachers", "prompt,owl"], "prompt among them"),
    (["nonsense"], "invalid choice"), (["random", "--seeds", "0"], "at least 1"),
    (["random", "--layer", "9"], "out of range"),
    (["optimizers", "--lora-from", "x"], "neither a block number nor 'layer'"),
    (["optimizers", "--opts", "sgd"], "Adam among them"),
    (["optimizers", "--opts", "adam,lion"], "Adam among them"),
    (["optimizers", "--student", "lora", "--lora-from", "5"], "out of range")])
def test_bad_input_is_one_line(tmp_path, tiny_folder, flags, message):
    command = [sys.executable, str(ROOT / "experiments.py"), *flags, "--checkpoint",
               str(tiny_folder)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_the_permutation_null_finds_a_planted_direction_and_only_that():
    """Rows whose gradients share a small component along v (steered) against rows that do
    not (control): the pooled cosine is far outside the label-permutation null, p at its
    smallest; without the component it is inside."""
    from claims.gradients import permutation_null
    g = torch.Generator().manual_seed(0)
    d, v = 16, torch.zeros(16)
    v[3] = 1.0
    noise = lambda n: torch.randn(n, d, generator=g)  # noqa: E731
    planted = permutation_null(noise(800) + 0.2 * v, noise(800), v, permutations=300)
    assert planted["observed"] > planted["band_95"][1] and planted["p"] == 1 / 301
    plain = permutation_null(noise(800), noise(800), v, permutations=300)
    assert plain["band_95"][0] < plain["observed"] < plain["band_95"][1] and plain["p"] > 0.05
    assert plain["rows"] == [800, 800]
    for statistic, along_v in ((plain, 0.0), (planted, 0.2)):  # the projection reads alike
        projection = statistic["projection"]
        assert (projection["p"] > 0.05) == (statistic["p"] > 0.05)
        assert projection["observed"] == pytest.approx(along_v, abs=0.15)


def test_a_small_component_along_v_shows_in_the_projection_not_the_cosine():
    """The steered rows differ from the control rows mostly along another direction u and
    a little along v: the cosine of the pooled difference with v (0.2 / sqrt(0.2^2 + 2^2),
    about 0.1) stays inside its permutation null however many rows are pooled, because the
    null of a direction does not narrow; the projection on v leaves its null, which narrows
    as 1 / sqrt(rows)."""
    from claims.gradients import permutation_null
    g = torch.Generator().manual_seed(1)
    d, v, u = 16, torch.zeros(16), torch.zeros(16)
    v[3], u[7] = 1.0, 1.0
    noise = lambda n: torch.randn(n, d, generator=g)  # noqa: E731
    bands = {}
    for rows in (400, 3200):
        result = permutation_null(noise(rows) + 0.2 * v + 2.0 * u, noise(rows), v,
                                  permutations=300)
        assert result["band_95"][0] < result["observed"] < result["band_95"][1]
        assert result["observed"] == pytest.approx(0.2 / (0.2 ** 2 + 2 ** 2) ** 0.5, abs=0.08)
        bands[rows] = (result["band_95"][1] - result["band_95"][0],
                       result["projection"]["band_95"][1] - result["projection"]["band_95"][0])
    assert bands[3200][0] == pytest.approx(bands[400][0], rel=0.3)  # the cosine's does not narrow
    assert bands[3200][1] == pytest.approx(bands[400][1] / 8 ** 0.5, rel=0.3)  # 1 / sqrt(rows)
    assert result["projection"]["p"] == 1 / 301  # at 3,200 rows: the component along v shows
    assert result["projection"]["observed"] == pytest.approx(0.2, abs=0.1)
    groups = result["per_group"]  # the steered rows carry it, each mean within its error
    assert groups["steered"]["mean"] == pytest.approx(0.2, abs=4 * groups["steered"]["se"])
    assert groups["control"]["mean"] == pytest.approx(0.0, abs=4 * groups["control"]["se"])
    assert groups["steered"]["se"] == pytest.approx(1 / 3200 ** 0.5, rel=0.1)
