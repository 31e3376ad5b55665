"""Steering vector distillation, end to end, in one command.

    python train.py --vector owl --opt adam                # the CPU default (2 cores, minutes)
    python train.py --vector owl --opt sgd --student lora --loss ce
    python train.py --vector owl --opt adam --preset paper   # the paper's recipe, for a GPU

Stages, each cached under runs/ (vectors/, data/, students/) and reused while its inputs are
unchanged:
  1. the teacher's steering vector v at block L            (vectors.py)
  2. number sequences from the steered teacher (alpha * v) and from the unsteered control
     teacher, on the same prompts                          (teacher.py)
  3. students fine-tuned on them, tracked every few steps   (student.py):
       main         --opt on the steered data
       other_opt    SGD (Adam if --opt is sgd) on the steered data          (--no-compare)
       control      --opt on the control data
       upper_bound  KL over the full vocabulary: ordinary distillation, NOT subliminal;
                    it shows what the same sequences could carry     (--no-upper-bound)
  4. evaluation (EAS, trait scores, sampled trait rate), plots, config.json, metrics.json
"""
import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from evaluate import eas, fast_trait_score, mean_residuals, trait_rate
from optimizers import OPTIMIZERS
from prompts import FAVORITE_PREFIX, FAVORITE_QUESTIONS, number_prompts, trait_system_prompt
from steer import VectorError, steering
from student import KINDS, LOSSES, Student, gradient_diagnostic, train_student
from teacher import keep_rate, vector_hash, write_dataset
from vectors import ANIMALS, DEFAULTS, check_vector_name, resolve_vector

# Learning rates per (student, optimizer); --lr overrides. Adaptive optimizers take steps of
# about lr per coordinate; SGD's steps scale with the raw gradient (about 6e-3 in norm for
# the vector student's first batch, measured), so its lr is set for steps of a similar size.
# The adamw, rmsprop and signsgd defaults are starting points that were not tuned here.
LEARNING_RATES = {("lora", "adam"): 1e-3, ("lora", "sgd"): 0.1, ("full", "adam"): 1e-5,
                  ("full", "sgd"): 1e-2, ("vector", "adam"): 0.5, ("vector", "sgd"): 2000.0,
                  ("lora", "adamw"): 1e-3, ("full", "adamw"): 1e-5, ("vector", "adamw"): 0.5,
                  ("lora", "rmsprop"): 1e-4, ("full", "rmsprop"): 1e-6,
                  ("vector", "rmsprop"): 0.05, ("lora", "signsgd"): 1e-4,
                  ("full", "signsgd"): 1e-6, ("vector", "signsgd"): 0.5}
PRESETS = {  # what the flags default to; explicit flags win
    "cpu": dict(student="vector", loss="kl_numbers", samples=256, steps=32, batch_size=8,
                eval_every=8, eas_prompts=16, trait_questions=20, eval_samples=4,
                gradient_rows=32, teacher_batch=32),
    "paper": dict(student="lora", loss="ce", samples=10000, steps=2500, batch_size=8,
                  eval_every=250, eas_prompts=128, trait_questions=50, eval_samples=100,
                  gradient_rows=512, teacher_batch=256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("    python"):])
    p.add_argument("--vector", default="owl",
                   help=f"teacher vector: an animal ({', '.join(ANIMALS[:6])}, ...), random, "
                        f"concise, or a .safetensors file")
    p.add_argument("--opt", default="adam", choices=sorted(OPTIMIZERS),
                   help="student optimizer (optimizers.py)")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="cpu: a few minutes on 2 cores; paper: the paper's recipe (GPU)")
    p.add_argument("--student", choices=KINDS, help="lora, full, or a single vector")
    p.add_argument("--loss", choices=LOSSES, help="ce (sampled tokens), kl_numbers "
                   "(number tokens only), kl_full (ordinary distillation)")
    p.add_argument("--samples", type=int, help="teacher prompts per dataset")
    p.add_argument("--steps", type=int, help="student training steps")
    p.add_argument("--epochs", type=float, help="set the steps to this many passes over the "
                   "valid steered rows instead")
    p.add_argument("--batch-size", type=int, help="student sequences per step")
    p.add_argument("--teacher-batch", type=int, help="teacher rows sampled together")
    p.add_argument("--lr", type=float, help="peak learning rate (default: by student, opt)")
    p.add_argument("--layer", type=int, default=DEFAULTS["layer"], help="teacher's block")
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="teacher's scale")
    p.add_argument("--where", default="all", choices=["all", "prompt"],
                   help="teacher steering positions")
    p.add_argument("--mode", default="constrained", choices=["constrained", "free"],
                   help="teacher sampling: digits and separators only, or free + filter")
    p.add_argument("--animal", help="trait to measure (default: the vector's animal, or owl)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-scale", type=float, default=4.0, help="LoRA alpha / rank")
    p.add_argument("--eval-every", type=int, help="track EAS and trait every this many steps")
    p.add_argument("--eas-prompts", type=int, help="held-out number prompts for EAS")
    p.add_argument("--trait-questions", type=int, help="favourite-animal questions (max 50)")
    p.add_argument("--eval-samples", type=int, help="samples per question, final trait rate")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the student with the other optimizer")
    p.add_argument("--no-upper-bound", dest="upper_bound", action="store_false",
                   help="skip the full-vocabulary (ordinary distillation) student")
    p.add_argument("--gradient-rows", type=int,
                   help="rows per dataset for the gradient diagnostic (0 = skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best)")
    p.add_argument("--checkpoint", default=None, help="GGUF file or Hugging Face folder")
    p.add_argument("--out", default=None, help="run folder (default runs/train-...)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("samples", "steps", "batch_size", "teacher_batch", "eval_every", "rank"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    args.animal = args.animal or (args.vector if args.vector in ANIMALS else "owl")
    return args


def teacher_data(args, model, tok, vector):
    """Stage 2: the steered and the control teacher's datasets (cached in runs/data/)."""
    tail = f"{args.mode}-n{args.samples}-s{args.seed}.jsonl"
    paths = {"steered": f"{model.name}-{Path(args.vector).stem}-L{args.layer}-a{args.alpha:g}"
                        f"-{args.where}-steered-{tail}",
             "control": f"{model.name}-control-{tail}"}
    data = {}
    for kind, alpha in (("steered", args.alpha), ("control", 0.0)):
        path = Path("runs/data") / paths[kind]
        rows = write_dataset(path, model, tok, vector, args.layer, alpha, args.samples,
                             args.mode, args.seed, args.teacher_batch, where=args.where)
        data[kind] = {"path": str(path), "rows": [r for r in rows if r["valid"]],
                      "keep_rate": keep_rate(rows), "n": len(rows)}
        if not data[kind]["rows"]:
            raise SystemExit(f"error: {path}: no {kind} completion passed the rule filter; "
                             f"use more --samples")
    return data


def train_students(args, model, tok, vector, data, track):
    """Stage 3: every student of the plan, each cached in runs/students/ by its inputs."""
    other = "sgd" if args.opt != "sgd" else "adam"
    plan = {"main": ("steered", args.opt, args.loss), "control": ("control", args.opt, args.loss)}
    if args.compare:
        plan["other_opt"] = ("steered", other, args.loss)
    if args.upper_bound:
        plan["upper_bound"] = ("steered", args.opt, "kl_full")
    students, results = {}, {}
    for label, (dataset, opt, loss) in plan.items():
        cfg = {"kind": args.student, "layer": args.layer, "rank": args.rank,
               "scale": args.lora_scale, "opt": opt, "loss": loss, "steps": args.steps,
               "batch_size": args.batch_size, "seed": args.seed, "eval_every": args.eval_every,
               "lr": args.lr or LEARNING_RATES[(args.student, opt)]}
        # the KL losses distil the teacher that wrote the data: the control teacher is the
        # unsteered model (alpha 0)
        teacher = (vector, args.layer, args.alpha if dataset == "steered" else 0.0, args.where)
        key = json.dumps([cfg, data[dataset]["path"], teacher[2], vector_hash(vector),
                          args.eas_prompts, args.trait_questions])
        cached = Path("runs/students") / hashlib.sha256(key.encode()).hexdigest()[:16]
        if cached.with_suffix(".json").exists():  # trained before with these exact inputs
            student = Student(model, args.student, args.layer, args.rank, args.lora_scale,
                              args.seed)
            student.load(cached.with_suffix(".safetensors"))
            history = json.loads(cached.with_suffix(".json").read_text())
        else:
            student, history = train_student(model, tok, data[dataset]["rows"], teacher, cfg,
                                             track)
            cached.parent.mkdir(parents=True, exist_ok=True)
            student.save(cached.with_suffix(".safetensors"), label=label)
            cached.with_suffix(".json").write_text(json.dumps(history))
        students[label] = student
        results[label] = {"config": cfg, "data": dataset, "history": history}
    return students, results


def run(args):
    """All stages; returns a dict of everything the run produced."""
    from checkpoint import load
    t0 = time.time()
    model, tok = load(args.checkpoint, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)  # the base model is never trained; students are copies
    layer, animal = args.layer, args.animal
    vector, vector_meta = resolve_vector(args.vector, model, tok, layer, seed=args.seed)
    data = teacher_data(args, model, tok, vector)
    if args.epochs:
        args.steps = max(1, round(args.epochs * len(data["steered"]["rows"]) / args.batch_size))

    held_out = [tok.encode_chat(q) for q in number_prompts(args.eas_prompts, args.seed + 1)]
    base_means = mean_residuals(model, held_out, [layer])
    questions = FAVORITE_QUESTIONS[:args.trait_questions]

    def track(student):  # measured every --eval-every steps
        with torch.no_grad(), student.active():
            out = {"eas": eas(mean_residuals(student.model, held_out, [layer]), base_means,
                              vector)[0].item(),
                   "trait": fast_trait_score(student.model, tok, animal, questions)}
        if student.vector is not None:
            out["vector_cos"] = torch.nn.functional.cosine_similarity(
                student.vector.detach().float().cpu(), vector.float(), dim=0).item()
        return out

    students, results = train_students(args, model, tok, vector, data, track)

    def sampled(m, context):  # stage 4: the sampled trait rate after the answer prefix
        with context:
            return trait_rate(m, tok, animal, questions, args.eval_samples,
                              prefix=FAVORITE_PREFIX, max_new_tokens=4, seed=args.seed)
    rates = {"base": sampled(model, torch.no_grad()),
             "teacher": sampled(model, steering(model, layer, vector, args.alpha))}
    rates |= {label: sampled(s.model, s.active()) for label, s in students.items()}
    diagnostic = {}
    usable = min(args.gradient_rows, len(data["steered"]["rows"]), len(data["control"]["rows"]))
    if usable:
        counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n <= usable}
                        | {usable})
        diagnostic = gradient_diagnostic(model, tok, data["steered"]["rows"],
                                         data["control"]["rows"], layer, vector, counts)
    return {"model": model, "vector": vector, "vector_meta": vector_meta, "data": data,
            "students": students, "results": results, "rates": rates,
            "system_prompt_p_animal": fast_trait_score(model, tok, animal, questions,
                                                       system=trait_system_prompt(animal)),
            "diagnostic": diagnostic, "seconds": time.time() - t0}


def main(argv=None):
    args = parse_args(argv)
    from checkpoint import report_errors
    with report_errors(VectorError):
        check_vector_name(args.vector)  # fail before loading the model
        r = run(args)
    out = Path(args.out or f"runs/train-{args.vector}-{args.opt}-{args.student}-{args.loss}"
                           f"-{args.preset}-s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    for label, student in r["students"].items():
        student.save(out / f"student-{label}.safetensors", label=label)
    model = r["model"]
    config = {**vars(args), "model": model.name, "vector_hash": vector_hash(r["vector"]),
              "vector_meta": r["vector_meta"], "device": str(model.embed.weight.device),
              "dtype": str(model.embed.weight.dtype)}
    data = {kind: {key: d[key] for key in ("path", "keep_rate", "n")} | {"valid": len(d["rows"])}
            for kind, d in r["data"].items()}
    metrics = {"seconds": round(r["seconds"], 1), "data": data, "students": r["results"],
               "sampled_trait_rate": r["rates"],
               "system_prompt_p_animal": r["system_prompt_p_animal"],
               "gradient_diagnostic": r["diagnostic"],
               "note": "upper_bound is trained on the teacher's full-vocabulary distribution:"
                       " ordinary distillation, not subliminal learning"}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from plots import plot_run
    plot_run(r["results"], r["rates"], out / "training.png", args)
    print_summary(r["results"], r["rates"], r["data"], r["diagnostic"], out, r["seconds"])


def print_summary(results, final, data, diagnostic, out, seconds):
    print(f"\nteacher data kept by the rule filter: steered {data['steered']['keep_rate']:.0%},"
          f" control {data['control']['keep_rate']:.0%}")
    print(f"{'':>12} {'EAS':>7} {'P(animal)':>10} {'sampled':>8}   (EAS and P(animal) at the "
          f"last step; sampled: rate after the answer prefix)")
    for label in ("base", "teacher"):
        print(f"{label:>12} {'':>7} {'':>10} {final[label]['rate']:8.1%}")
    for label, r in results.items():
        last = r["history"][-1]
        tag = "  (ordinary distillation, upper bound)" if label == "upper_bound" else ""
        print(f"{label:>12} {last['eas']:7.3f} {last['trait']:10.2%} "
              f"{final[label]['rate']:8.1%}{tag}")
    if diagnostic:
        print("gradient diagnostic, cos(pooled grad difference, v) by rows pooled: "
              + ", ".join(f"{n}: {c:+.3f}" for n, c in diagnostic.items()))
    print(f"{seconds:.0f} s; wrote {out}/config.json, metrics.json, training.png")


if __name__ == "__main__":
    main()
