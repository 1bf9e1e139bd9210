"""GenEval-schema training prompts: phrasing and schema against GenEval's own evaluation metadata, the
index spaces, the tag mix, exclusion, determinism and `udm-grpo data geneval`."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from udm_grpo.cli import main
from udm_grpo.data.geneval_prompts import (
    COCO_CLASSES,
    NUMBERS,
    SPACE,
    TAG_MIX,
    TAGS,
    allocate,
    canonical_prompt,
    decode,
    generate,
    parse_prompt,
    phrase,
    plural,
    record_line,
)
from udm_grpo.errors import UserError

# ../shared beside the checkout (CI has it); tests that need it skip, saying so, where it is absent
GENEVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval"
EVAL = GENEVAL_DIR / "evaluation_metadata.jsonl"
NAMES = GENEVAL_DIR / "object_names.txt"
needs_eval = pytest.mark.skipif(not EVAL.is_file(), reason=f"GenEval's evaluation metadata not found at {EVAL}")


def eval_lines() -> list[str]:
    return [ln for ln in EVAL.read_text().splitlines() if ln.strip()]


@pytest.mark.skipif(not NAMES.is_file(), reason=f"GenEval's object names not found at {NAMES}")
def test_classes_are_genevals_object_names():
    assert COCO_CLASSES == tuple(ln for ln in NAMES.read_text().splitlines() if ln.strip())


@needs_eval
def test_every_evaluation_line_is_rederived_byte_for_byte():
    lines = eval_lines()
    assert len(lines) == 553
    for line in lines:
        rec = json.loads(line)
        assert phrase(rec) == rec["prompt"], line  # metadata -> prompt
        assert record_line(parse_prompt(rec["prompt"])) == line  # prompt -> metadata, key order, spacing


@needs_eval
def test_plurals_match_genevals_counting_prompts():
    counting = [json.loads(ln) for ln in eval_lines() if '"counting"' in ln]
    assert len(counting) == 80
    for rec in counting:
        c = rec["include"][0]
        assert rec["prompt"] == f"a photo of {NUMBERS[c['count']]} {plural(c['class'])}"
        assert rec["exclude"] == [{"class": c["class"], "count": c["count"] + 1}]


def test_plural_forms():
    assert [plural(n) for n in ("sheep", "bus", "wine glass", "knife")] == ["sheeps", "buses", "wine glasses", "knifes"]
    assert [plural(n, "english") for n in ("sheep", "bus", "knife", "person")] == ["sheep", "buses", "knives", "people"]
    assert phrase(decode("counting", COCO_CLASSES.index("sheep") * 3), "english") == "a photo of two sheep"


def test_index_spaces_are_bijections_onto_the_grammar():
    for tag in TAGS:
        size = SPACE[tag]
        idx = range(size) if size < 10000 else np.random.default_rng(0).choice(size, 3000, replace=False)
        recs = [decode(tag, int(i)) for i in idx]
        assert len({r["prompt"] for r in recs}) == len(recs), tag
        for r in recs:
            assert r["tag"] == tag and parse_prompt(r["prompt"]) == r
    assert SPACE == {"single_object": 80, "two_object": 6320, "counting": 240, "colors": 800,
                     "position": 25280, "color_attr": 568800}
    rec = decode("position", 0)
    assert rec["prompt"] == "a photo of a person left of a bicycle"  # first-named = include[1], relative to [0]
    assert rec["include"] == [{"class": "bicycle", "count": 1},
                              {"class": "person", "count": 1, "position": ["left of", 0]}]


def test_parse_refuses_prompts_outside_the_grammar_and_ignores_case():
    for text in ("a photo of a dragon", "a photo of a cow and a cow", "a photo of a red cow and a red bus",
                 "a photo of a red cow left of a bus", "a photo of five cows", "a cow"):
        assert parse_prompt(text) is None, text
    assert canonical_prompt("A photo of  two Sheep") == "a photo of two sheeps"


def test_allocation_follows_the_mix_and_redistributes_capped_tags():
    counts = allocate(500, TAG_MIX, SPACE)
    assert sum(counts.values()) == 500
    assert all(abs(counts[t] - 500 * TAG_MIX[t] / 553) < 1 for t in TAGS)
    assert allocate(553, TAG_MIX, SPACE) == TAG_MIX  # the evaluation's own proportions, exactly
    capped = allocate(2000, TAG_MIX, {**SPACE, "counting": 10})
    assert capped["counting"] == 10 and sum(capped.values()) == 2000
    with pytest.raises(UserError, match="exceeds the 1120 distinct prompts"):
        allocate(1121, {"single_object": 1, "colors": 1, "counting": 1}, SPACE)


def test_generated_records_are_distinct_exclude_and_follow_the_mix():
    recs, capacity = generate(500, seed=1)
    assert len({r["prompt"] for r in recs}) == 500
    counts = Counter(r["tag"] for r in recs)
    assert all(abs(counts[t] - 500 * TAG_MIX[t] / 553) < 1 for t in TAGS)
    assert all(phrase(r) == r["prompt"] for r in recs)
    singles = [phrase(decode("single_object", i)) for i in range(80)]
    mix = {"single_object": 1, "colors": 1}
    recs, capacity = generate(300, seed=1, mix=mix, exclude=singles[:75], distinct=True)
    assert capacity["single_object"] == 5 and Counter(r["tag"] for r in recs) == {"single_object": 5, "colors": 295}
    assert not {r["prompt"] for r in recs} & set(singles[:75]) and len({r["prompt"] for r in recs}) == 300
    # By default the mix holds: the 5 remaining single objects repeat, 30 times each.
    recs, _ = generate(300, seed=1, mix=mix, exclude=singles[:75])
    assert Counter(r["tag"] for r in recs) == {"single_object": 150, "colors": 150}
    assert set(Counter(r["prompt"] for r in recs if r["tag"] == "single_object").values()) == {30}
    assert not {r["prompt"] for r in recs} & set(singles[:75])
    # A tag with nothing left gets nothing either way; the others share its weight.
    recs, _ = generate(100, seed=1, mix=mix, exclude=singles)
    assert Counter(r["tag"] for r in recs) == {"colors": 100}


@needs_eval
def test_no_evaluation_prompt_is_generated_even_in_english_plurals():
    evaluation = [json.loads(ln)["prompt"] for ln in eval_lines()]
    recs, capacity = generate(2000, seed=0, exclude=evaluation, style="english", distinct=True)
    assert capacity["single_object"] == 0 and capacity["counting"] == 160
    assert not {canonical_prompt(r["prompt"]) for r in recs} & set(evaluation)
    assert Counter(r["tag"] for r in recs)["counting"] == 160
    recs, _ = generate(2000, seed=0, exclude=evaluation, style="english")
    assert not {canonical_prompt(r["prompt"]) for r in recs} & set(evaluation)
    counts = Counter(r["tag"] for r in recs)  # GenEval's mix without single_object, repeats included
    assert "single_object" not in counts and all(abs(counts[t] - 2000 * TAG_MIX[t] / 473) < 1 for t in counts)


def run_geneval(tmp_path, name, *extra):
    return main(["data", "geneval", "-o", str(tmp_path / name), "-n", "300", *extra])


def test_cli_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    assert run_geneval(tmp_path, "a.jsonl", "--seed", "3") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not checked" in err[0] and "--exclude" in err[0]
    assert run_geneval(tmp_path, "b.jsonl", "--seed", "3") == 0
    assert run_geneval(tmp_path, "c.jsonl", "--seed", "4") == 0
    a, b, c = ((tmp_path / f"{x}.jsonl").read_bytes() for x in "abc")
    assert a == b and a != c and a.count(b"\n") == 300
    capsys.readouterr()
    assert run_geneval(tmp_path, "a.jsonl", "--seed", "4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.jsonl already exists" in err[0] and "--force" in err[0]
    assert (tmp_path / "a.jsonl").read_bytes() == a
    assert run_geneval(tmp_path, "a.jsonl", "--seed", "4", "--force") == 0
    assert (tmp_path / "a.jsonl").read_bytes() == c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]  # no .tmp left


@pytest.mark.parametrize("args, needle", [
    (["--mix", "position=1,dragons=2"], "--mix item 'dragons=2'"),
    (["--mix", "position=1", "-n", "30000", "--distinct"], "exceeds the 25280 distinct prompts"),
    (["--exclude", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    assert main(["data", "geneval", "-o", str(tmp_path / "x.jsonl"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x.jsonl").exists()


@needs_eval
def test_cli_with_exclude_writes_no_evaluation_prompt(tmp_path, capsys):
    assert main(["data", "geneval", "-o", str(tmp_path / "t.jsonl"), "-n", "1000", "--exclude", str(EVAL)]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and "excluding 553 GenEval prompts" in out.err
    recs = [json.loads(ln) for ln in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(recs) == 1000 and not {r["prompt"] for r in recs} & {json.loads(ln)["prompt"] for ln in eval_lines()}
    assert "single_object 0 (all; 80 excluded)" in out.out
