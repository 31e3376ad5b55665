"""Every paper-scale figure in one short GPU run, sized to a wall-clock budget.

    python bench/gpu.py --out DIR [--budget-s 600]          # on a CUDA machine
    python bench/gpu.py --out DIR --dry-run                 # the same, tiny, on the CPU

What it runs, in this order, each item in its own share of the budget (bench/gpu_items.py):
  1. the benches, side by side in this process: sampling at batch 64 and 256 (our readable
     generate(), our compiled fixed-shape path, transformers' generate), a LoRA step (ours,
     transformers with the same LoRA modules, transformers + PEFT) and the vector-student
     step, alone and 8 students of one dataset in one pass (bench/bench_generate.py and
     bench/bench_train.py's functions);
  2. train.py's demo (--vector owl --opt adam) and its long budget (--preset long);
  3. train.py --preset paper at the largest share of the recipe that fits;
  4. the claims runs, experiments.py NAME --preset long, vector students first, then LoRA.
Items 2-4 are subprocesses, each with a timeout, so a stuck one cannot eat the rest.

First it calibrates: a few timed steps of the real model at each batch the items use give
the seconds per unit of work (bench/gpu_plan.py), and every item is run whole, shortened
or skipped with the reason before it starts: never started blind.

What it writes into DIR, each file the moment it exists (a run cut short keeps all so far):
  environment.json   torch, CUDA, device, git commit, package versions
  plan.json          the budget, the measured rates, each item's units and decision
  results.jsonl      one JSON object per item, in order: name, status (ok, shortened,
                     skipped, failed), share_s (its share), planned_s (the estimate),
                     actual_s, scale (the share of its recipe it ran), command, figures (the
                     key figures), peak_gpu_memory_gib, reason; plus log for commands
  items/NAME/        each command's own run folder (metrics.json, figures, result.json)
  logs/NAME.log      each command's output;  runs/  their cache (shared between items)
--dry-run runs every item on the tiny random checkpoint (tests/tiny_checkpoint.py) on the
CPU in seconds: the same code paths (the fixed-shape path uncompiled), the same files.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_items import ROOT, all_items, command, read_figures, run_command  # noqa: E402
from gpu_plan import fit, plan, scaled, share_of  # noqa: E402

RESERVE = 0.02  # of the budget, kept back for writing the last lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("What it runs"):])
    p.add_argument("--out", required=True, type=Path, help="the folder it writes into")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="wall-clock seconds for everything, calibration included")
    p.add_argument("--dry-run", action="store_true",
                   help="every item on the tiny random checkpoint, on the CPU, in seconds")
    p.add_argument("--items", help="only these items (comma-separated names)")
    p.add_argument("--device", help="default: cuda (the CPU for --dry-run)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: this command is for a GPU machine "
                "(--dry-run runs it tiny on the CPU)")
    return args


def environment(device):
    """What the figures were measured with."""
    def git(*a):  # read-only git queries
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    versions = {}
    for name in ("transformers", "peft", "accelerate", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "packages": versions}


def calibrate(model, tok, names, checkpoint, device, cwd):
    """{rate: seconds per unit} for every rate the items name (gpu_items' docstring)."""
    from bench_generate import QUESTIONS, timed
    from bench_train import number_batch, teacher_seconds, vector_step_seconds
    from alignment import Measurer
    from generate import generate
    from optimizers import Adam
    from student import Student
    from teacher import Teacher
    from vectors import default_layer, random_vector
    layer = default_layer(model.cfg.n_layer)
    rates = {}
    for name in sorted(names):
        kind, _, arg = name.partition("@")
        if kind == "startup":  # a fresh process that imports the project and loads the model
            code = (f"import torch, train; from loaders.checkpoint import load; "
                    f"load({str(checkpoint)!r}, device={str(device)!r})")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True,
                           env=os.environ | {"PYTHONPATH": str(ROOT)})
            rates[name] = time.perf_counter() - start
        elif kind in ("decode_step", "eval_row"):
            batch, tokens = (int(arg), 8) if arg else (256, 4)
            prompts = [tok.encode_chat(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
            generate(model, prompts, 2)  # warm-up
            t = timed(lambda p=prompts, n=tokens: generate(model, p, n, temperature=1.0), device)
            rates[name] = t / tokens if kind == "decode_step" else t / batch
        elif kind == "teacher_row":  # 12 of a list's up to 60 tokens, timed
            rates[name] = teacher_seconds(model, tok, int(arg), 12, 1) * 60 / 12 / int(arg)
        elif kind in ("vector_step", "late_lora_step"):
            rates[name] = vector_step_seconds(model, tok, int(arg), 3,
                                              kind.removesuffix("_step"))
        elif kind == "lora_step":  # LoRA on every block, cross-entropy, Adam
            ids, mask, targets, _ = number_batch(tok, int(arg), device)
            student = Student(model, "lora")
            opt = Adam(student.parameters(), lr=1e-4)

            def step(student=student, opt=opt, ids=ids, mask=mask, targets=targets):
                loss = student.model(ids, targets=targets, attention_mask=mask)[1]
                opt.zero_grad()
                loss.backward()
                opt.step()
            step()
            rates[name] = timed(step, device, 3)
        elif kind == "measure":  # one Measurer.track of a vector student that has moved
            questions, prompts = (int(x) for x in arg.split("x"))
            v = random_vector(model.cfg.d_model, 50.0).to(device)
            m = Measurer(model, tok, Teacher(v, layer, 4.0), "owl", prompts, questions)
            student = Student(model, "vector", layer=layer)
            student.vector.data += v / 100
            rates[name] = timed(lambda m=m, s=student: m.track(s), device)
        else:
            raise KeyError(f"no calibration for the rate '{name}'")
    return {k: round(v, 6) for k, v in rates.items()}


def run_bench(item, scale, ctx):
    """One bench item in this process: its figures."""
    from bench_generate import load_reference, sampling_figures
    from bench_train import lora_step_figures, together_seconds, vector_step_seconds
    s, model, tok = item.spec, ctx["model"], ctx["tok"]
    if item.name.startswith("bench-sampling"):
        if "ref" not in ctx:  # transformers' model of the same file, loaded once
            ctx["ref"] = load_reference(ctx["path"], model.embed.weight.dtype, ctx["device"])
        return sampling_figures(model, tok, ctx["ref"], s["batch"],
                                scaled(s["new_tokens"], scale, 8), s["repeats"],
                                compiled=True, compile=s["compile"])
    if item.name == "bench-lora-step":
        figures = {f"batch_{b}": lora_step_figures(model, tok, ctx["path"], b, s["repeats"],
                                                   s["peft"]) for b in s["batches"]}
        if not s["peft"]:
            figures["peft"] = "skipped: peft is not installed (pip install -r " \
                              "requirements-dev.txt)"
        return figures
    figures = {f"vector_steps_per_s_batch_{b}": round(1 / vector_step_seconds(
        model, tok, b, s["repeats"]), 1) for b in s["batches"]}
    b = s["batches"][-1]
    figures[f"late_lora_steps_per_s_batch_{b}"] = round(1 / vector_step_seconds(
        model, tok, b, s["repeats"], "late_lora"), 1)
    k = s["together"]  # k students of one dataset in one pass (plumbing/vector_students.py)
    alone = k / figures[f"vector_steps_per_s_batch_{b}"]
    together = together_seconds(model, tok, b, k, s["together_repeats"])
    figures |= {f"vector_students_{k}_alone_s_batch_{b}": round(alone, 4),
                f"vector_students_{k}_together_s_batch_{b}": round(together, 4),
                "together_speedup": round(alone / together, 2)}
    return figures


def run_item(item, decision, ctx, args, deadline):
    """Run one item at its decision's scale; the fields of its results.jsonl line."""
    record = {}
    cuda = ctx["device"].type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if item.kind == "bench":
        try:
            record["figures"] = run_bench(item, decision.scale, ctx)
            record["status"] = decision.status
        except Exception as e:  # a failed bench is recorded; the later items still run
            record |= {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        record["actual_s"] = round(time.perf_counter() - start, 1)
        if cuda:
            record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return record
    out, log = args.out / "items" / item.name, args.out / "logs" / f"{item.name}.log"
    argv = command(item, decision.scale, out, ctx["checkpoint"], args.device)
    # a stuck command is killed past its share (+20%), and never past the budget
    timeout = min(deadline - time.perf_counter(), 1.2 * decision.share_s)
    status, rc, seconds = run_command(argv, timeout, log, args.out)
    record |= {"command": " ".join(argv), "log": str(log), "returncode": rc,
               "actual_s": seconds, "timeout_s": round(timeout, 1)}
    if status != "ok":
        return record | {"status": "failed", "reason": "timed out" if rc is None else
                         f"exit status {rc} (see the log)"}
    try:
        record["figures"], record["peak_gpu_memory_gib"] = read_figures(item, out)
    except (OSError, ValueError) as e:
        return record | {"status": "failed", "reason": f"no figures: {e}"}
    return record | {"status": decision.status}


def write_line(path, record):
    """Append one JSON line and make sure it is on disk before going on."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s * (1 - RESERVE)
    args.out = args.out.resolve()
    for sub in ("items", "logs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    results.unlink(missing_ok=True)
    device = torch.device(args.device)
    (args.out / "environment.json").write_text(json.dumps(environment(device), indent=2))
    from loaders.checkpoint import embedded_path, load
    if args.dry_run:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_checkpoint import write_tiny_checkpoint
        path = write_tiny_checkpoint(args.out / "tiny-checkpoint")
    else:
        path = embedded_path()
    model, tok = load(path, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        import peft  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False
    items = all_items(args.dry_run, have_peft)
    if args.items:
        wanted = set(args.items.split(","))
        unknown = wanted - {i.name for i in items}
        if unknown:
            raise SystemExit(f"error: unknown items {', '.join(sorted(unknown))}")
        items = [i for i in items if i.name in wanted]
    names = {r for i in items for r in [*i.units, *i.fixed_units]}
    rates = calibrate(model, tok, names, path, device, args.out)
    calibration_s = round(time.perf_counter() - started, 1)
    decisions = plan(items, deadline - time.perf_counter(), rates)
    (args.out / "plan.json").write_text(json.dumps({
        "budget_s": args.budget_s, "calibration_s": calibration_s, "rates_s": rates,
        "dry_run": args.dry_run, "checkpoint": str(path), "items": [
            {"name": i.name, "weight": i.weight, "units": i.units, "fixed_s": i.fixed_s,
             "fixed_units": i.fixed_units, "min_scale": i.min_scale, **asdict(d)}
            for i, d in zip(items, decisions, strict=True)]}, indent=2))
    print(f"calibrated in {calibration_s} s; {len(items)} items in "
          f"{args.budget_s - calibration_s:.0f} s; plan: {args.out / 'plan.json'}")
    ctx = {"model": model, "tok": tok, "path": path, "device": device,
           "checkpoint": path if args.dry_run else None}
    for i, item in enumerate(items):
        # the time that is left now, dealt out among this item and the ones after it
        d = fit(item, share_of(items, i, deadline - time.perf_counter()), rates)
        record = {"name": item.name, "share_s": d.share_s, "planned_s": d.est_s,
                  "scale": d.scale}
        if d.status == "skipped":
            record |= {"status": "skipped", "actual_s": 0.0, "reason": d.reason}
        else:
            record |= {"reason": d.reason} | run_item(item, d, ctx, args, deadline)
        write_line(results, record)
        print(f"{item.name:<28} {record['status']:<9} {record['actual_s']:7.1f} s "
              f"(est {d.est_s:.1f} s of a {d.share_s:.0f} s share, {d.scale:.0%} of its "
              f"recipe) {record.get('reason', '')}".rstrip(), flush=True)
    print(f"{time.perf_counter() - started:.0f} s; wrote {results}")


if __name__ == "__main__":
    main()
