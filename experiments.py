"""The paper's claims, one command each.

    python experiments.py NAME [--seeds 3] [--preset cpu|paper] [--steps N] [--samples N]

writes runs/experiments/NAME/result.json (every number, per seed, with the settings) and
figure.png. Each experiment is built from the same stages as train.py (teacher datasets,
batches, students; all cached by settings and code in runs/), so experiments that share a
stage share its cost: `random` and `layers` reuse `prompt-teacher`'s datasets and students
when they have run first (`necessity` too, given prompt-teacher's budget: --samples 128
--steps 128).

Where a difference is claimed, each seed is a new dataset (other prompts, other samples), a
new control vector and a new batch order; intervals are the mean +- t(0.975, n-1) * sd /
sqrt(n) over seeds (a t interval: with 3 seeds it is wide, and it says so).
"""
import argparse
import copy
import time
from pathlib import Path

from config import PRESETS
from loaders.checkpoint import add_model_flags
from plumbing.cache import code_record
from plumbing.flags import check_common
from vectors import ANIMALS, DEFAULTS

CLAIMS = {  # name: (the claim, the paper's figure)
    "prompt-teacher": ("a teacher with the trait's system prompt transmits it through numbers; "
                       "the student's shift aligns with the prompt's vector v (and a teacher "
                       "steered by v alone does the same: sufficiency)",
                       "base ~2% -> students ~57% (cat, Qwen2.5-7B); EAS 0.7-0.9 vs ~0.1"),
    "necessity": ("projecting v/|v| out of the prompted teacher removes the transfer",
                  "transfer falls to about the control's"),
    "random": ("random vectors are distilled like any other: EAS with the student's own "
               "teacher's vector rises, while P(owl) and the cosine with owl stay flat",
               "EAS with own random vector rises as for trait vectors"),
    "optimizers": ("at matched training loss, Adam-type optimizers transmit the trait and SGD "
                   "does not", "Adam 0.142 loss / 57% vs SGD 0.167 / 0%"),
    "mechanism": ("the gradient's small consistent component along v is amplified by Adam's "
                  "per-coordinate scaling and drowned in SGD's by a few outlier coordinates",
                  "pooled gradient-difference cosine with v about 0.08-0.10"),
    "layers": ("the student's shift aligns with v at the teacher's block and after it",
               "EAS by layer"),
    "steerability": ("a trait transfers only where its vector steers the model at inference "
                     "time", "rank correlation between steering peak and transfer"),
}


def block_or_layer(text):
    """--lora-from: a block number, or 'layer' for the teacher's block."""
    if text == "layer":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is neither a block number nor 'layer'")
    return int(text)


def subset(text, choices, required, what, required_label):
    """A comma-separated subset of `choices` with `required` among them, in choices' order;
    anything else is argparse's one-line error."""
    picked = [c.strip() for c in text.split(",") if c.strip()]
    if required not in picked or any(c not in choices for c in picked):
        raise argparse.ArgumentTypeError(f"'{text}': give {what} from {', '.join(choices)}, "
                                         f"{required_label} among them")
    return [c for c in choices if c in picked]


def optimizer_list(text):
    """--opts: a subset of the optimizers experiment's six, with Adam."""
    from claims.optimizer_choice import OPTS
    return subset(text, OPTS, "adam", "optimizers", "Adam")


TEACHERS = ["prompt", "steered", "steered-prompt", "control", "neutral"]
CPU_TEACHERS = ["prompt", "steered", "control"]  # the cpu preset's: the 30-minute budget


def teacher_list(text):
    """--teachers: a subset of prompt-teacher's five teachers, the prompt's among them."""
    return subset(text, TEACHERS, "prompt", "teachers", "prompt")


def parse_args(argv=None):
    names = "\n".join(f"  {name:15} {claim}" for name, (claim, _) in CLAIMS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="experiments:\n" + names)
    p.add_argument("name", choices=list(CLAIMS), metavar="NAME", help="the experiment (below)")
    p.add_argument("--seeds", type=int, help="seeds where a difference is claimed (default 3; "
                   "steerability on the cpu preset: 1 per animal)")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="train.py's preset the students start from")
    p.add_argument("--samples", type=int, help="teacher prompts per dataset")
    p.add_argument("--steps", type=int, help="student steps")
    p.add_argument("--student", choices=["vector", "lora", "full"], help="student kind")
    p.add_argument("--loss", choices=["ce", "kl_numbers", "kl_full"], help="student loss")
    p.add_argument("--batch-size", type=int, help="student rows per step")
    p.add_argument("--eval-every", type=int, help="measure students every this many steps")
    p.add_argument("--layer", type=int, help="the teacher's block (default: 5/6 of the depth)")
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"],
                   help="the steered teachers' scale")
    p.add_argument("--trait-questions", type=int, help="favourite-animal questions (1-50)")
    p.add_argument("--eas-prompts", type=int, help="held-out number prompts for EAS")
    p.add_argument("--lora-from", type=block_or_layer, metavar="BLOCK|layer",
                   help="LoRA students: adapters on blocks BLOCK.. only, or from the "
                        "teacher's block ('layer'); default every block")
    p.add_argument("--opts", type=optimizer_list, metavar="A,B,...",
                   help="optimizers: which optimizers (default all six; Adam must be one: "
                        "the others are matched to its loss)")
    p.add_argument("--teachers", type=teacher_list, metavar="A,B,...",
                   help=f"prompt-teacher: which teachers ({', '.join(TEACHERS)}; default all "
                        f"five, on the cpu preset {','.join(CPU_TEACHERS)})")
    p.add_argument("--match-factor", type=int, help="optimizers: the others may take this "
                   "many times Adam's steps to reach its loss (default 4; cpu preset 1)")
    p.add_argument("--animals", type=int, default=8, help="steerability: how many animals")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                   help="optimizers: also full fine-tuning with Adam and SGD (default: on "
                        "for the paper preset; a full step costs about 8 s on 2 cores)")
    add_model_flags(p)
    p.add_argument("--fresh", action="store_true", help="recompute every stage")
    p.add_argument("--out", help="folder (default runs/experiments/NAME)")
    args = p.parse_args(argv)
    for key in ("seeds", "samples", "steps", "batch_size", "eval_every", "animals", "match_factor",
                "trait_questions", "eas_prompts"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.animals > len(ANIMALS):
        p.error(f"--animals must be at most {len(ANIMALS)}")
    cpu_defaults(args)
    args.out = Path(args.out or f"runs/experiments/{args.name}")
    check_common(p, args)  # --alpha, --layer, --steps, --device, --out (plumbing/flags.py)
    return args


def write_result(args, result, started):
    claim, paper = CLAIMS[args.name]
    result = {"experiment": args.name, "claim": claim, "paper": paper,
              "settings": {k: str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()},
              "seconds": round(time.time() - started, 1), "code": code_record(), **result}
    path = args.out / "result.json"
    from plumbing.report import write_json  # (imports torch: not at start-up, for --help)
    write_json(path, result, default=float)  # a NaN (a diverged run) is written as null
    print(f"{result['seconds']:.0f} s; wrote {path} and {args.out / 'figure.png'}")
    return result


# the CPU preset's defaults where train.py's would take an experiment past 30 minutes on 2 cores
# (measured: README, "The paper's claims"). Each dataset is 128 lists instead of 256 (about 100
# s less per teacher to write and prepare), and the students are measured every 32 steps instead
# of 16 (6 s a measurement); optimizers trains 22 students of 48 steps, steerability 8 animals'
# vectors, datasets and students, one seed each. necessity trains 12 students (4 teachers x 3
# seeds) where the others train 9 or fewer; each costs about 3 min at 128 lists and 128 steps
# (36 min in all), so its datasets are 96 lists and its students take 96 steps. With --samples
# 128 --steps 128 it reuses prompt-teacher's prompt and control students instead. prompt-teacher
# trains three of its five teachers' students (the prompt's, the steered teacher's, the random
# control's). Flags override all of these.
TRANSFER = {"samples": 128, "eval_every": 32}
CPU_DEFAULTS = {"prompt-teacher": TRANSFER | {"teachers": CPU_TEACHERS}, "random": TRANSFER,
                "layers": TRANSFER | {"teachers": CPU_TEACHERS},
                "necessity": TRANSFER | {"samples": 96, "steps": 96},
                "optimizers": {"steps": 48, "samples": 128, "match_factor": 1},
                "steerability": TRANSFER | {"seeds": 1}}


def cpu_defaults(args):
    for key, value in CPU_DEFAULTS.get(args.name, {}).items():
        if args.preset == "cpu" and getattr(args, key) is None:
            setattr(args, key, value)
    if getattr(args, "teachers", None) is None:
        args.teachers = TEACHERS
    if getattr(args, "seeds", None) is None:
        args.seeds = 3
    if getattr(args, "match_factor", None) is None:
        args.match_factor = 4


NEEDS = {"layers": ["prompt-teacher", "optimizers"]}  # experiments whose results it reads


def main(argv=None):
    from loaders.checkpoint import report_errors
    args = parse_args(argv)
    from claims import mechanism, optimizer_choice, steerability, transfer
    from claims.lab import Lab
    from steer import VectorError
    runners = {**transfer.RUNNERS, **optimizer_choice.RUNNERS, **mechanism.RUNNERS,
               **steerability.RUNNERS}
    with report_errors(VectorError, FloatingPointError, ValueError):
        lab = Lab(args)
        for name in NEEDS.get(args.name, []):  # run first what this one reads (if missing)
            needed = copy.copy(args)
            needed.name, needed.out = name, args.out.parent / name
            cpu_defaults(needed)
            if not (needed.out / "result.json").exists():
                print(f"{args.name} reads {name}'s result: running it first")
                needed.out.mkdir(parents=True, exist_ok=True)
                started = time.time()
                write_result(needed, runners[name](lab, needed), started)
        started = time.time()
        args.out.mkdir(parents=True, exist_ok=True)
        result = runners[args.name](lab, args)
    write_result(args, result, started)


if __name__ == "__main__":
    main()
