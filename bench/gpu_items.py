"""The items of bench/gpu.py: what each one runs, the work it states (gpu_plan.Item.units),
its command line and the figures read back from what it wrote.

Items 2-4 are the repository's own commands (train.py, experiments.py), each run as a
subprocess with a timeout; their units come from the same recipe the command is given:
  teacher_row@B    one number list written by a steered teacher, B rows sampled together
  vector_step@B    one step of a vector student (late_lora_step@B: LoRA --lora-from layer;
                   lora_step@B: LoRA on every block), B lists a step
  measure@QxE      one measurement of a student (P(owl) on Q questions, EAS on E prompts)
  eval_row         one sampled answer of the final evaluation (4 new tokens)
  startup          starting Python, importing torch and the project, loading the model
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_plan import Item, scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import PRESETS  # noqa: E402

# kl_full (the upper bound) against the main loss, per step: a vector student's kl_numbers
# step uses 14 rows of the output head, kl_full all 49,152 (config.py: about 3 times the
# cost); LoRA's cross-entropy already computes the whole head.
UPPER_BOUND_COST = {"vector": 3.0, "lora": 1.2}
OUTPUT_S = 5.0     # writing a run's JSON and drawing its figures (matplotlib)
HF_LOAD_S = 5.0    # transformers reading the GGUF file into its model (an assumption)
COMPILE_S = 60.0   # torch.compile + CUDA-graph capture of one static decode (an assumption)
# the claims runs at the long preset: (experiment, teachers per seed, extra flags); the
# vector students first, then LoRA on the teacher's block and after it
CLAIMS = [("prompt-teacher", 5, []), ("necessity", 4, []), ("random", 1, []),
          ("prompt-teacher-lora", 5, ["--student", "lora", "--loss", "ce",
                                      "--lora-from", "layer"])]
# the budget's split (relative weights; gpu_plan.share_of deals out the time left)
# (a sampling bench is mostly its compilation, COMPILE_S; time an item leaves unused flows on)
WEIGHTS = {"bench-sampling-64": 16, "bench-sampling-256": 16, "bench-lora-step": 6,
           "bench-vector-step": 2, "demo": 8, "long": 10, "paper": 22,
           "claims-prompt-teacher": 9, "claims-necessity": 7, "claims-random": 4,
           "claims-prompt-teacher-lora": 6}
# --dry-run: every recipe shrunk to the tiny checkpoint's size (tests/tiny_checkpoint.py)
TINY_TRAIN = dict(layer=1, alpha=2.0, samples=8, steps=2, batch_size=4, eval_every=2,
                  trait_questions=2, eas_prompts=2, eval_samples=2, teacher_batch=8,
                  upper_bound_steps=2, gradient_rows=4)
TINY_CLAIMS = dict(layer=1, alpha=2.0, samples=8, steps=2, batch_size=4, eval_every=2,
                   trait_questions=2, eas_prompts=2, seeds=2)


def flag_list(flags):
    """{"batch_size": 4} -> ["--batch-size", "4"]."""
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def train_item(name, preset, argv, scaled_keys, tiny, min_scale):
    """A train.py run at `preset`; its units from the resolved recipe."""
    tiny_flags = {k: v for k, v in TINY_TRAIN.items() if k != "gradient_rows" or preset == "paper"}
    r = dict(PRESETS[preset]) | (tiny_flags if tiny else {})
    if r.get("epochs") and not tiny:
        r["steps"] = round(r["epochs"] * r["samples"] / r["batch_size"])
    kind = r["student"]
    step = f"{kind}_step@{r['batch_size']}"
    mains = [r["steps"]] * (3 if r["compare"] else 2)  # main, control (, other_opt)
    upper = r["upper_bound_steps"] or r["steps"]
    measures = sum(s // min(r["eval_every"], max(1, s // 4)) + 1 for s in [*mains, upper])
    units = {f"teacher_row@{r['teacher_batch']}": 2 * r["samples"],
             step: sum(mains) + upper * UPPER_BOUND_COST[kind],
             f"measure@{r['trait_questions']}x{r['eas_prompts']}": measures}
    fixed = {"startup": 1, "eval_row": r["eval_samples"] * r["trait_questions"] * (3 + len(mains))}
    if r["gradient_rows"]:  # the gradient diagnostic: a backward pass per row of each dataset
        fixed[step] = fixed.get(step, 0) + 2 * r["gradient_rows"] / r["batch_size"]
    return Item(name, WEIGHTS[name], units, OUTPUT_S, fixed, min_scale, spec=dict(
        script="train.py", argv=argv, recipe=r, scaled=scaled_keys,
        explicit=tiny_flags if tiny else {}))


def claim_item(name, teachers, extra, tiny):
    """experiments.py NAME --preset long: teachers x seeds datasets and students."""
    r = dict(PRESETS["long"]) | {"seeds": 3} | (TINY_CLAIMS if tiny else {})
    n = teachers * r["seeds"]
    step = (f"late_lora_step@{r['batch_size']}" if "lora" in extra
            else f"vector_step@{r['batch_size']}")
    units = {f"teacher_row@{PRESETS['long']['teacher_batch']}": n * r["samples"],
             step: n * r["steps"],
             f"measure@{r['trait_questions']}x{r['eas_prompts']}":
                 n * (r["steps"] // r["eval_every"] + 1)}
    experiment = name.removesuffix("-lora")
    return Item(f"claims-{name}", WEIGHTS[f"claims-{name}"], units, OUTPUT_S, {"startup": 1},
                0.125, spec=dict(script="experiments.py", argv=[experiment, "--preset", "long",
                                                               *extra],
                                recipe=r, scaled=["samples", "steps"],
                                explicit=TINY_CLAIMS if tiny else {}))


def bench_items(tiny, have_peft):
    """The benches, run side by side in this process (gpu.py's run_bench)."""
    new_tokens, repeats = (8, 1) if tiny else (128, 2)
    items = []
    for batch in (64, 256):  # ours, transformers, ours compiled: (repeats + 1) runs each
        items.append(Item(f"bench-sampling-{batch}", WEIGHTS[f"bench-sampling-{batch}"],
                          {f"decode_step@{batch}": 3 * (repeats + 1) * new_tokens},
                          0.0 if tiny else COMPILE_S, {}, 0.25, "bench",
                          dict(batch=batch, new_tokens=new_tokens, repeats=repeats,
                               compile=not tiny)))
    lora_batches = [4] if tiny else [8, 32]
    impls = 3 if have_peft else 2
    items.append(Item("bench-lora-step", WEIGHTS["bench-lora-step"], {},
                      (impls - 1) * HF_LOAD_S,  # transformers' model, once per reference
                      # each implementation: two steps (every logit; loss columns only),
                      # each its loss, a warm-up and `repeats` timed runs
                      {f"lora_step@{b}": impls * 2 * (repeats + 2) for b in lora_batches},
                      1.0, "bench", dict(batches=lora_batches, repeats=repeats,
                                         peft=have_peft)))
    vector_batches = [4] if tiny else [4, 8]
    together, together_repeats = (2, 1) if tiny else (8, 5)  # k students, timed runs
    b = vector_batches[-1]  # k together cost at most k steps alone, each run
    items.append(Item("bench-vector-step", WEIGHTS["bench-vector-step"], {}, 0.0,
                      {**{f"vector_step@{x}": 25 for x in vector_batches},
                       f"vector_step@{b}": 25 + together * (together_repeats + 1),
                       f"late_lora_step@{b}": 25}, 1.0, "bench",
                      dict(batches=vector_batches, repeats=20, together=together,
                           together_repeats=together_repeats)))
    return items


def all_items(tiny, have_peft):
    """Every item, in the order they run."""
    cpu_keys = ["samples", "steps", "upper_bound_steps"]
    return [*bench_items(tiny, have_peft),
            train_item("demo", "cpu", ["--vector", "owl", "--opt", "adam"], cpu_keys, tiny,
                       0.25),
            train_item("long", "long", ["--vector", "owl", "--preset", "long"], cpu_keys,
                       tiny, 0.25),
            # steps follow --samples (3 epochs), so scaling the lists scales both
            train_item("paper", "paper", ["--preset", "paper"], ["samples"], tiny, 0.02),
            *[claim_item(name, teachers, extra, tiny) for name, teachers, extra in CLAIMS]]


def command(item, scale, out, checkpoint=None, device=None):
    """The item's command line at `scale` of its recipe, writing into `out`."""
    spec = item.spec
    flags = dict(spec["explicit"])
    if scale < 1:  # shortened: the scaled counts (samples at least one student batch)
        r = spec["recipe"]
        for key in spec["scaled"]:
            if r.get(key):
                flags[key] = scaled(r[key], scale, r["batch_size"] if key == "samples" else 1)
    argv = [sys.executable, str(ROOT / spec["script"]), *spec["argv"], *flag_list(flags),
            "--out", str(out)]
    if checkpoint:
        argv += ["--checkpoint", str(checkpoint)]
    return argv + (["--device", device] if device else [])


def run_command(argv, timeout_s, log, cwd):
    """Run argv with its output in `log`; (status, return code, seconds). A run past its
    timeout is killed: "failed" with return code None."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                timeout=max(1.0, timeout_s)).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return ("ok" if rc == 0 else "failed"), rc, round(time.perf_counter() - start, 1)


def read_figures(item, out):
    """The key figures of a finished command from its own files: (figures, peak memory)."""
    if item.spec["script"] == "train.py":
        m = json.loads((out / "metrics.json").read_text())
        p, base = m.get("p_animal", {}), m.get("p_animal", {}).get("base")
        figures = {"p_animal": p, "seconds": m.get("seconds"),
                   "x_base": {k: round(v / base, 3) for k, v in p.items()
                              if base and v is not None and k not in ("base",)}}
        return figures, m.get("peak_gpu_memory_gib") or None
    result = json.loads((out / "result.json").read_text())
    figures = {"seconds": result.get("seconds"),
               "summary": result.get("summary", result.get("final"))}
    return figures, None  # experiments.py does not record GPU memory
