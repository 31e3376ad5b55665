"""The checks of the flags the commands share, run before any work (before the model loads).

    args = parser.parse_args(argv)
    check_common(parser, args)       # a bad flag: argparse's one-line error, exit status 2

Every command (train.py, generate.py, evaluate.py, sweep.py, vectors.py, experiments.py)
calls check_common right after parsing; it checks only the flags the command has (the
attributes of args), so one table serves them all:
  --device        a torch device whose backend is here: cpu, cuda, cuda:N (N < the number of
                  CUDA devices) or mps
  --seed          an integer in 0 .. SEED_LIMIT - 1: teacher.py seeds batch k with
                  seed * 1_000_003 + k, and torch's generators take seeds below 2**64
  --seeds         a count of seeds 0, 1, ...: at most SEED_LIMIT, so that each is a --seed
  float flags     finite, within their range (FLOATS)
  --layer         at least 0 (its upper bound is the model's depth: checked once it loads)
  --steps, --epochs   at most MAX_STEPS student steps
  --vector        a vector name or file (vectors.check_vector_name); never empty
  --out           a folder (or, for evaluate.py, a file) that can be written: the missing
                  folders are made, a probe file is written and deleted, and the folders
                  made for it are removed again
"""
import math
import os
import tempfile
from pathlib import Path

import torch

SEED_LIMIT = 2**32  # x 1_000_003, + the row: far below torch's 2**64
MAX_STEPS = 10**7   # student steps: days of a GPU at the paper's recipe; more is a mistake
FLOATS = {  # float flag: (the test of a finite value, what the flag must be)
    "alpha": (lambda x: True, "a finite number"),
    "lora_scale": (lambda x: True, "a finite number"),
    "temperature": (lambda x: x >= 0, "a finite number >= 0"),
    "top_p": (lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "lr": (lambda x: x > 0, "a positive finite number"),
    "epochs": (lambda x: x > 0, "a positive finite number"),
    "norm": (lambda x: x > 0, "a positive finite number"),
}


class FlagError(ValueError):
    """A flag that cannot be used; the message names it."""


def flag(key):
    """'batch_size' -> '--batch-size'."""
    return "--" + key.replace("_", "-")


def check_device(device):
    """A FlagError unless `device` (a string, or None: the best there is) is a device here."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda", "mps"):
        raise FlagError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps")
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FlagError(f"--device {device}: no CUDA device here")
        if d.index is not None and d.index >= count:
            raise FlagError(f"--device {device}: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}")
    elif d.index not in (None, 0):
        raise FlagError(f"--device {device}: there is one {d.type} device, {d.type}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise FlagError(f"--device {device}: no MPS device here")


def check_seed(seed):
    """A FlagError unless 0 <= seed < SEED_LIMIT (see the module's docstring)."""
    if not 0 <= seed < SEED_LIMIT:
        raise FlagError(f"--seed must be in 0..2**32-1 (teacher.py seeds its batches with "
                        f"seed * 1_000_003 + row, and torch takes seeds below 2**64), "
                        f"not {seed}")


def check_float(key, value):
    """A FlagError unless the float flag `key` has a finite value in its range (FLOATS)."""
    test, what = FLOATS[key]
    if not (math.isfinite(value) and test(value)):
        raise FlagError(f"{flag(key)} must be {what}, not {value}")


def check_steps(args):
    """A FlagError if --steps (or --upper-bound-steps), or --epochs passes over --samples
    rows in batches of --batch-size, come to more than MAX_STEPS steps."""
    for key in ("steps", "upper_bound_steps"):
        if (getattr(args, key, None) or 0) > MAX_STEPS:
            raise FlagError(f"{flag(key)} must be at most 10**7, not {getattr(args, key)}")
    epochs, samples, batch = (getattr(args, key, None)
                              for key in ("epochs", "samples", "batch_size"))
    if epochs and samples and batch and epochs * samples / batch > MAX_STEPS:
        raise FlagError(f"--epochs {epochs:g} is {epochs * samples / batch:.3g} steps of "
                        f"--batch-size {batch} over --samples {samples}: at most 10**7")


def check_folder(path, what):
    """A FlagError unless `path` is, or can be made, a folder that can be written (probed
    with a file written and deleted; folders made for the probe are removed again). `what`
    names it in the message ("--out runs/x")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FlagError(f"{what} is a file, not a folder")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.write(handle, b"probe")
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise FlagError(f"{what}: cannot write there ({e.strerror or e})") from None
    finally:
        for folder in missing:  # the deepest first; the command makes them when it writes
            try:
                folder.rmdir()
            except OSError:
                pass


def check_file(path, what):
    """A FlagError unless the file `path` can be written: not a folder, its folder
    writable (check_folder), and, if it exists, writable itself."""
    path = Path(path)
    if path.is_dir():
        raise FlagError(f"{what} is a folder, not a file")
    if path.parent.exists() and not path.parent.is_dir():
        raise FlagError(f"{what}: {path.parent} is a file, not a folder")
    check_folder(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise FlagError(f"{what}: cannot write there (permission denied)")


def check_vector(name):
    """A FlagError unless --vector names a vector or a file (vectors.check_vector_name)."""
    from steer import VectorError
    from vectors import check_vector_name
    if name == "":
        raise FlagError("--vector must not be empty: name a vector or a .safetensors file")
    try:
        check_vector_name(name)
    except VectorError as e:
        raise FlagError(f"--vector: {e}") from None


def check_args(args, out="folder"):
    """Raise a FlagError for the first bad common flag of args (those it has); `out` says
    whether --out is a folder or (evaluate.py) a file."""
    if getattr(args, "vector", None) is not None:
        check_vector(args.vector)
    for key in FLOATS:
        if getattr(args, key, None) is not None:
            check_float(key, getattr(args, key))
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)
    if (getattr(args, "seeds", None) or 0) > SEED_LIMIT:
        raise FlagError(f"--seeds must be at most 2**32 (seeds 0, 1, ... are --seed values), "
                        f"not {args.seeds}")
    if (getattr(args, "layer", None) or 0) < 0:
        raise FlagError(f"--layer must be at least 0, not {args.layer}")
    check_steps(args)
    check_device(getattr(args, "device", None))
    # under torchrun every rank parses the flags, but only rank 0 writes --out (its probe
    # would race with the others' removal of the folders made for it)
    if getattr(args, "out", None) is not None and os.environ.get("RANK", "0") == "0":
        (check_file if out == "file" else check_folder)(args.out, f"--out {args.out}")


def check_common(parser, args, out="folder"):
    """check_args, a bad flag as argparse's one-line usage error (exit status 2)."""
    try:
        check_args(args, out)
    except FlagError as e:
        parser.error(str(e))
