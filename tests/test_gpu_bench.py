"""bench/gpu.py: the sizing rule (pure functions), results.jsonl written item by item, and
the dry run end to end on the tiny checkpoint (the CI runs every item: .ci/run)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402
from gpu_plan import Item, est_seconds, fit, plan, share_of  # noqa: E402

RATES = {"step": 0.1, "startup": 10.0}


def item(name="x", steps=1000, weight=1.0, min_scale=0.1):
    return Item(name, weight, {"step": steps}, fixed_s=2.0, fixed_units={"startup": 1},
                min_scale=min_scale)


def test_the_estimate_is_fixed_overhead_plus_units_times_rate():
    x = item()
    assert est_seconds(x, RATES, 0.0) == pytest.approx(1.25 * 12.0)
    assert est_seconds(x, RATES, 1.0) == pytest.approx(1.25 * (12.0 + 100.0))


def test_an_item_that_fits_runs_whole():
    d = fit(item(), 500.0, RATES)
    assert (d.status, d.scale) == ("ok", 1.0) and d.est_s <= d.share_s


def test_an_item_that_would_overrun_is_shortened_to_fit():
    d = fit(item(), 80.0, RATES)
    assert d.status == "shortened" and 0.1 <= d.scale < 1.0
    assert d.est_s <= d.share_s == 80.0  # never planned past its share
    assert "needs" in d.reason


def test_an_item_that_cannot_fit_even_at_its_minimum_is_skipped_with_the_reason():
    d = fit(item(min_scale=0.5), 40.0, RATES)  # 0.5 of the recipe needs 1.25 * 62 s
    assert d.status == "skipped" and d.scale == 0.0
    assert "even at 50%" in d.reason and "40 s" in d.reason
    assert fit(item(), 10.0, RATES).status == "skipped"  # less than the fixed overhead
    fixed_only = Item("y", 1.0, {}, fixed_s=30.0, min_scale=1.0)  # nothing to shorten
    assert fit(fixed_only, 20.0, RATES).status == "skipped"
    assert fit(fixed_only, 40.0, RATES).status == "ok"


def test_shares_sum_to_at_most_the_budget_and_later_items_get_what_is_left():
    items = [item(str(i), weight=w) for i, w in enumerate([1, 3, 2, 4])]
    shares = [share_of(items, i, 600.0) for i in range(len(items))]
    assert shares[0] == pytest.approx(60.0)  # its weight's share of all the time left
    # as dealt out at the start: in proportion, and never more than the budget
    assert sum(w / 10 * 600 for w in [1, 3, 2, 4]) == pytest.approx(600.0)
    # item 0 overran: it took 200 s of its 60; the rest share exactly the 400 s that are left
    left, later = 400.0, []
    for i in range(1, 4):  # each takes its whole share
        later.append(share_of(items, i, left))
        left -= later[-1]
    assert later[0] == pytest.approx(400.0 * 3 / 9)
    assert sum(later) == pytest.approx(400.0) and left == pytest.approx(0.0)
    assert share_of(items, 1, -5.0) == 0.0  # past the budget: nothing, so it is skipped
    assert fit(items[1], share_of(items, 1, -5.0), RATES).status == "skipped"


def test_the_plan_never_spends_more_than_the_budget():
    items = [item(str(i), steps=s, weight=w)
             for i, (s, w) in enumerate([(100, 1), (3000, 1), (2000, 2), (300, 1)])]
    decisions = plan(items, 300.0, RATES)
    assert sum(d.est_s for d in decisions if d.status != "skipped") <= 300.0
    for d in decisions:
        assert d.status == "skipped" or d.est_s <= d.share_s
    assert [d.status for d in decisions][:2] == ["ok", "shortened"]


def test_results_are_written_item_by_item(tmp_path, monkeypatch):
    """The second item's command fails; the first item's line was on disk before it ran
    (the command checks), and both lines are kept."""
    out = tmp_path / "out"
    check = ("import json, sys; lines = open(sys.argv[1]).read().splitlines(); "
             "sys.exit(3 if len(lines) == 1 and json.loads(lines[0])['status'] == 'ok' else 4)")
    monkeypatch.setattr(gpu, "command", lambda *a, **k: [sys.executable, "-c", check,
                                                         str(out / "results.jsonl")])
    gpu.main(["--dry-run", "--out", str(out), "--items", "bench-vector-step,demo",
              "--budget-s", "300"])
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["bench-vector-step", "demo"]
    assert lines[0]["status"] == "ok" and "vector_steps_per_s_batch_4" in lines[0]["figures"]
    assert lines[0]["figures"]["together_speedup"] > 0  # 2 students together vs alone
    assert lines[1]["status"] == "failed" and lines[1]["returncode"] == 3
    assert "exit status 3" in lines[1]["reason"]


def test_the_dry_run_end_to_end(tmp_path):
    """A subset of the items (the CI runs them all): a bench, train.py, experiments.py."""
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out",
                        str(out), "--items", "bench-sampling-64,demo,claims-random"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["bench-sampling-64", "demo", "claims-random"]
    for x in lines:
        assert x["status"] == "ok", x
        assert {"share_s", "planned_s", "actual_s", "scale", "figures"} <= set(x)
    assert lines[0]["figures"]["transformers_tokens_per_s"] > 0
    assert "main" in lines[1]["figures"]["x_base"] and "train.py" in lines[1]["command"]
    assert (out / "items" / "demo" / "metrics.json").exists()
    assert (out / "items" / "claims-random" / "result.json").exists()
    plan_json = json.loads((out / "plan.json").read_text())
    assert [x["name"] for x in plan_json["items"]] == [x["name"] for x in lines]
    assert plan_json["rates_s"]["startup"] > 0
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and "git_commit" in env
    printed = r.stdout.splitlines()
    assert sum(line.startswith(("bench-", "demo", "claims-")) for line in printed) == 3


def test_the_lora_bench_compares_the_same_loss_and_the_together_bench_runs(tmp_path):
    """bench_train's LoRA step: ours and transformers compute the same loss on the same
    left-padded batch (every row's end token included); --together runs."""
    import torch
    from bench_train import lora_step_figures, together_seconds

    sys.path.insert(0, str(ROOT / "tests"))
    from loaders.checkpoint import load
    from tiny_checkpoint import write_tiny_checkpoint
    folder = write_tiny_checkpoint(tmp_path / "tiny", layers=3)
    model, tok = load(folder, device="cpu", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    figures = lora_step_figures(model, tok, folder, 4, repeats=1)
    assert figures["loss_ours"] == pytest.approx(figures["loss_transformers"], rel=1e-5)
    # the training path (loss columns only; transformers' logits_to_keep) gives the same loss
    assert figures["loss_ours_train"] == pytest.approx(figures["loss_transformers_train"],
                                                      rel=1e-5)
    assert figures["loss_ours_train"] == pytest.approx(figures["loss_ours"], rel=1e-5)
    assert together_seconds(model, tok, 4, 3, repeats=1) > 0
