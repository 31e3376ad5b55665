"""Reusing a stage's result only while everything that determines it is unchanged.

A stage (a steering vector, a teacher's dataset, a trained student) is stored under runs/ in
a file named by a hash of its inputs: its settings, what it reads (the vector's hash, the
dataset's path, itself named by a hash), and the source code it runs. Edit `Adam.step` and
every student trained by the old code is recomputed; a rerun with other settings never meets
an old file. A stage counts as done only when its `.done.json` was written after it finished
(an interrupted stage is resumed or recomputed, never reused half-made). --fresh deletes a
stage's old files first.
"""
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUNS = Path("runs")
# the source files each kind of stage runs (and everything the earlier stages ran)
MODEL_CODE = ["model", "checkpoint", "gguf_file", "safetensors_file", "tokenizer", "generate",
              "steer", "prompts"]
CODE = {"vector": MODEL_CODE + ["vectors"],
        "teacher": MODEL_CODE + ["vectors", "teacher"],
        "batches": MODEL_CODE + ["vectors", "teacher", "batches"],
        "student": MODEL_CODE + ["vectors", "teacher", "batches", "student", "optimizers",
                                 "evaluate", "measure"]}


def _hash_sources(modules):
    h = hashlib.sha256()
    for module in modules:
        h.update((ROOT / f"{module}.py").read_bytes())
    return h.hexdigest()[:16]


# read once, when the program starts: the code that runs, even if a file is edited meanwhile
CODE_VERSIONS = {stage: _hash_sources(modules) for stage, modules in CODE.items()}


def code_version(stage):
    """A hash of the source of every module that `stage` runs."""
    return CODE_VERSIONS[stage]


def input_hash(inputs):
    """16 hex digits naming a JSON-able dict of inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


class Stage:
    """One cached result: `path` is its name without suffix (add .jsonl, .safetensors, ...)."""

    def __init__(self, kind, label, inputs, fresh=False):
        self.kind, self.label, self.inputs = kind, label, inputs
        # a file name of letters, digits, '-' and '_' only: a '.' in a label ("adam lr 0.5")
        # would be taken for a suffix, and two labels would share one file
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", label)
        self.path = RUNS / kind / f"{name}-{input_hash(inputs)}"
        self.done = self.path.with_suffix(".done.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:  # start from nothing
            for old in self.path.parent.glob(self.path.name + ".*"):
                old.unlink()

    def reusable(self, result):
        """True if `result` (a file) was completed earlier from exactly these inputs."""
        return self.done.exists() and Path(result).exists()

    def say_reused(self, result):
        print(f"reusing {self.kind} '{self.label}' from {result} "
              f"(same settings, data and code)")

    def mark_done(self):
        self.done.write_text(json.dumps(self.inputs, indent=2, sort_keys=True))
