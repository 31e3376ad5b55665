"""Reusing a stage's result only while everything that determines it is unchanged.

A stage (a steering vector, a teacher's dataset, a trained student) is stored under runs/ in
a file named by a hash of its inputs, and each input is named by its content:
  - the model by a digest of its checkpoint's bytes (loaders/checkpoint.py: model.digest),
    never by its file name alone: another model saved as `model.gguf` is another model;
  - the rows a student sees by a hash of those rows (`content_hash`), not by the dataset's
    path: a run that keeps other rows trains other students;
  - the code by `code_version(maker, ...)`: the source of the module of each function that
    makes the stage, of every project module those import (directly or not, found by reading
    their import statements, also those inside functions), and of every project file on the
    call stack that asked for it (train.py, experiments.py, claims/lab.py: they decide the
    settings and the rows), plus torch's version. Nothing is listed by hand: edit
    `Adam.step` and every student is recomputed while the teachers' lists are reused; edit
    train.py and nothing is reused.
A stage counts as done only when its `.done.json` was written after it finished, and every
cached file is written under a temporary name and renamed when whole (`write_atomic`,
loaders/safetensors_file.py): a kill leaves the old file or none, never half of one. While a
stage is made, a lock file holds the maker's process id: a second run that needs the same
stage meanwhile stops with one line instead of writing into it. Reuse only reads. --fresh
deletes a stage's old files first.
"""
import ast
import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
RUNS = Path("runs")


def project_file(path):
    """`path` (a str or Path) if it is one of the project's own source files, else None: not
    a test, not an installed package (.venv), not a file outside the repository."""
    try:
        parts = Path(path).resolve().relative_to(ROOT).parts
    except (ValueError, OSError):
        return None
    if not parts or parts[0] == "tests" or any(p.startswith(".") for p in parts):
        return None
    return ROOT.joinpath(*parts) if parts[-1].endswith(".py") else None


# every project source file, read once when the program starts: the code that runs, even if a
# file is edited meanwhile (a file edited later counts with what it held at the start)
def project_sources():
    """{path: sha256 of its bytes} of every project source file (not .venv, tests, runs)."""
    sources = {}
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")
                         and d not in ("tests", "runs", "__pycache__")]
        for name in names:
            path = project_file(Path(folder) / name)
            if path is not None:
                sources[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sources


SOURCES = project_sources()


def module_file(name):
    """The repository's file of a dotted module name, or None (not ours: torch, json, ...)."""
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return project_file(candidate)
    return None


def project_imports(path):
    """The files of the project modules that the file imports, anywhere in it (also inside
    functions: `from loaders.checkpoint import load` in a main())."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)  # "from plumbing import cache": plumbing.cache is a module
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {module_file(name) for name in names} - {None}


def import_closure(files):
    """The files, with every project file they import, directly or not, sorted."""
    seen, todo = set(), [f for f in files if f is not None]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path)
    return sorted(seen)


def callers():
    """The project files on the call stack (the functions that asked for this stage)."""
    frame, files = sys._getframe(1), set()
    while frame is not None:
        files.add(project_file(frame.f_code.co_filename))
        frame = frame.f_back
    return files - {None}


def stage_code(*makers):
    """The files a stage's result depends on: the modules of `makers` (the functions or
    objects that make it) with all they import, and the project files on the call stack
    (those alone: train.py decides the settings, its imports do not all make this stage)."""
    modules = {module_file(getattr(m, "__module__", None) or type(m).__module__)
               for m in makers}
    return sorted(set(import_closure(modules)) | callers())


def code_version(*makers):
    """16 hex digits naming the code a stage runs (stage_code) and torch's version."""
    h = hashlib.sha256(f"torch {torch.__version__}\0".encode())
    for path in stage_code(*makers):
        digest = SOURCES.get(path) or hashlib.sha256(path.read_bytes()).hexdigest()
        h.update(f"{path.relative_to(ROOT)}\0{digest}\0".encode())
    return h.hexdigest()[:16]


def code_record():
    """What code a run ran, for its JSON files: the git commit (None outside a git checkout),
    whether files differed from it, torch's version, the command line of the process and
    when it wrote the record (UTC), so that a result file says how to make it again."""
    import shlex
    import subprocess
    import sys
    from datetime import UTC, datetime
    command = shlex.join(["python", *sys.argv])
    written = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "uncommitted_changes": dirty, "torch": torch.__version__,
            "command": command, "written_utc": written}


def input_hash(inputs):
    """16 hex digits naming a JSON-able dict of inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def content_hash(value):
    """16 hex digits naming JSON-able content (a dataset's rows, say) by what it holds."""
    return input_hash({"content": value})


def model_identity(model):
    """A model as a stage input: its name (for file names) and the digest of its weights."""
    digest = getattr(model, "digest", None)
    if digest is None:  # built in memory (a test's tiny model): a digest of its tensors
        h = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            h.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
        digest = model.digest = h.hexdigest()[:16]
    return {"name": getattr(model, "name", "model"), "digest": digest}


def write_atomic(path, data):
    """Write bytes or text to `path` under a temporary name, then rename it: a reader (or a
    run after a kill) sees the old file or the whole new one, never a part."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class StageBusy(OSError):
    """Another process is making this stage now (its lock file names it)."""


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def locked(path):
    """Hold `path.lock` (holding this process id) while the block makes `path`. A lock whose
    process is gone (killed) is taken over; one whose process runs is a StageBusy error."""
    lock = Path(f"{path}.lock")
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = lock.read_text().strip() if lock.exists() else ""
            pid = int(text) if text.isdigit() else None
            if pid is not None and pid != os.getpid() and process_alive(pid):
                raise StageBusy(f"{path} is being made by process {pid} (another run in "
                                f"this runs/ folder): wait for it, or use another folder") from None
            lock.unlink(missing_ok=True)  # left by a killed run: take it over
    else:
        raise StageBusy(f"{lock}: cannot take the lock")
    with os.fdopen(descriptor, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


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

    @contextlib.contextmanager
    def making(self):
        """Around the work that makes the stage: the lock, and no completion marker until
        the work is done (a marker left from before is removed first)."""
        with locked(self.path):
            self.done.unlink(missing_ok=True)
            yield
            self.mark_done()

    def mark_done(self):
        write_atomic(self.done, json.dumps(self.inputs, indent=2, sort_keys=True))
