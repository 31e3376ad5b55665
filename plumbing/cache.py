"""Reusing a stage's result only while everything that determines it is unchanged.

A stage (a steering vector, a teacher's dataset, a trained student) is stored under runs/ in
a file named by a hash of its inputs: its settings, what it reads (the vector's hash, the
dataset's path, itself named by a hash), and the source code it runs. Edit `Adam.step` and
every student trained by the old code is recomputed; a rerun with other settings never meets
an old file. A stage counts as done only when its `.done.json` was written after it finished
(an interrupted stage is resumed or recomputed, never reused half-made). --fresh deletes a
stage's old files first.
"""
import ast
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
RUNS = Path("runs")
# the modules each kind of stage runs; with every project module they import, directly or
# not (found by reading their import statements: project_imports), they make its code hash
ENTRY = {"vector": ["vectors", "loaders.checkpoint"],
         "teacher": ["teacher", "vectors", "loaders.checkpoint"],
         "batches": ["plumbing.batches", "teacher", "vectors", "loaders.checkpoint"],
         "student": ["student", "alignment", "optimizers", "plumbing.batches", "teacher",
                     "vectors", "loaders.checkpoint"]}


def module_file(name):
    """The repository's file of a dotted module name, or None (not ours: torch, json, ...)."""
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path):
    """The dotted names of the project modules that the file imports, anywhere in it (also
    inside functions: `from loaders.checkpoint import load` in a main())."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)  # "from plumbing import cache": plumbing.cache is a module
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if module_file(name)}


def stage_files(entries):
    """Every project file that the entry modules import, directly or not, sorted."""
    seen, todo = set(), list(entries)
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += project_imports(path)
    return sorted(seen)


def _hash_sources(files):
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# read once, when the program starts: the code that runs, even if a file is edited meanwhile
CODE_VERSIONS = {stage: _hash_sources(stage_files(entries)) for stage, entries in ENTRY.items()}


def code_record():
    """What code a run ran, for its JSON files: the git commit (None outside a git checkout),
    whether files differed from it, and each stage's code hash."""
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "uncommitted_changes": dirty, "stage_code": CODE_VERSIONS}


def code_version(stage):
    """A hash of the source (and path) of every project module that `stage` runs."""
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
