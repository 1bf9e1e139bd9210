import numpy as np
import pytest

from udm_grpo.rewards.geneval_rules import Detection, evaluate, filter_detections, relative_position


def box(cx, cy, s=10):
    return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)


def det(cls, cx=32, cy=32, color=None, score=1.0, s=10):
    return Detection(cls, color, box(cx, cy, s), score)


COUNT3 = {"tag": "counting", "include": [{"class": "square", "count": 3}],
          "exclude": [{"class": "square", "count": 4}], "prompt": "a photo of three squares"}


def pos_record(rel):
    include = [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": [rel, 0]}]
    return {"tag": "position", "include": include, "prompt": "p"}


@pytest.mark.parametrize("rel,offset", [("left of", (-20, 0)), ("right of", (20, 0)),
                                        ("above", (0, -20)), ("below", (0, 20))])
def test_each_relation(rel, offset):
    a, b = box(32 + offset[0], 32 + offset[1]), box(32, 32)
    assert relative_position(a, b) == {rel}
    square, circle = det("square", 32 + offset[0], 32 + offset[1]), det("circle")
    score, strict, _ = evaluate(pos_record(rel), [circle, square])
    assert strict and score == 1.0
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
    score, strict, info = evaluate(pos_record(opposite), [circle, square])
    assert not strict and info["terms"] == [1.0, 1.0, 0.0]


def test_relation_margins_and_sets():
    assert relative_position(box(30, 32), box(32, 32)) == set()  # within 0.1 * (sizes)
    assert relative_position(box(10, 10), box(40, 40)) == {"left of", "above"}  # diagonal: both
    assert relative_position(box(10, 30), box(40, 40)) == {"left of"}


def test_position_needs_target():
    score, strict, info = evaluate(pos_record("left of"), [det("square", 10)])
    assert not strict and "no target" in " ".join(info["reasons"])
    assert info["terms"] == [0.0, 1.0, 0.0] and score == pytest.approx(1 / 3)


def test_counting_over_and_under():
    def run(n):
        return evaluate(COUNT3, [det("square", 8 + 12 * i) for i in range(n)])

    score, strict, _ = run(3)
    assert strict and score == 1.0
    score, strict, info = run(2)  # under: include fails, exclude holds
    assert not strict and info["terms"] == pytest.approx([2 / 3, 1.0])
    score, strict, info = run(4)  # over: exclude fails (official rule)
    assert not strict and info["terms"] == pytest.approx([2 / 3, 0.0])
    score, strict, info = run(10)  # the reference's count term would be 1 - 7/3 < 0
    assert not strict and score == 0.0 and info["terms"] == [0.0, 0.0]
    assert run(0)[0] == pytest.approx(0.5)  # exclude holds


def test_official_at_least_semantics_without_exclude():
    rec = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
           "prompt": "a photo of a circle and a square"}
    score, strict, _ = evaluate(rec, [det("circle", 10), det("circle", 30), det("square", 50)])
    assert strict and score == pytest.approx(0.5)  # extra objects cost partial credit only
    score, strict, _ = evaluate(rec, [det("circle", 10), det("triangle", 50)])
    assert not strict and score == pytest.approx(0.5)


def test_colours():
    rec = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "p"}
    assert evaluate(rec, [det("circle", color="red")])[:2] == (1.0, True)
    score, strict, info = evaluate(rec, [det("circle", color="blue")])
    assert not strict and info["terms"] == [1.0, 0.0]
    two = [det("circle", 10, color="blue", score=0.9), det("circle", 40, color="red", score=0.5)]
    score, strict, info = evaluate(rec, two)
    assert not strict and info["terms"] == [0.0, 0.0]  # official: the top-1 circle is blue; count term 0
    assert "found 0 red" in info["reasons"][0]
    assert evaluate(rec, two[::-1])[1] is False  # the rank is the score, not the list order
    assert evaluate(rec, [two[0], det("circle", 40, color="red", score=0.95)])[1]
    rec2 = {"tag": "counting", "include": [{"class": "square", "count": 2, "color": "green"}], "prompt": "p"}
    score, strict, info = evaluate(rec2, [det("square", 10, color="green"), det("square", 40, color="red")])
    assert not strict and info["terms"] == [1.0, 0.5]


def test_colour_judges_the_top_count_detections():
    """Official GenEval: the colour of the `count` highest-scoring detections of the class, not of any."""
    rec = {"tag": "counting", "include": [{"class": "square", "count": 2, "color": "green"}], "prompt": "p"}
    top_two_green = [det("square", 10, color="green", score=0.9), det("square", 30, color="green", score=0.8),
                     det("square", 50, color="red", score=0.7)]
    assert evaluate(rec, top_two_green)[1]
    second_red = [det("square", 10, color="green", score=0.9), det("square", 30, color="red", score=0.8),
                  det("square", 50, color="green", score=0.7)]  # two green squares, but not the top two
    score, strict, info = evaluate(rec, second_red)
    assert not strict and info["reasons"] == ["expected green square>=2, found 1 green"]
    tied = [det("square", 10, color="red"), det("square", 30, color="green"), det("square", 50, color="green")]
    assert not evaluate(rec, tied)[1] and evaluate(rec, tied[::-1])[1]  # ties keep the detector's order


def test_position_uses_the_top_count_detections():
    rec = {"tag": "position", "include": [{"class": "circle", "count": 1},
                                          {"class": "square", "count": 1, "position": ["left of", 0]}],
           "prompt": "p"}
    circle = det("circle", 32)
    assert evaluate(rec, [circle, det("square", 10, score=0.9), det("square", 54, score=0.5)])[1]
    assert not evaluate(rec, [circle, det("square", 10, score=0.5), det("square", 54, score=0.9)])[1]


def test_colour_and_position_clause_uses_matching_objects():
    rec = {"tag": "position", "include": [
        {"class": "triangle", "count": 1, "color": "green"},
        {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}], "prompt": "p"}
    ok = [det("triangle", 50, color="green"), det("square", 10, color="blue")]
    assert evaluate(rec, ok)[:2] == (1.0, True)
    wrong_side = [det("triangle", 10, color="green"), det("square", 50, color="blue")]
    score, strict, info = evaluate(rec, wrong_side)
    assert not strict and info["terms"] == [1.0, 1.0, 1.0, 1.0, 0.0]
    wrong_colour = [det("triangle", 50, color="green"), det("square", 10, color="red")]
    score, strict, info = evaluate(rec, wrong_colour)
    assert not strict and len(info["terms"]) == 5  # the number of terms never depends on the outcome


def test_score_bounds_and_consistency_fuzz():
    rng = np.random.default_rng(0)
    classes, colours = ["circle", "square", "triangle"], ["red", "blue", "green"]
    attr = [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]
    records = [COUNT3, pos_record("above"), {"tag": "color_attr", "include": attr, "prompt": "p"}]
    for _ in range(500):
        dets = [det(classes[rng.integers(3)], *rng.uniform(0, 64, 2), color=colours[rng.integers(3)],
                    score=float(rng.uniform())) for _ in range(rng.integers(0, 6))]
        for rec in records:
            score, strict, info = evaluate(rec, dets)
            assert 0.0 <= score <= 1.0 and all(0.0 <= t <= 1.0 for t in info["terms"])
            if score == 1.0:
                assert strict


def test_filter_detections():
    dets = [det("circle", score=0.95), det("circle", score=0.5), det("circle", score=0.2)]
    assert [d.score for d in filter_detections(dets, "colors")] == [0.95, 0.5]
    assert [d.score for d in filter_detections(dets, "counting")] == [0.95]
    many = [det("square", score=0.5 + i / 100) for i in range(20)]
    kept = filter_detections(many, max_per_class=16)
    assert len(kept) == 16 and min(d.score for d in kept) == pytest.approx(0.54)
