"""Shared fixtures: the embedded checkpoint loaded by our code and by the references.

transformers, gguf and tokenizers are test-only references (requirements-dev.txt)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references load local files only

from loaders.checkpoint import embedded_path, load  # noqa: E402
from model import GPT, Config  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path():
    return embedded_path()


@pytest.fixture(scope="session")
def ours(gguf_path):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 on the CPU."""
    return load(gguf_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own load of the same GGUF file, fp32."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    """transformers' tokenizer built from the same GGUF file."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def tiny_config(**changes):
    """The tiny random model of the unit tests: vocab 100, width 32, 2 blocks."""
    base = dict(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, d_model=32, head_dim=8,
                d_ff=64, rope_theta=10000.0, max_seq_len=128)
    return Config(**{**base, **changes})


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()
