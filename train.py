"""Steering vector distillation, end to end, in one command.

    python train.py --vector owl --opt adam                # the CPU default (2 cores, minutes)
    python train.py --vector owl --opt sgd
    python train.py --vector owl --opt adam --preset paper   # the paper's recipe, for a GPU

Stages, each cached under runs/ and reused only while everything that determines it is
unchanged (settings, data and the code it runs; a reused stage prints one line; --fresh
recomputes everything):
  1. the teacher's steering vector v at block L, and the control's, of the same norm at the
     same block: by default another animal's vector whose teacher leaves P(owl) at the base
     model's level (--control neutral; --control random: a random direction)  (vectors.py)
  2. number lists from the steered teacher (alpha * v) and from the control teacher
     (alpha * control vector), on the same prompts                 (teacher.py)
  3. students fine-tuned on them, measured every few steps         (student.py, batches.py):
       main         --opt on the steered teacher's numbers
       control      --opt on the control teacher's numbers: a task of the same size that
                    carries no owl trait (it can learn its own teacher's vector)
       other_opt    SGD (Adam if --opt is sgd) on the steered numbers           (--compare)
       upper_bound  KL over the full vocabulary: ordinary distillation, NOT subliminal;
                    it shows what the same sequences could carry     (--no-upper-bound)
  4. evaluation (evaluate.py, alignment.py), figures, config.json and metrics.json (plumbing/)
Past one GPU: torchrun --nproc-per-node N train.py ... shares out the teacher's prompts and
the students between N processes; rank 0 evaluates and writes the outputs (distributed.py).
"""
import argparse
import contextlib
import time
from pathlib import Path
from dataclasses import asdict


from plumbing import distributed
from plumbing.batches import load_batches, prepare_batches, save_batches
from plumbing.capture import load_records
from plumbing.flags import check_common
from loaders.checkpoint import add_model_flags, report_errors
from plumbing.cache import Stage, code_version, content_hash, model_identity
from claims.gradients import gradient_diagnostic
from alignment import Measurer, final_report
from optimizers import OPTIMIZERS
from plumbing.report import PeakMemory, write_outputs
from steer import VectorError, check_block
from config import PRESETS, Settings, SettingsError, resolve, student_config
from student import KINDS, LOSSES, POSITIONS, SCHEDULES, Student, train_student
from teacher import Teacher, keep_rate, number_statistics, read_dataset, write_dataset
from vectors import ANIMALS, check_vector_name, control_vector, default_layer, resolve_vector

def parse_args(argv=None):
    """The command line as resolved Settings (config.py); a bad flag is a one-line error."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("    python"):])
    d = Settings  # the defaults of the fields that have one
    p.add_argument("--vector", default=d.vector,
                   help=f"teacher vector: an animal ({', '.join(ANIMALS)}), random, concise, "
                        f"or a .safetensors file")
    p.add_argument("--opt", choices=sorted(OPTIMIZERS),
                   help="student optimizer (optimizers.py; cpu preset adam, paper adamw)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS),
                   help="cpu: minutes on 2 cores; long: the same for 1,024 steps (half an "
                        "hour); paper: the paper's recipe (GPU)")
    p.add_argument("--student", choices=KINDS, help="lora, full, or a single vector")
    p.add_argument("--loss", choices=LOSSES, help="ce (sampled tokens), kl_numbers "
                   "(number tokens only), kl_full (ordinary distillation)")
    p.add_argument("--loss-positions", choices=POSITIONS, default=d.loss_positions,
                   help="where the loss is taken: every completion token (all) or only "
                   "where the next token is a digit (digits: no separators, no end)")
    p.add_argument("--samples", type=int, help="teacher prompts per dataset")
    p.add_argument("--steps", type=int, help="student training steps")
    p.add_argument("--epochs", type=float, help="set the steps to this many passes over the "
                   "steered rows instead")
    p.add_argument("--batch-size", type=int, help="student sequences per step")
    p.add_argument("--teacher-batch", type=int, help="teacher rows sampled together")
    p.add_argument("--lr", type=float, help="peak learning rate of --opt's students "
                   "(default: paper preset 1e-4, else by student and optimizer)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning rate over the steps, "
                   "after a 5%% warm-up: cosine (the paper's; paper preset), wsd (flat, then "
                   "a linear decay over the last 20%%; cpu preset) or constant")
    p.add_argument("--control", default=d.control, help="the control teacher's vector, of "
                   "v's norm: neutral (the measured animal's trait-neutral animal, see "
                   "config.NEUTRAL_CONTROLS), random (a random direction), or an animal")
    p.add_argument("--layer", type=int, help="teacher's block (default: 5/6 of the depth: "
                   "25 of SmolLM2-135M's 30, 23 of Qwen2.5-7B's 28)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="teacher's scale")
    p.add_argument("--where", default=d.where, choices=["all", "prompt"],
                   help="teacher steering positions")
    p.add_argument("--mode", default=d.mode, choices=["constrained", "free"],
                   help="teacher sampling: the rule filter's grammar, or free + filter")
    p.add_argument("--animal", help="trait to measure (default: the vector's animal, or owl)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--lora-scale", type=float, default=d.lora_scale, help="LoRA alpha / rank")
    p.add_argument("--lora-from", type=int, default=d.lora_from, metavar="BLOCK",
                   help="LoRA adapters on blocks BLOCK.. only (default 0: every block); the "
                        "earlier blocks' output is computed once, so a step costs less")
    p.add_argument("--eval-every", type=int, help="measure the students every this many steps")
    p.add_argument("--eas-prompts", type=int, help="held-out number prompts for EAS")
    p.add_argument("--trait-questions", type=int, help="favourite-animal questions (1-50)")
    p.add_argument("--eval-samples", type=int, help="samples per question, final trait rate")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction,
                   help="also train SGD (Adam if --opt is sgd) on the steered numbers "
                        "(default: paper preset yes, cpu preset no)")
    p.add_argument("--no-upper-bound", dest="upper_bound", action="store_false",
                   help="skip the full-vocabulary (ordinary distillation) student")
    p.add_argument("--upper-bound-steps", type=int, help="its steps (cpu preset: 32, as a "
                   "full-vocabulary step costs 3 times more and it converges fast; "
                   "paper preset: --steps)")
    p.add_argument("--gradient-rows", type=int, help="rows per dataset for the gradient "
                   "diagnostic (claims/gradients.py; 0 = skip; cpu preset 0, paper 512)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fresh", action="store_true", help="recompute every stage, reuse nothing")
    add_model_flags(p)
    p.add_argument("--out", default=None, help="run folder (default runs/train-...)")
    try:
        args = resolve(Settings(**vars(p.parse_args(argv))))
    except SettingsError as e:
        p.error(str(e))
    check_common(p, args)  # the flags every command shares: --device, --seed, --out, ...
    return args


def teachers(args, model, tok):
    """Stage 1: the steered teacher and the control teacher (--control's vector, of v's
    norm, at the same block and scale)."""
    if args.layer is None:
        args.layer = default_layer(model.cfg.n_layer)
    check_block(args.layer, model.cfg.n_layer, "--layer")
    vector, meta = resolve_vector(args.vector, model, tok, args.layer, seed=args.seed,
                                  fresh=args.fresh and distributed.is_main())
    control = control_vector(args.control, vector, model, tok, args.layer, args.seed,
                             fresh=args.fresh and distributed.is_main())[0]
    return (Teacher(vector, args.layer, args.alpha, args.where), meta,
            Teacher(control, args.layer, args.alpha, args.where))


def teacher_data(args, model, tok, teacher, label):
    """Stage 2: one teacher's dataset, in runs/data/ under a name made of what determines
    it (so a run with another vector never meets this file)."""
    inputs = {"model": model_identity(model), **teacher.describe(), "mode": args.mode,
              "samples": args.samples, "seed": args.seed, "batch": args.teacher_batch,
              "code": code_version(write_dataset)}
    with distributed.main_first():  # under torchrun, only rank 0 deletes old files (--fresh)
        stage = Stage("data", label, inputs, args.fresh and distributed.is_main())
    path = stage.path.with_suffix(".jsonl")
    # a vector student's inputs and targets are kept as the teacher writes (capture.py)
    record_block = teacher.layer if args.student == "vector" else None
    if stage.reusable(path):  # read only: a reused dataset is never written again
        stage.say_reused(path)
        rows = read_dataset(path, args.samples, args.teacher_batch)
    else:  # under torchrun every rank writes its share; rank 0 holds the lock
        with stage.making() if distributed.is_main() else contextlib.nullcontext():
            rows = write_dataset(path, model, tok, teacher, args.samples, args.mode,
                                 args.seed, args.teacher_batch, desc=f"{label} teacher",
                                 record_block=record_block)
    valid = [r for r in rows if r["valid"]]
    if not valid:
        raise SystemExit(f"error: {path}: no {label} completion passed the rule filter; "
                         f"use more --samples or --mode constrained")
    return {"path": str(path), "rows": valid, "keep_rate": keep_rate(rows), "n": len(rows),
            "numbers": number_statistics(valid)}


def student_plan(args):
    """{label: (dataset, StudentConfig)}; --lr applies to --opt's students only."""
    plan = {"main": ("steered", student_config(args)),
            "control": ("control", student_config(args))}
    if args.compare:
        plan["other_opt"] = ("steered", student_config(args, "sgd" if args.opt != "sgd"
                                                        else "adam"))
    if args.upper_bound:
        steps = args.upper_bound_steps or args.steps
        plan["upper_bound"] = ("steered", student_config(args, loss="kl_full", steps=steps))
    return plan


def teacher_targets(args, model, tok, teacher, data, label, batch_size, prefix_blocks):
    """The batches of one dataset with the teacher's targets (and the output of the
    prefix_blocks blocks a student never changes), prepared once, cached in runs/batches/."""
    inputs = {"model": model_identity(model), "data": data["path"],
              "rows": content_hash(data["rows"]), "teacher": teacher.describe(),
              "batch_size": batch_size, "prefix": prefix_blocks,
              "device": str(model.embed.weight.device),
              "dtype": str(model.embed.weight.dtype),
              "code": code_version(prepare_batches, load_records, teacher)}
    if distributed.world_size() > 1:  # ranks that share a device would share the file
        inputs["rank"] = distributed.rank()
    records = None  # what the teacher's pass kept of a vector student's inputs
    if prefix_blocks == teacher.layer + 1 and not teacher.changes_inputs:
        records = load_records(Path(data["path"]), data["rows"], teacher.layer,
                               args.teacher_batch)
    inputs["recorded"] = records is not None
    stage = Stage("batches", label, inputs, args.fresh)
    path = stage.path.with_suffix(".safetensors")
    if stage.reusable(path):
        stage.say_reused(path)
        return load_batches(path, model.embed.weight.device)
    if records is not None:
        print(f"teacher targets of '{label}': from what the teacher kept while it wrote "
              f"(plumbing/capture.py), no second pass")
    with stage.making():
        batches = prepare_batches(model, tok, data["rows"], teacher, batch_size,
                                  prefix_blocks, records=records)
        save_batches(path, batches)
    return batches


def train_students(args, model, tok, plan, teachers_by_data, data, measurer):
    """Stage 3: every student of the plan ({label: (dataset, StudentConfig)}, student_plan),
    each cached in runs/students/ by its inputs. Under torchrun each rank trains its share of
    the students; rank 0 then loads the others' from the cache, and the other ranks return
    nothing ({}, {})."""
    students, results, batches, others = {}, {}, {}, {}
    mine = distributed.mine(list(plan))
    for label, (dataset, cfg) in plan.items():
        teacher = teachers_by_data[dataset]
        inputs = {"config": asdict(cfg), "model": model_identity(model),
                  "data": data[dataset]["path"], "rows": content_hash(data[dataset]["rows"]),
                  "teacher": teacher.describe(), "measure": measurer.describe(),
                  "code": code_version(train_student, measurer, teacher)}
        stage = Stage("students", label, inputs, args.fresh and label in mine)
        weights = stage.path.with_suffix(".safetensors")
        if label not in mine:  # another rank trains it (torchrun); rank 0 loads it below
            others[label] = weights
            continue
        if stage.reusable(weights):
            stage.say_reused(weights)
            student = Student.from_config(model, cfg)
            history = student.load(weights)
            for h in history:
                measurer.print_line(label, h)
        else:
            key = (dataset, cfg.batch_size, cfg.frozen_blocks)
            if key not in batches:  # teacher targets (and prefixes) once per dataset
                batches[key] = teacher_targets(args, model, tok, teacher, data[dataset], *key)
            with stage.making():
                student, history = train_student(
                    model, batches[key], cfg, measurer.track,
                    report=lambda h, label=label: measurer.print_line(label, h))
                student.save(weights, history=history, label=label)
        students[label] = student
        results[label] = {"config": asdict(cfg), "data": dataset, "history": history}
    if distributed.world_size() == 1:
        return students, results
    distributed.barrier()  # every rank has saved its students
    if not distributed.is_main():
        return {}, {}
    for label, weights in others.items():
        dataset, cfg = plan[label]
        print(f"loading student '{label}' from {weights} (trained by another rank)")
        students[label] = Student.from_config(model, cfg)
        results[label] = {"config": asdict(cfg), "data": dataset,
                          "history": students[label].load(weights)}
    order = list(plan)  # as a single process has them
    return {k: students[k] for k in order}, {k: results[k] for k in order}


def run(args):
    """All stages; returns a dict of everything the run produced."""
    from loaders.checkpoint import load
    t0 = time.time()
    model, tok = load(args.checkpoint, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)  # the base model is never trained; students are copies
    memory = PeakMemory(model.embed.weight.device)
    memory("model")
    with distributed.main_first():  # rank 0 makes (or finds) the vector, the others read it
        steered, vector_meta, control = teachers(args, model, tok)
    data = {"steered": teacher_data(args, model, tok, steered, "steered"),
            "control": teacher_data(args, model, tok, control, "control")}
    memory("teachers")
    if args.epochs:
        args.steps = max(1, round(args.epochs * len(data["steered"]["rows"]) / args.batch_size))
    measurer = Measurer(model, tok, steered, args.animal, args.eas_prompts,
                        args.trait_questions, args.seed)
    students, results = train_students(args, model, tok, student_plan(args),
                                       {"steered": steered, "control": control}, data,
                                       measurer)
    if not distributed.is_main():
        return None  # rank 0 evaluates and writes everything
    memory("students")
    report = final_report(measurer, students, results, steered, control, args.eval_samples)
    rows = min(args.gradient_rows, len(data["steered"]["rows"]), len(data["control"]["rows"]))
    if rows:
        counts = sorted({n for n in (1, 4, 16, 64, 256, 1024) if n < rows} | {rows})
        report["gradient_diagnostic"] = gradient_diagnostic(
            model, tok, data["steered"]["rows"], data["control"]["rows"], args.layer,
            steered.vector, counts)
    memory("evaluation")
    report["peak_gpu_memory_gib"] = memory.peaks
    return {"model": model, "teacher": steered, "vector_meta": vector_meta, "data": data,
            "students": students, "results": results, "report": report,
            "seconds": time.time() - t0}


def main(argv=None):
    args = parse_args(argv)
    with report_errors(VectorError, FloatingPointError, ValueError):
        check_vector_name(args.vector)  # fail before loading the model
        distributed.init()  # under torchrun: join the other processes
        r = run(args)
    if not distributed.is_main():
        return distributed.finish()
    write_outputs(args, r)
    distributed.finish()


if __name__ == "__main__":
    main()
