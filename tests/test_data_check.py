"""`udm-grpo data check` and `validate_records`: per-task schema errors (exit 2, one line naming file:line),
duplicates and overlap (warnings; exit 1 with --strict), tag counts and lengths."""

import json
from pathlib import Path

import pytest

from udm_grpo.cli import main
from udm_grpo.data.check import check_file, format_report, geneval_record_error, validate_records, world_vocabulary
from udm_grpo.data.geneval_prompts import decode, generate, record_line
from udm_grpo.data.prompts import load_prompts
from udm_grpo.errors import UserError

EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"

GOOD = [decode("colors", 7), decode("counting", 54), decode("position", 11)]  # 54: "a photo of two sheeps"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def check(capsys, *args) -> tuple[int, str, list[str]]:
    code = main(["data", "check", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, [ln for ln in out.err.splitlines() if ln.strip()]


def test_generated_metadata_passes_with_a_report(tmp_path, capsys):
    recs, _ = generate(200, seed=5)
    path = write(tmp_path / "t.jsonl", [record_line(r) for r in recs])
    code, out, err = check(capsys, path, "--task", "geneval", "--strict")
    assert code == 0 and not err
    assert "200 prompts, valid for the geneval task" in out and "duplicates: none" in out
    assert "position 36 (18.0%)" in out and "not checked (pass --eval FILE)" in out and "no warnings" in out


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('{"tag": "colors", "include": [{"class": "dragon", "count": 1}], "prompt": "p"}', "'dragon'"),
    ('{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "teal"}], "prompt": "p"}', "'teal'"),
    ('{"tag": "shapes", "include": [{"class": "cow", "count": 1}], "prompt": "p"}', "tag 'shapes'"),
    ('{"tag": "colors", "include": [{"class": "cow", "count": 0}], "prompt": "p"}', "'count'"),
    ('{"tag": "colors", "include": [], "prompt": "p"}', "'include' is empty"),
    ('{"tag": "colors", "include": [{"class": "cow", "count": 1}], "prompt": " "}', "blank"),
    ('{"tag": "position", "include": [{"class": "cow", "count": 1, "position": ["near", 0]}], "prompt": "p"}',
     "'position'"),
])
def test_a_broken_line_is_one_sentence_naming_file_and_line(tmp_path, capsys, line, needle):
    path = write(tmp_path / "bad.jsonl", [record_line(GOOD[0]), "", line, record_line(GOOD[1])])
    code, out, err = check(capsys, path, "--task", "geneval")
    assert code == 2 and not out
    assert len(err) == 1 and "bad.jsonl:3: " in err[0] and needle in err[0], err
    assert "more line" not in err[0]


def test_further_errors_are_counted(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", ["{x", record_line(GOOD[0]), "[]", '{"prompt": 3}'])
    code, _, err = check(capsys, path, "--task", "geneval")
    assert code == 2 and len(err) == 1
    assert "bad.jsonl:1: not valid JSON" in err[0] and err[0].endswith("(and 2 more lines with errors).")


def test_duplicates_and_overlap_are_warnings_and_fail_with_strict(tmp_path, capsys):
    lines = [record_line(r) for r in GOOD]
    english = dict(GOOD[1], prompt="a photo of two sheep")  # the same image asked in English plurals
    path = write(tmp_path / "t.jsonl", lines + [lines[0], record_line(english)])
    evaluation = write(tmp_path / "eval.txt", ["unrelated", "", GOOD[2]["prompt"]])
    code, out, err = check(capsys, path, "--task", "geneval", "--eval", evaluation)
    assert code == 0 and not err
    assert "duplicates: 2 lines repeat an earlier prompt" in out
    assert f"{path}:4 repeats line 1, {path}:5 repeats line 2" in out
    assert f"1 prompt is an evaluation prompt ({path}:3 = {evaluation}:3)" in out and "2 warnings" in out
    assert check(capsys, path, "--task", "geneval", "--eval", evaluation, "--strict")[0] == 1


def test_text_prompts_for_pickscore_and_ocr(tmp_path, capsys):
    path = write(tmp_path / "p.txt", ['a sign that says "open"', "", "a cat on a mat"])
    code, out, _ = check(capsys, path, "--task", "pickscore")
    assert code == 0 and "2 prompts, valid for the pickscore task" in out and "tags" not in out
    code, out, err = check(capsys, path, "--task", "ocr")
    assert code == 2 and len(err) == 1 and "p.txt:3: the prompt 'a cat on a mat' quotes no text" in err[0]
    code, _, err = check(capsys, path, "--task", "geneval")
    assert code == 2 and "not a" not in err[0] and ".jsonl" in err[0]
    empty = write(tmp_path / "e.txt", ["", "  "])
    code, _, err = check(capsys, empty, "--task", "pickscore")
    assert code == 2 and "holds no prompts" in err[0]


def test_report_statistics(tmp_path):
    path = write(tmp_path / "p.txt", ["one", "one two three", "one two"])
    report = check_file(path, "pickscore")
    assert (report.prompts, list(report.words), list(report.chars)) == (3, [1, 3, 2], [3, 13, 7])
    assert "words per prompt: min 1, median 2, mean 2.0, max 3; characters: min 3, mean 7.7, max 13" in \
        format_report(report)


def test_validate_records_names_the_file_line_of_the_first_bad_record(tmp_path):
    path = write(tmp_path / "t.jsonl", [record_line(GOOD[0]), "", json.dumps({"prompt": "a cow"}),
                                        json.dumps({"prompt": "x", "tag": "colors", "include": []})])
    records = load_prompts(str(path))
    validate_records(records, "pickscore", str(path))
    with pytest.raises(UserError, match=r"t\.jsonl:3: missing key 'tag' \(and 1 more line with errors\)\.$"):
        validate_records(records, "geneval", str(path))
    with pytest.raises(UserError, match=r"shapes:train prompt 1: .*quotes no text"):
        validate_records(load_prompts("shapes:train")[:2], "ocr", "shapes:train")


@pytest.mark.skipif(not EVAL.is_file(), reason=f"GenEval's evaluation metadata not found at {EVAL}")
def test_genevals_own_metadata_is_valid_and_fully_overlaps_itself():
    report = check_file(EVAL, "geneval", EVAL)
    assert report.prompts == 553 and report.duplicates == 0 and report.overlap == 553
    assert report.tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                           "color_attr": 100}


def test_one_rule_set_with_the_vocabulary_as_a_parameter():
    """`data check --task geneval` and the GenEval-rule rewards share `geneval_record_error`; only the classes
    and colours differ (GenEval's 80 classes and 10 colours, or the tiny world's for ShapeEval)."""
    from udm_grpo.data import shapes
    from udm_grpo.rewards.geneval import GenEvalReward
    from udm_grpo.rewards.shapeeval import ShapeEvalReward

    cow = {"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "pink"}], "prompt": "a pink cow"}
    circle = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}], "prompt": "p"}
    assert geneval_record_error(cow, "x") is None and GenEvalReward.check_records([cow]) is None
    assert geneval_record_error(circle, "x") == (
        "x: include[0] has class 'circle', which is not one of the 80 COCO classes.")
    world = ", ".join(shapes.COLORS)
    assert geneval_record_error(circle, "x", world_vocabulary()) == (
        f"x: include[0] has colour 'pink', which is not one of {world}.")
    assert ShapeEvalReward.check_records([circle]) == (0, f"include[0] has colour 'pink', which is not one of {world}.")
    for rec in ({**cow, "include": [{"class": "cow", "count": True}]}, {**cow, "tag": None}, {**cow, "prompt": " "}):
        error = geneval_record_error(rec, "f.jsonl:1")
        assert error and error.startswith("f.jsonl:1: ")
        for hook in (GenEvalReward.check_records, ShapeEvalReward.check_records):
            assert hook([rec]) == (0, error.removeprefix("f.jsonl:1: "))
