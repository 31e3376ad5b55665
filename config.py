"""The settings of a run, typed: what train.py's flags set and what experiments.py builds.

    s = resolve(Settings(vector="owl", opt="adam", steps=384))   # a preset fills the rest

A field left at None takes its preset's value (PRESETS); resolve() checks every field and
raises SettingsError with the flag's name, which train.py shows as a one-line error.
student_config() is the one place where a student's StudentConfig is made.
"""
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from plumbing import flags
from student import POSITIONS, StudentConfig
from vectors import ANIMALS, DEFAULTS

# Learning rates per (student, optimizer); --lr overrides it for --opt's students only.
# Adaptive optimizers take steps of about lr per coordinate; SGD's steps scale with the raw
# gradient, so its lr is set for steps of a similar size. The adamw, rmsprop and signsgd
# defaults are starting points that were not tuned here; sgdm (momentum 0.9) takes a tenth
# of SGD's, as its steps add up to about ten gradients.
LEARNING_RATES = {("lora", "adam"): 1e-3, ("lora", "sgd"): 0.1, ("full", "adam"): 1e-5,
                  ("full", "sgd"): 1e-2, ("vector", "adam"): 0.5, ("vector", "sgd"): 2000.0,
                  ("lora", "adamw"): 1e-3, ("full", "adamw"): 1e-5, ("vector", "adamw"): 0.5,
                  ("lora", "rmsprop"): 1e-4, ("full", "rmsprop"): 1e-6,
                  ("vector", "rmsprop"): 0.05, ("lora", "signsgd"): 1e-4,
                  ("full", "signsgd"): 1e-6, ("vector", "signsgd"): 0.5,
                  ("lora", "sgdm"): 0.01, ("full", "sgdm"): 1e-3, ("vector", "sgdm"): 200.0}
# The trait-neutral control of each measured animal: another animal's vector, scaled to the
# trait vector's norm, whose steered teacher leaves P(animal) nearest the base model's. The
# rule, applied once to the other 14 candidate animals before any student was trained
# (`python sweep.py --neutral --animal owl`; its table is docs/steering/neutral-control-owl.json):
#     argmin over animals a != owl of |log(P(owl | alpha * v_a |v|/|v_a| at block L)
#                                           / P(owl | base))|
NEUTRAL_CONTROLS = {"owl": "dolphin"}
CPU = dict(opt="adam", lr=None, student="vector", loss="kl_numbers", samples=256, steps=384,
           batch_size=4, schedule="wsd", eval_every=64, eas_prompts=16, trait_questions=20,
           eval_samples=50, teacher_batch=64, compare=False, upper_bound_steps=32,
           gradient_rows=0)
PRESETS = {  # what the fields left at None default to
    "cpu": CPU,  # the demo: minutes on 2 cores
    "long": CPU | dict(steps=1024, batch_size=8),  # the demo's long budget: half an hour
    # the paper's recipe (docs/method.md): 10,000 kept lists, LoRA r 8 / alpha 32, AdamW lr
    # 1e-4, cosine with 5% warm-up, batch 8, 3 epochs (the paper: 2-10), 50 x 100 samples
    "paper": dict(opt="adamw", lr=1e-4, student="lora", loss="ce", samples=10000,
                  epochs=3.0, batch_size=8, schedule="cosine", eval_every=250, eas_prompts=128,
                  trait_questions=50, eval_samples=100, teacher_batch=256, compare=True,
                  upper_bound_steps=None, gradient_rows=512),
}


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its flag."""


@dataclass
class Settings:
    vector: str = "owl"           # the teacher's vector: an animal, random, concise or a file
    preset: str = "cpu"           # cpu, long or paper: what the None fields default to
    opt: str = None               # the main student's optimizer (optimizers.py)
    student: str = None           # lora, full or vector
    loss: str = None              # ce, kl_numbers or kl_full (ordinary distillation)
    loss_positions: str = "all"   # the loss at every completion token, or at digits only
    samples: int = None           # teacher prompts per dataset
    steps: int = None             # student optimizer steps
    epochs: float = None          # or: this many passes over the steered rows
    batch_size: int = None        # student sequences per step
    teacher_batch: int = None     # teacher rows sampled together
    lr: float = None              # the peak learning rate of --opt's students
    schedule: str = None          # cosine, wsd or constant (student.learning_rate)
    control: str = "neutral"      # the control teacher's vector: neutral, random or an animal
    layer: int = None             # the teacher's block (default 5/6 of the depth)
    alpha: float = DEFAULTS["alpha"]  # the teacher's scale: h_L += alpha * v
    where: str = "all"            # the teacher's steered positions: all or prompt
    mode: str = "constrained"     # teacher sampling: the filter's grammar, or free + filter
    animal: str = None            # the trait measured (default: the vector's animal, or owl)
    rank: int = 8                 # LoRA rank
    lora_scale: float = 4.0       # LoRA alpha / rank
    lora_from: int = 0            # LoRA on blocks lora_from.. only (0: every block)
    eval_every: int = None        # measure the students every this many steps
    eas_prompts: int = None       # held-out number prompts for EAS
    trait_questions: int = None   # favourite-animal questions (1-50)
    eval_samples: int = None      # samples per question of the final sampled rate
    compare: bool = None          # also the other optimizer (SGD, or Adam) on the steered data
    upper_bound: bool = True      # also the full-vocabulary student (ordinary distillation)
    upper_bound_steps: int = None  # its steps (None: steps)
    gradient_rows: int = None     # rows per dataset for the gradient diagnostic (0: none)
    seed: int = 0                 # prompts, samples, control vector, batch order
    fresh: bool = False           # recompute every stage, reuse nothing
    device: str = None            # cuda, mps or cpu (default: the best there is)
    checkpoint: str = None        # GGUF file, HF folder, ORG/NAME[@REV]; None: the embedded one
    out: Path = None              # the run folder (default runs/train-...)


def resolve(settings):
    """A copy with the preset's values filled in and every field checked."""
    if settings.preset not in PRESETS:
        raise SettingsError(f"--preset must be one of {', '.join(PRESETS)}")
    s = replace(settings)
    for key, value in PRESETS[s.preset].items():
        if getattr(s, key) is None and not (key == "epochs" and settings.steps is not None):
            setattr(s, key, value)
    for key in ("samples", "steps", "batch_size", "teacher_batch", "eval_every", "rank",
                "eas_prompts", "trait_questions", "eval_samples", "upper_bound_steps"):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            raise SettingsError(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("gradient_rows", "lora_from"):
        if getattr(s, key) < 0:
            raise SettingsError(f"--{key.replace('_', '-')} must be at least 0")
    if s.loss_positions not in POSITIONS:
        raise SettingsError(f"--loss-positions must be one of: {', '.join(POSITIONS)}")
    if s.trait_questions > 50:
        raise SettingsError("--trait-questions must be at most 50 (there are 50 questions)")
    for key in ("alpha", "lr", "lora_scale", "epochs"):
        value = getattr(s, key)
        if value is not None and not math.isfinite(value):
            raise SettingsError(f"--{key.replace('_', '-')} must be a finite number, not {value}")
    if s.lr is not None and s.lr <= 0 or s.epochs is not None and s.epochs <= 0:
        raise SettingsError("--lr and --epochs must be positive")
    if s.animal is not None and s.animal not in ANIMALS:
        raise SettingsError(f"--animal must be one of: {', '.join(ANIMALS)}")
    s.animal = s.animal or (s.vector if s.vector in ANIMALS else "owl")
    if s.control == "neutral":  # resolved now, so that config.json names the vector
        if s.animal not in NEUTRAL_CONTROLS:
            print(f"note: no trait-neutral control is listed for {s.animal} "
                  f"(config.NEUTRAL_CONTROLS): the control teacher's vector is random")
        s.control = NEUTRAL_CONTROLS.get(s.animal, "random")
    if s.control != "random" and s.control not in ANIMALS:
        raise SettingsError(f"--control must be neutral, random or an animal "
                            f"({', '.join(ANIMALS)})")
    if s.control == s.animal:
        raise SettingsError(f"--control {s.control} is the measured animal: not a control")
    s.out = Path(s.out or f"runs/train-{Path(s.vector).stem}-{s.opt}-{s.student}-{s.loss}"
                          f"-{s.preset}-s{s.seed}")
    if s.out.exists() and not s.out.is_dir():
        raise SettingsError(f"--out {s.out} is a file, not a folder")
    check_device(s.device, SettingsError)
    return s


def check_device(device, error=ValueError):
    """An error if the named device is not here (None: the best there is, always fine):
    plumbing/flags.py's check, raised as `error`."""
    try:
        flags.check_device(device)
    except flags.FlagError as e:
        raise error(str(e)) from None


def as_dict(settings):
    """The settings as JSON-able values (config.json)."""
    return {f.name: (str(v) if isinstance(v := getattr(settings, f.name), Path) else v)
            for f in fields(settings)}


def student_config(s, opt=None, loss=None, steps=None, kind=None, lr=None):
    """The StudentConfig of one student of run s (resolved, its layer known): --opt's students
    take --lr, the others their optimizer's LEARNING_RATES entry."""
    opt, loss, kind, steps = opt or s.opt, loss or s.loss, kind or s.student, steps or s.steps
    lr = lr or (s.lr if opt == s.opt and s.lr else LEARNING_RATES[(kind, opt)])
    return StudentConfig(kind=kind, layer=s.layer, rank=s.rank, scale=s.lora_scale, opt=opt,
                         lr=lr, loss=loss, steps=steps, batch_size=s.batch_size, seed=s.seed,
                         eval_every=min(s.eval_every, max(1, steps // 4)),
                         first_block=s.lora_from, schedule=s.schedule,
                         positions=s.loss_positions)
