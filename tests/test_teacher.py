"""Teacher data: the rule filter, constrained decoding, resuming, reproducibility."""
import json

import pytest
import torch

from loaders.checkpoint import load
from teacher import (NumberListGrammar, Teacher, is_valid_completion, keep_rate,
                     write_dataset)
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


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), device="cpu")


def test_resumed_generation_equals_uninterrupted(tmp_path, tiny_pair):
    model, tok = tiny_pair
    v = torch.randn(32)
    whole = write_dataset(tmp_path / "a.jsonl", model, tok, Teacher(v, 1, 2.0), 20, batch_size=6)
    write_dataset(tmp_path / "b.jsonl", model, tok, Teacher(v, 1, 2.0), 20, batch_size=6,
                  stop_after=2)
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write('{"index": 12, "prompt": "cut off mid-wri')  # an interrupted write
    resumed = write_dataset(tmp_path / "b.jsonl", model, tok, Teacher(v, 1, 2.0), 20,
                            batch_size=6)
    assert resumed == whole
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    again = write_dataset(tmp_path / "c.jsonl", model, tok, Teacher(v, 1, 2.0), 20, batch_size=6)
    assert again == whole  # same seed, same dataset
    assert [r["index"] for r in whole] == list(range(20))
    assert 0 <= keep_rate(whole) <= 1


def test_constrained_completions_use_only_number_characters(tmp_path, tiny_pair):
    model, tok = tiny_pair
    rows = write_dataset(tmp_path / "d.jsonl", model, tok, Teacher(torch.zeros(32), 1, 0.0), 8)
    assert all(set(r["completion"]) <= set("0123456789,; ") for r in rows)
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    assert meta["alpha"] == 0.0 and meta["mode"] == "constrained" and meta["seed"] == 0


def test_other_settings_refuse_an_existing_file(tmp_path, tiny_pair):
    model, tok = tiny_pair
    write_dataset(tmp_path / "e.jsonl", model, tok, Teacher(torch.zeros(32), 1, 0.0), 4)
    with pytest.raises(ValueError, match="exists with different settings"):
        write_dataset(tmp_path / "e.jsonl", model, tok, Teacher(torch.zeros(32), 1, 1.0), 4)


def test_free_mode_keeps_raw_text_and_flags_it(tmp_path, tiny_pair):
    model, tok = tiny_pair
    rows = write_dataset(tmp_path / "f.jsonl", model, tok, Teacher(torch.zeros(32), 1, 0.0), 6,
                         mode="free", max_new_tokens=12)
    assert all(r["valid"] == is_valid_completion(r["completion"]) for r in rows)
    assert any(set(r["completion"]) - set("0123456789, ") for r in rows)  # not constrained
    with pytest.raises(ValueError, match="mode must be"):
        write_dataset(tmp_path / "g.jsonl", model, tok, Teacher(torch.zeros(32), 1, 0.0), 2,
                      mode="x")


def test_grammar_constrained_teacher_only_writes_lists_the_filter_accepts(tmp_path, tiny_pair):
    """Many seeds, a strongly steered tiny model: every completion passes the rule filter,
    and the lists use all three separators and reach the 3-digit limit (the 10-number limit
    is walked through in the next test)."""
    model, tok = tiny_pair
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    rows = []
    for seed in range(6):
        rows += write_dataset(tmp_path / f"g{seed}.jsonl", model, tok,
                              Teacher(v, 1, 8.0 * seed), 32, seed=seed, batch_size=16)
    assert all(r["valid"] for r in rows), [r["completion"] for r in rows if not r["valid"]]
    texts = [r["completion"] for r in rows]
    assert {", ", ",", " ", ";"} <= {s for t in texts for s in (", ", ",", " ", ";") if s in t}
    assert max(len(n) for t in texts for n in t.replace(",", " ").replace(";", " ").split()) == 3


def test_the_decoder_writes_the_separator_its_prompt_asks_for(tmp_path, tiny_pair):
    """A prompt that asks for commas gets "," or ", ", semicolons ";" or "; ", spaces " "."""
    import re
    from prompts import requested_separators
    model, tok = tiny_pair
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    # the tiny random model writes ", " in about 1 of 20 comma lists (measured: 257 of 4,870
    # lists over 240 seeds), so 3 x 200 rows (about 200 comma lists) expect about 10 of them
    rows = []
    for seed in range(3):
        rows += write_dataset(tmp_path / f"s{seed}.jsonl", model, tok, Teacher(v, 1, 4.0 * seed),
                              200, seed=seed, batch_size=50)
    asked = {}
    for r in rows:
        used = set(re.findall(r"(?<=\d)\D+(?=\d)", r["completion"]))
        allowed = requested_separators(r["prompt"])
        assert used <= set(allowed), (r["prompt"], r["completion"])
        asked.setdefault(allowed, set()).update(used)
    assert set(asked) == {(",", ", "), (";", "; "), (" ",)} and all(asked.values())
    assert asked[(",", ", ")] == {",", ", "}  # where the prompt leaves a choice, both occur
    assert requested_separators("no format sentence") == (",", ", ", " ", ";", "; ")


def test_grammar_with_one_rows_separators(tiny_pair):
    """Told that a row's prompt asks for semicolons, the grammar offers ';' after a number
    and never ',' or ' ' on its own."""
    _, tok = tiny_pair
    g = NumberListGrammar(tok, 2, tok.n_vocab, separators=[(";", "; "), (" ",)])
    semicolon, comma, space = tok.encode(";")[0], tok.encode(",")[0], tok.encode(" ")[0]
    digits, end = set(g.digits), tok.eos_id
    g.advance([tok.encode("4")[0]] * 2)
    allowed = [set(row.nonzero().flatten().tolist()) for row in g.allowed()]
    assert allowed == [digits | {semicolon, end}, digits | {space, end}]
    g.advance([semicolon, space])
    allowed = [set(row.nonzero().flatten().tolist()) for row in g.allowed()]
    assert allowed == [digits | {space}, digits]
    assert comma not in allowed[0] | allowed[1]
    with pytest.raises(ValueError, match="separator sets for"):
        NumberListGrammar(tok, 3, tok.n_vocab, separators=[(",",)])


def test_grammar_allows_exactly_the_rule_filters_next_tokens(tiny_pair):
    """Walk the grammar through '12, 345, 6': at each step the allowed set is as stated."""
    _, tok = tiny_pair
    g = NumberListGrammar(tok, 1, tok.n_vocab)
    digits, comma, space, end = set(g.digits), tok.encode(",")[0], tok.encode(" ")[0], tok.eos_id

    def allowed():
        return set(g.allowed()[0].nonzero().flatten().tolist())

    def feed(text):  # one row: one token per step
        for t in tok.encode(text):
            g.advance([t])

    assert allowed() == digits                              # a list starts with a digit
    for text, expected in [("1", digits | {comma, space, end}), ("2", digits | {comma, space, end}),
                           (",", digits | {space}), (" ", digits), ("3", digits | {comma, end}),
                           ("4", digits | {comma, end}), ("5", {comma, end}), (",", {space}),
                           (" ", digits)]:
        feed(text)
        assert allowed() == expected, text
    for _ in range(7):                                      # numbers 3 to 9, then the 10th
        feed("7, ")
    feed("8")
    assert allowed() == digits | {end}                      # no separator after the 10th
    g.advance([end])
    assert allowed() == {end}
