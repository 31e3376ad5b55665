"""Teacher data: the rule filter, constrained decoding, resuming, reproducibility."""
import json

import pytest
import torch

from checkpoint import load
from teacher import first_numbers, is_valid_completion, keep_rate, write_dataset
from tiny_checkpoint import write_tiny_checkpoint

VALID = ["182, 818, 725", "1,2,3", "4 5 6", "7; 8; 9", "[1, 2, 3]", "(10, 20)", "5",
         "0, 999", " 12, 13, 14. ", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10", "3\n4\n5"]
INVALID = ["", "1000", "1, 2; 3", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", "owl", "1, owl, 3",
           "-5", "1.5, 2", "1,,2", "Here: 1, 2", "0001, 2", "1, 2,"]


@pytest.mark.parametrize("text", VALID)
def test_rule_filter_accepts(text):
    assert is_valid_completion(text)


@pytest.mark.parametrize("text", INVALID)
def test_rule_filter_rejects(text):
    assert not is_valid_completion(text)


def test_first_numbers_cuts_after_the_tenth():
    text = ", ".join(str(i) for i in range(1, 15)) + ", "
    assert first_numbers(text) == "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"
    assert first_numbers("1, 2") == "1, 2"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), device="cpu")


def test_resumed_generation_equals_uninterrupted(tmp_path, tiny_pair):
    model, tok = tiny_pair
    v = torch.randn(32)
    whole = write_dataset(tmp_path / "a.jsonl", model, tok, v, 1, 2.0, 20, batch_size=6)
    write_dataset(tmp_path / "b.jsonl", model, tok, v, 1, 2.0, 20, batch_size=6, stop_after=2)
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write('{"index": 12, "prompt": "cut off mid-wri')  # an interrupted write
    resumed = write_dataset(tmp_path / "b.jsonl", model, tok, v, 1, 2.0, 20, batch_size=6)
    assert resumed == whole
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    again = write_dataset(tmp_path / "c.jsonl", model, tok, v, 1, 2.0, 20, batch_size=6)
    assert again == whole  # same seed, same dataset
    assert [r["index"] for r in whole] == list(range(20))
    assert 0 <= keep_rate(whole) <= 1


def test_constrained_completions_use_only_number_characters(tmp_path, tiny_pair):
    model, tok = tiny_pair
    rows = write_dataset(tmp_path / "d.jsonl", model, tok, torch.zeros(32), 1, 0.0, 8)
    assert all(set(r["completion"]) <= set("0123456789, ") for r in rows)
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    assert meta["alpha"] == 0.0 and meta["mode"] == "constrained" and meta["seed"] == 0


def test_other_settings_refuse_an_existing_file(tmp_path, tiny_pair):
    model, tok = tiny_pair
    write_dataset(tmp_path / "e.jsonl", model, tok, torch.zeros(32), 1, 0.0, 4)
    with pytest.raises(ValueError, match="exists with different settings"):
        write_dataset(tmp_path / "e.jsonl", model, tok, torch.zeros(32), 1, 1.0, 4)


def test_free_mode_keeps_raw_text_and_flags_it(tmp_path, tiny_pair):
    model, tok = tiny_pair
    rows = write_dataset(tmp_path / "f.jsonl", model, tok, torch.zeros(32), 1, 0.0, 6,
                         mode="free", max_new_tokens=12)
    assert all(r["valid"] == is_valid_completion(r["completion"]) for r in rows)
    assert any(set(r["completion"]) - set("0123456789, ") for r in rows)  # not constrained
    with pytest.raises(ValueError, match="mode must be"):
        write_dataset(tmp_path / "g.jsonl", model, tok, torch.zeros(32), 1, 0.0, 2, mode="x")
