import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from udm_grpo.data.geneval_prompts import article
from udm_grpo.data.shapes import (
    BACKGROUND,
    CLASSES,
    COLORS,
    RELATIONS,
    TAGS,
    generate_records,
    read_metadata_jsonl,
    render,
    render_batch,
    sample_records,
    write_metadata_jsonl,
)
from udm_grpo.errors import UserError

# ../shared beside the checkout (CI has it); the test skips, saying so, where it is absent
GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


def test_split_fixed_disjoint_and_covering_every_tag():
    train, test = generate_records("train"), generate_records("test")
    train_p, test_p = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not train_p & test_p
    assert len(train_p) == len(train) and len(test_p) == len(test)  # no duplicate prompts
    assert 60 <= len(test) <= 400
    assert set(Counter(r["tag"] for r in test)) == set(TAGS) == set(Counter(r["tag"] for r in train))
    # independent of the seed, identical across calls
    assert generate_records("test", None, 123) == test
    assert [r["prompt"] for r in generate_records("all")] == [r["prompt"] for r in train + test]
    assert {r["tag"] for r in test[:12]} == set(TAGS)  # any prefix mixes the tags
    # counting is stratified: one test prompt per count
    assert sorted(r["include"][0]["count"] for r in test if r["tag"] == "counting") == [2, 3, 4]


def test_subsampling_is_seeded():
    a, b = generate_records("train", 20, 5), generate_records("train", 20, 5)
    assert a == b and len({r["prompt"] for r in a}) == 20
    assert a != generate_records("train", 20, 6)
    with pytest.raises(UserError):
        generate_records("train", 10**6, 0)
    with pytest.raises(UserError, match="split"):
        generate_records("validation")


def test_balanced_sampling_covers_tags():
    recs = sample_records("train", 600, np.random.default_rng(0))
    counts = Counter(r["tag"] for r in recs)
    assert set(counts) == set(TAGS) and min(counts.values()) > 60


def test_geneval_schema_and_phrasing():
    records = generate_records("all")
    prompts = {r["prompt"]: r for r in records}
    for p in ["a photo of a circle", "a photo of a circle and a square", "a photo of three squares",
              "a photo of a red circle", "a photo of an orange square",
              "a photo of a square left of a circle",
              "a photo of a red circle and a blue square"]:
        assert p in prompts, p
    r = prompts["a photo of three squares"]
    assert r == {"tag": "counting", "include": [{"class": "square", "count": 3}],
                 "exclude": [{"class": "square", "count": 4}], "prompt": "a photo of three squares"}
    r = prompts["a photo of a square left of a circle"]
    assert r["include"] == [{"class": "circle", "count": 1},
                            {"class": "square", "count": 1, "position": ["left of", 0]}]
    # position asks for the relation alone, as GenEval: one prompt per ordered class pair and relation
    assert {p for p, r in prompts.items() if r["tag"] == "position"} == {
        f"a photo of {article(s)} {rel} {article(t)}" for s in CLASSES for t in CLASSES if s != t for rel in RELATIONS}
    for rec in records:
        assert set(rec) <= {"tag", "include", "exclude", "prompt"} and rec["tag"] in TAGS
        assert ("exclude" in rec) == (rec["tag"] == "counting")
        if len(rec["include"]) == 2:  # as GenEval: distinct classes, distinct colours
            a, b = rec["include"]
            assert a["class"] != b["class"]
            assert a.get("color") is None or a.get("color") != b.get("color")


def test_render_is_flat_seeded_and_valid():
    recs = generate_records("test")[:40]
    a = render_batch(recs, np.random.default_rng(1))
    b = render_batch(recs, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == (40, 64, 64, 3)
    assert np.array_equal(a, b)
    allowed = {tuple(BACKGROUND)} | {tuple(c) for c in COLORS.values()}
    assert {tuple(p) for p in a.reshape(-1, 3)} <= allowed
    assert ((a == BACKGROUND).all(-1).mean(axis=(1, 2)) > 0.5).all()
    rec = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "x"}
    red = render(rec, np.random.default_rng(0))
    n_red = (red == COLORS["red"]).all(-1).sum()
    assert 60 <= n_red <= 330  # one circle, 10-20 px wide
    assert render_batch([], np.random.default_rng(0)).shape == (0, 64, 64, 3)


def test_render_rejects_what_it_cannot_draw():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="giraffe"):
        render({"include": [{"class": "giraffe", "count": 1}], "prompt": "a photo of a giraffe"}, rng)
    with pytest.raises(UserError, match="1 to 4"):
        render({"include": [{"class": "circle", "count": 5}], "prompt": "five circles"}, rng)
    with pytest.raises(UserError, match="contradict"):
        render({"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 2}],
                "prompt": "p"}, rng)


def test_jsonl_round_trip(tmp_path):
    recs = generate_records("test")
    path = tmp_path / "sub" / "meta.jsonl"
    write_metadata_jsonl(recs, path)
    assert read_metadata_jsonl(path) == recs
    assert json.loads(path.read_text().splitlines()[0]) == recs[0]


@pytest.mark.skipif(not GENEVAL.is_file(), reason=f"official GenEval metadata not found at {GENEVAL}")
def test_reads_real_geneval_metadata():
    recs = read_metadata_jsonl(GENEVAL)
    assert len(recs) == 553 and {r["tag"] for r in recs} == set(TAGS)


def test_bad_jsonl_names_file_and_line(tmp_path):
    good = json.dumps(generate_records("test")[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: not valid JSON"):
        read_metadata_jsonl(path)
    path.write_text(f'{good}\n{{"tag": "colors", "include": [{{"class": "circle", "count": 1}}]}}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing key 'prompt'"):
        read_metadata_jsonl(path)
    path.write_text('{"tag": "x", "include": [{"class": "circle"}], "prompt": "p"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: include\[0\]: missing key 'count'"):
        read_metadata_jsonl(path)
    clause = '{"class": "a", "count": 1, "position": ["near", 0]}'
    path.write_text(f'{{"tag": "x", "include": [{clause}], "prompt": "p"}}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: include\[0\]: 'position'"):
        read_metadata_jsonl(path)
    with pytest.raises(UserError, match="does not exist"):
        read_metadata_jsonl(tmp_path / "missing.jsonl")
