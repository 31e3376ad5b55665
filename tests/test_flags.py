"""Bad common flags fail before any work (plumbing/flags.py): argparse's one-line usage
error, exit status 2, naming the flag, with the model never loaded and nothing written.
Each case runs a command's main() in this process, in an empty folder, with
loaders.checkpoint.load replaced by a function that fails the test if it is called."""
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loaders import checkpoint
from plumbing.flags import SEED_LIMIT, FlagError, check_folder
from tiny_checkpoint import write_tiny_checkpoint
from vectors import save_vector

ROOT = Path(__file__).resolve().parents[1]
BASE = {"generate": ["--prompt", "hi"], "evaluate": [], "sweep": [], "vectors": ["owl"],
        "train": [], "experiments": ["random"]}  # what each command needs to parse at all
COMMANDS = list(BASE)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def refused(monkeypatch, capsys, tmp_path):
    """refused(command, *flags, base=BASE[command]) -> the error line on stderr, once main()
    has exited with status 2 before loading the model, leaving the working folder (an empty
    one, but for a-file) as it was."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded: the flag was checked too late")

    monkeypatch.setattr(checkpoint, "load", loaded)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")

    def run(command, *flags, base=None):
        module = importlib.import_module(command)
        before = sorted(tmp_path.iterdir())
        with pytest.raises(SystemExit) as exit_:
            module.main([*(BASE[command] if base is None else base), *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert re.match(r"\S+: error: ", errors[0]), err  # argparse's, not a late one
        assert sorted(tmp_path.iterdir()) == before  # no runs/, no --out folder
        return errors[0]
    return run


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_temperature_is_finite_and_not_negative(refused, value):
    assert "--temperature must be a finite number >= 0" in refused("generate", "--temperature",
                                                                    value)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["foo", "cuda:99", "cpu:1",
                                    pytest.param("cuda", marks=NO_CUDA)])
def test_device_is_one_that_is_here(refused, command, device):
    assert f"--device {device}" in refused(command, "--device", device).replace("'", "")


@pytest.mark.parametrize("command", ["generate", "evaluate", "sweep", "vectors", "train"])
@pytest.mark.parametrize("seed", [str(2**70), str(SEED_LIMIT), "-1"])
def test_seed_is_in_range(refused, command, seed):
    assert "--seed must be in 0..2**32-1" in refused(command, "--seed", seed)


def test_every_seed_below_the_limit_works_where_seeds_are_combined():
    """teacher.py's batch seed, seed * 1_000_003 + row, stays a seed torch takes."""
    torch.Generator().manual_seed((SEED_LIMIT - 1) * 1_000_003 + 10**7)
    torch.Generator().manual_seed(SEED_LIMIT - 1 + 50)  # evaluate.trait_rate: seed + start


def test_experiments_seeds_are_seeds(refused):
    assert "--seeds must be at most 2**32" in refused("experiments", "--seeds", str(2**40))


@pytest.mark.parametrize("command", ["evaluate", "vectors"])
def test_a_vector_files_negative_layer_fails_at_parse_time(refused, tmp_path, command):
    save_vector(tmp_path / "v.safetensors", torch.ones(32))
    base = ["--vector", "v.safetensors"] if command == "evaluate" else ["v.safetensors"]
    assert "--layer must be at least 0" in refused(command, "--layer", "-1", base=base)


@pytest.mark.parametrize("command", ["evaluate", "vectors"])
def test_a_vector_files_layer_past_the_depth_fails_before_any_generation(
        monkeypatch, capsys, tmp_path, tiny_folder, command):
    """The depth is known once the model is loaded: checked then, before the vector is read
    or anything generated (the tiny model has blocks 0-1)."""
    import evaluate
    import vectors

    def work(*args, **kwargs):
        raise AssertionError("work began before --layer was checked")

    monkeypatch.setattr(vectors, "resolve_vector", work)
    monkeypatch.setattr(evaluate, "trait_report", work)
    save_vector(tmp_path / "v.safetensors", torch.ones(32))
    vector = ["--vector", str(tmp_path / "v.safetensors")] if command == "evaluate" \
        else [str(tmp_path / "v.safetensors")]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(command).main([*vector, "--layer", "99", "--checkpoint",
                                               str(tiny_folder), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --layer 99 is out of range: the model has blocks 0-1"), err


def out_under_a_file(tmp_path):
    return "a-file/run"


def out_is_a_file(tmp_path):
    return "a-file"


def out_read_only(tmp_path):
    folder = tmp_path.parent / f"{tmp_path.name}-read-only"  # outside the checked folder
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder / "run")


BAD_OUT = [(out_under_a_file, r"--out a-file/run: cannot write there \(Not a directory\)"),
           (out_is_a_file, "--out a-file is a file, not a folder"),
           pytest.param(out_read_only, "cannot write there \\(Permission denied\\)",
                        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes "
                                                 "anywhere"))]


@pytest.mark.parametrize("command", ["train", "sweep", "experiments"])
@pytest.mark.parametrize("out,message", BAD_OUT)
def test_an_out_folder_that_cannot_be_written_fails_first(refused, tmp_path, command, out,
                                                          message):
    assert re.search(message, refused(command, "--out", out(tmp_path)))


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no /sys")
@pytest.mark.parametrize("command", ["train", "sweep", "experiments", "evaluate"])
def test_an_out_on_a_read_only_file_system_fails_first(refused, command):
    name = "/sys/no-such-folder/report.json" if command == "evaluate" else "/sys/no-such-run"
    assert f"--out {name}: cannot write there" in refused(command, "--out", name)


@pytest.mark.parametrize("out,message", [
    ("a-file/report.json", "--out a-file/report.json: a-file is a file, not a folder"),
    (".", "--out . is a folder, not a file"),
    ("a-file/x/report.json", "cannot write there (Not a directory)")])
def test_evaluates_out_file_must_be_writable(refused, out, message):
    assert message in refused("evaluate", "--out", out)


def test_a_writable_out_folder_is_checked_without_a_trace(tmp_path):
    check_folder(tmp_path / "new" / "run", "--out new/run")
    assert list(tmp_path.iterdir()) == []  # the folders made for the probe are gone
    (tmp_path / "kept").mkdir()
    check_folder(tmp_path / "kept", "--out kept")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any(
        (tmp_path / "kept").iterdir())
    with pytest.raises(FlagError, match="is a file"):
        check_folder(Path(__file__), "--out x")


@pytest.mark.parametrize("value,message", [
    ("1e300", r"--epochs 1e\+300 is 6.4e\+301 steps .*at most 10\*\*7"),
    ("nan", "--epochs must be a finite number"), ("inf", "--epochs must be a finite number"),
    ("0", "--epochs must be positive"), ("-2", "--epochs must be positive")])
def test_epochs_is_a_sane_positive_number(refused, value, message):
    assert re.search(message, refused("train", "--epochs", value))


@pytest.mark.parametrize("command,flags", [
    ("train", ["--steps", str(10**8)]), ("experiments", ["--steps", str(10**8)])])
def test_steps_are_capped(refused, command, flags):
    assert "--steps must be at most 10**7" in refused(command, *flags)


@pytest.mark.parametrize("command,flag", [
    ("experiments", "--alpha"), ("train", "--alpha"), ("evaluate", "--alpha"),
    ("train", "--lr"), ("train", "--lora-scale"), ("generate", "--top-p"),
    ("generate", "--temperature"), ("vectors", "--norm")])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_float_flags_are_finite(refused, command, flag, value):
    flags = ["--vector", "owl"] if command == "evaluate" else []
    line = refused(command, *flags, flag, value)
    assert f"{flag} must be a" in line and ("finite" in line or "(0, 1]" in line)


def test_evaluate_refuses_an_empty_vector_name(refused):
    assert "--vector must not be empty" in refused("evaluate", "--vector", "")


@pytest.mark.parametrize("flag", ["--alpha", "--layer"])
def test_evaluate_refuses_steering_settings_without_a_vector(refused, flag):
    assert f"{flag} needs --vector" in refused("evaluate", flag, "3")


@pytest.mark.parametrize("command", [["generate.py", "--prompt", "hi", "--temperature", "nan"],
                                     ["experiments.py", "random", "--alpha", "nan"]])
def test_on_the_command_line_it_is_the_commands_own_usage_error(command, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[0].startswith(f"usage: {command[0]}")
    assert run.stderr.splitlines()[-1].startswith(f"{command[0]}: error: {command[-2]} must")
    assert list(tmp_path.iterdir()) == []
