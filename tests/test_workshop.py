"""WORKSHOP.md stays true: every exercise's check command passes on the project as it is,
and every file and function an exercise names exists.

The format WORKSHOP.md follows (and this file reads):
    ### Exercise N: title                      6 to 8 of them
    **Change:** `file.py`: `function`, ...     the files and the functions or methods to rewrite
    ```check                                   one fenced block per exercise: a single pytest
    .venv/bin/python -m pytest ... -q          command, run here with this same python
    ```
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "WORKSHOP.md").read_text()
SECTIONS = re.split(r"^(?=### Exercise \d+)", TEXT, flags=re.M)[1:]
SECTIONS[-1] = re.split(r"^## ", SECTIONS[-1], flags=re.M)[0]  # the last one ends at a part
CHECK = re.compile(r"^```check\n(.*?)\n```", re.M | re.S)
CHECKS = [command for section in SECTIONS for command in CHECK.findall(section)]
INSIDE_A_CHECK = "WORKSHOP_CHECK"  # set in the checks' environment: they never run these


def test_six_to_eight_exercises_each_with_one_check_and_one_change():
    numbers = [int(re.match(r"### Exercise (\d+)", s).group(1)) for s in SECTIONS]
    assert 6 <= len(SECTIONS) <= 8 and numbers == list(range(1, len(SECTIONS) + 1))
    for number, section in zip(numbers, SECTIONS, strict=True):
        assert len(CHECK.findall(section)) == 1, f"exercise {number}: one check block"
        assert len(re.findall(r"^\*\*Change:\*\*", section, re.M)) == 1, f"exercise {number}"
        assert "git checkout" in section, f"exercise {number}: how to reset its file"


def test_named_files_and_functions_exist():
    named = 0
    for section in SECTIONS:
        change = re.search(r"^\*\*Change:\*\*(.*)$", section, re.M).group(1)
        items = re.findall(r"`([^`]+)`", change)
        files = [ROOT / item for item in items if item.endswith(".py")]
        assert files and all(f.is_file() for f in files), change
        source = "\n".join(f.read_text() for f in files)
        for name in (item for item in items if not item.endswith(".py")):
            for part in name.split("."):  # Adam.update: class Adam and its def update
                assert re.search(rf"^\s*(def|class) {part}\b", source, re.M), (name, change)
            named += 1
    assert named >= len(SECTIONS)
    # every Python file, test file and figure named anywhere in the text (runs/ is made by runs)
    for path in set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.(?:py|md|png|json|sh))\b", TEXT)):
        if "/" in path or path.endswith((".py", ".md", ".sh")):
            if not path.startswith("runs/"):
                assert (ROOT / path).exists(), path


@pytest.mark.skipif(os.environ.get(INSIDE_A_CHECK) == "1", reason="no checks inside a check")
@pytest.mark.parametrize("command", CHECKS, ids=[f"exercise-{i + 1}" for i in range(len(CHECKS))])
def test_check_command_passes(command):
    """Exit status 0 (pytest's 5, nothing selected, fails too), with this same python."""
    args = shlex.split(command)
    assert args[:3] == [".venv/bin/python", "-m", "pytest"], command
    env = {**os.environ, INSIDE_A_CHECK: "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800, env=env)  # seconds each on an idle machine
    assert run.returncode == 0, f"{command}\n{run.stdout[-3000:]}{run.stderr[-2000:]}"


# ---------------------------------------------------------------- an exercise's own check
def test_meandiff_is_the_mean_difference_at_the_last_prompt_token(tmp_path):
    """Exercise 4's check, on the tiny checkpoint (seconds, where the real model's test takes
    a minute): each prompt run alone, without padding, with and without the trait's system
    prompt; the residual after every block at the last prompt token; the mean difference."""
    from loaders.checkpoint import load
    from prompts import number_prompts, trait_system_prompt
    from tiny_checkpoint import write_tiny_checkpoint
    from vectors import meandiff

    model, tok = load(write_tiny_checkpoint(tmp_path / "tiny"), device="cpu")
    n, d = model.cfg.n_layer, model.cfg.d_model
    got = meandiff(model, tok, "owl", n_prompts=5, seed=3)
    expected = torch.zeros(n, d)
    with torch.no_grad():
        for question in number_prompts(5, 3):
            for system, sign in ((trait_system_prompt("owl"), 1.0), (None, -1.0)):
                x = model.embed(torch.tensor([tok.encode_chat(question, system)]))
                for layer in range(n):
                    x = model.run_blocks(x, first=layer, last=layer + 1)  # (1, T, d)
                    expected[layer] += sign * x[0, -1] / 5
    assert got.shape == (n, d)
    torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=1e-4)
