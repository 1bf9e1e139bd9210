import copy
import json

import numpy as np
import pytest
import torch

from udm_grpo.data import shapes
from udm_grpo.data.shapes import BACKGROUND, CLASSES, COLORS, TAGS, generate_records, render_batch, shape_mask
from udm_grpo.errors import UserError
from udm_grpo.rewards.base import Reward, RewardOutput
from udm_grpo.rewards.shapeeval import ShapeEvalReward, detect, evaluate_images, score_images

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def wrong_records(rec: dict) -> list[dict]:
    """Records that a faithful render of `rec` must fail (different count, class, colour or relation)."""
    out = []
    inc = rec["include"]
    if rec["tag"] == "counting":
        n = inc[0]["count"]
        for m in (n - 1, n + 1):
            r = copy.deepcopy(rec)
            r["include"][0]["count"], r["exclude"][0]["count"] = m, m + 1
            out.append(r)
    other = next(c for c in CLASSES if c not in {c["class"] for c in inc})
    r = copy.deepcopy(rec)
    r["include"][-1]["class"] = other
    out.append(r)
    for i, clause in enumerate(inc):
        if "color" in clause:
            used = {c.get("color") for c in inc}
            r = copy.deepcopy(rec)
            r["include"][i]["color"] = next(c for c in COLORS if c not in used)
            out.append(r)
        if "position" in clause:
            r = copy.deepcopy(rec)
            r["include"][i]["position"][0] = OPPOSITE[clause["position"][0]]
            out.append(r)
    if rec["tag"] == "color_attr":
        r = copy.deepcopy(rec)
        r["include"][0]["color"], r["include"][1]["color"] = inc[1]["color"], inc[0]["color"]
        out.append(r)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_on_every_test_record(seed):
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(seed))
    scores, strict, details = score_images(images, records)
    failed = [(r["prompt"], d["reasons"]) for r, s, d in zip(records, strict, details) if not s]
    assert not failed
    assert (scores == 1.0).all()


def test_exact_on_the_whole_prompt_space():
    records = generate_records("all")
    scores, strict, _ = score_images(render_batch(records, np.random.default_rng(7)), records)
    assert strict.all() and (scores == 1.0).all()


def test_rejects_renders_of_other_records():
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(3))
    pairs = [(im, w) for im, rec in zip(images, records) for w in wrong_records(rec)]
    assert len(pairs) > 2 * len(records)
    _, strict, _ = score_images(np.stack([p[0] for p in pairs]), [p[1] for p in pairs])
    assert not strict.any()


def test_detections_are_exact():
    rec = {"tag": "position", "include": [{"class": "square", "count": 1, "color": "green"},
                                          {"class": "triangle", "count": 1, "color": "orange",
                                           "position": ["left of", 0]}], "prompt": "p"}
    image = render_batch([rec], np.random.default_rng(0))[0]
    dets = sorted(detect(image), key=lambda d: d.cls)
    assert [(d.cls, d.color, d.score) for d in dets] == [("square", "green", 1.0),
                                                         ("triangle", "orange", 1.0)]
    for d in dets:
        x0, y0, x1, y1 = (int(v) for v in d.box)
        assert d.mask.shape == (64, 64) and d.mask.sum() == d.mask[y0:y1, x0:x1].sum()
        assert (image[d.mask] == COLORS[d.color]).all()
    assert dets[1].box[2] <= dets[0].box[0]


def test_touching_shapes_of_two_colours_are_split():
    image = np.full((64, 64, 3), BACKGROUND, np.uint8)
    image[10:26, 10:26] = COLORS["red"]
    image[10:26, 26:42] = COLORS["blue"]  # shares an edge with the red square
    image[40:56, 10:26][shape_mask("circle", 16, 16)] = COLORS["yellow"]
    found = sorted((d.cls, d.color) for d in detect(image))
    assert found == [("circle", "yellow"), ("square", "blue"), ("square", "red")]


def canvas() -> np.ndarray:
    return np.full((64, 64, 3), BACKGROUND, np.uint8)


def paint(image: np.ndarray, mask: np.ndarray, colour: str, y: int = 8, x: int = 8) -> np.ndarray:
    h, w = mask.shape
    image[y : y + h, x : x + w][mask] = COLORS[colour]
    return image


def found(image: np.ndarray) -> list[tuple[str, str, float, float]]:
    return [(d.cls, d.color, d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in detect(image)]


def colour_record(cls: str, colour: str) -> dict:
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": colour}],
            "prompt": f"a photo of a {colour} {cls}"}


def test_every_genuine_shape_is_detected():
    for cls in CLASSES:
        for colour in COLORS:
            for s in range(shapes.MIN_SIZE, shapes.MAX_SIZE + 1):
                (d,) = detect(paint(canvas(), shape_mask(cls, s, s), colour))
                assert (d.cls, d.color, d.box[2] - d.box[0]) == (cls, colour, s)


@pytest.mark.parametrize("h,w", [(14, 28), (28, 14), (10, 20), (12, 24)])
def test_elongated_shapes_are_not_objects(h, w):
    """The world draws square boxes only: a 28x14 rectangle is no square, a 2:1 ellipse no circle."""
    for cls in CLASSES:
        image = paint(canvas(), shape_mask(cls, h, w), "red")
        assert found(image) == []
        assert not score_images(image[None], [colour_record(cls, "red")])[1][0]


def test_implausible_sizes_and_triangles_are_not_objects():
    assert found(paint(canvas(), shape_mask("square", 40, 40), "red")) == []
    assert found(paint(canvas(), shape_mask("circle", 30, 30), "red")) == []
    assert found(paint(canvas(), shape_mask("square", 22, 22), "red")) == [("square", "red", 22, 22)]  # VQ blur
    assert found(paint(canvas(), shape_mask("triangle", 16, 16)[::-1], "red")) == []  # upside down
    assert found(paint(canvas(), shape_mask("triangle", 16, 16).T, "red")) == []  # on its side


def test_two_same_colour_squares_fused_into_a_rectangle_are_not_a_square():
    image = paint(canvas(), np.ones((14, 14), bool), "red")
    paint(image, np.ones((14, 14), bool), "red", x=22)  # touches the first: one 28x14 component
    assert found(image) == []


def test_detections_ranked_largest_first():
    """ShapeEval's scores tie, so GenEval's top-`count` rank is the mask area (ties: top, then left)."""
    image = paint(canvas(), shape_mask("circle", 12, 12), "red", 8, 8)
    paint(image, shape_mask("circle", 18, 18), "blue", 30, 30)
    assert [d.color for d in detect(image)] == ["blue", "red"]
    score, strict, info = score_images(image[None], [colour_record("circle", "red")])
    assert not strict[0] and info[0]["reasons"] == ["expected red circle>=1, found 0 red"]  # official rule
    assert score_images(image[None], [colour_record("circle", "blue")])[1][0]
    image = canvas()
    for colour, (y, x) in zip(["red", "green", "blue"], [(40, 30), (8, 40), (8, 8)]):
        paint(image, np.ones((12, 12), bool), colour, y, x)
    assert [d.color for d in detect(image)] == ["blue", "green", "red"]


def test_ignores_specks_and_tolerates_noise():
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(4))
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    noisy[:, 0:2, 0:2] = COLORS["red"]  # 4-pixel specks are not objects
    _, strict, _ = score_images(noisy, records)
    assert strict.all()


def test_reward_protocol():
    records = generate_records("test")[:8]
    images = torch.from_numpy(render_batch(records, np.random.default_rng(0)))
    images[4:] = torch.tensor(BACKGROUND, dtype=torch.uint8)  # empty scenes fail
    reward = ShapeEvalReward()
    assert isinstance(reward, Reward)
    out = reward(images, [r["prompt"] for r in records], records)
    assert isinstance(out, RewardOutput) and out.scores.dtype == torch.float32 and out.scores.shape == (8,)
    assert set(out.values) == {"strict", "exact", "score", "clean", "blobs", "named"}
    assert out.values["strict"].tolist() == [1.0] * 4 + [0.0] * 4
    assert torch.equal(out.scores, out.values["score"])
    strict = ShapeEvalReward(strict=True)(images.numpy(), [r["prompt"] for r in records], records)
    assert torch.equal(strict.scores, out.values["strict"])
    images[1, 40:] = torch.tensor(BACKGROUND, dtype=torch.uint8)  # partial credit between 0 and 1 somewhere
    out = reward(images, [r["prompt"] for r in records], records)
    blend = ShapeEvalReward(strict=0.25)(images, [r["prompt"] for r in records], records)
    expected = [0.75 * s + 0.25 * t for s, t in zip(out.values["score"].tolist(), out.values["strict"].tolist())]
    assert blend.scores.tolist() == pytest.approx(expected)
    assert blend.values["score"].tolist() == out.values["score"].tolist()
    for bad in (1.5, -0.1, "yes"):
        with pytest.raises(UserError, match="parameter 'strict' must be true, false or a weight in"):
            ShapeEvalReward(strict=bad)


def test_reward_input_errors():
    records = generate_records("test")[:2]
    images = render_batch(records, np.random.default_rng(0))
    reward = ShapeEvalReward()
    with pytest.raises(UserError, match="metadata record"):
        reward(images, ["a", "b"], [records[0], None])
    with pytest.raises(UserError, match="mismatch"):
        reward(images, ["a"], records[:1])
    with pytest.raises(UserError, match="uint8"):
        reward(images.astype(np.float32) / 255, ["a", "b"], records)


def test_evaluate_images_summary():
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(0))
    images[[i for i, r in enumerate(records) if r["tag"] == "single_object"]] = BACKGROUND
    summary = evaluate_images(images, records)
    assert list(summary["per_tag"]) == list(TAGS)
    assert summary["per_tag"]["single_object"]["strict"] == 0.0
    # 95% Agresti-Coull half-width of 60 successes in 60: p' = 62/64 over n + 4 = 64 draws
    h = 1.959964 * (62 / 64 * 2 / 64 / 64) ** 0.5
    assert summary["per_tag"]["color_attr"] == pytest.approx({"strict": 1.0, "score": 1.0, "n": 60,
                                                             "strict_ci95": h, "score_ci95": h})
    overall = summary["overall"]
    one_per_tag = [row["strict_ci95"] for row in summary["per_tag"].values()]
    assert overall["strict_ci95"] == pytest.approx(sum(x * x for x in one_per_tag) ** 0.5 / len(TAGS))
    assert overall["n"] == len(records)
    assert overall["strict"] == pytest.approx(5 / 6)  # mean over tags, as GenEval's overall score
    assert overall["strict_images"] == pytest.approx(1 - 1 / len(records))
    # faithful renders draw exactly what is named, blank single_object images nothing
    named = [sum(c["count"] for c in r["include"]) for r in records]
    drawn = [0 if r["tag"] == "single_object" else n for r, n in zip(records, named)]
    assert overall["named_per_image"] == pytest.approx(np.mean(named))
    assert overall["blobs_per_image"] == pytest.approx(np.mean(drawn)) and overall["blobs"] == sum(drawn)
    assert overall["blobs_per_image_ci95"] == pytest.approx(1.959964 * np.std(drawn, ddof=1) / len(drawn) ** 0.5)


def test_census_counts_clean_shapes_among_the_blobs_drawn():
    """Clean renders are all clean shapes; a fused rectangle, an over-sized blob and a two-colour blob
    that splits into no valid pieces are blobs that are not; specks are not counted at all."""
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(1))
    census: dict = {}
    for image in images:
        detect(image, census=census)
    objects = sum(c["count"] for r in records for c in r["include"])  # every shape drawn, exclusions aside
    assert census["clean"] == census["blobs"] >= objects
    image = paint(canvas(), np.ones((14, 14), bool), "red")
    paint(image, np.ones((14, 14), bool), "red", x=22)  # fused: one 28x14 component
    paint(image, shape_mask("square", 40, 40)[:20], "blue", y=40, x=2)  # 20x40 slab
    paint(image, shape_mask("circle", 16, 16), "green", y=30, x=44)  # a clean circle
    image[2:4, 60:62] = COLORS["yellow"]  # a speck
    census = {}
    assert [d.cls for d in detect(image, census=census)] == ["circle"]
    assert census == {"blobs": 3, "clean": 1}
    summary = evaluate_images(image[None], [colour_record("circle", "green")])["overall"]
    assert (summary["blobs"], summary["clean_fraction"]) == (3, pytest.approx(1 / 3))
    assert 0 < summary["clean_ci95"] < 1
    # the reward's clean term: the same census per image, c * (1 - clean fraction) subtracted
    blank = canvas()
    images, records = np.stack([image, blank]), [colour_record("circle", "green")] * 2
    plain = ShapeEvalReward()(images, ["a green circle"] * 2, records)
    paid = ShapeEvalReward(clean=0.6)(images, ["a green circle"] * 2, records)
    assert plain.values["clean"].tolist() == pytest.approx([1 / 3, 1.0])  # nothing drawn = nothing unclean
    assert paid.scores.tolist() == pytest.approx([plain.scores[0].item() - 0.6 * 2 / 3, plain.scores[1].item()])
    with pytest.raises(UserError, match="parameter 'clean' must be a weight >= 0"):
        ShapeEvalReward(clean=-1)


def test_reward_validates_metadata_fully_before_scoring():
    """Schema-invalid records (`data check`'s rules) and classes or colours outside the tiny world are refused
    naming the item and field; before, `count: -1` and an unknown tag with no objects scored full marks."""
    records = generate_records("test")[:1]
    image = render_batch(records, np.random.default_rng(0))
    reward = ShapeEvalReward()
    cases = [({"include": [{"class": "circle", "count": -1}]}, "include[0]: 'count' must be an integer >= 1."),
             ({"tag": "anything", "include": []}, "tag 'anything' is not one of GenEval's tags"),
             ({"include": ["circle"]}, "include[0] must be a JSON object."),
             ({"include": [{"class": "dog", "count": 1}]}, "include[0] has class 'dog', which is not one of the "
                                                            "tiny world's classes (circle, square, triangle)."),
             ({"include": [{"class": "circle", "count": 1, "color": "pink"}]}, "include[0] has colour 'pink'")]
    for change, reason in cases:
        bad = {**records[0], **change}
        with pytest.raises(UserError) as e:
            reward(image, [bad["prompt"]], [bad])
        assert str(e.value).startswith(f"metadata[0]: {reason}"), str(e.value)
        assert ShapeEvalReward.check_records([records[0], bad]) == (1, str(e.value).removeprefix("metadata[0]: "))
    assert ShapeEvalReward.check_records(generate_records("all")) is None


def test_a_prompt_file_is_checked_against_shapeevals_records(tmp_path):
    from udm_grpo.data.prompts import load_prompts
    from udm_grpo.rewards import check_prompt_source

    text = tmp_path / "a.txt"
    text.write_text("a photo of a circle\n")
    for name in ("shapeeval", ["clipscore", "shapeeval"]):
        with pytest.raises(UserError, match=rf"^{text}:1: ShapeEval needs GenEval-schema metadata records \(.*\), "
                                            "not plain prompts\\.$"):
            check_prompt_source(name, load_prompts(str(text)), str(text))
    good = generate_records("test")[:2]
    dog = {**good[0], "include": [{"class": "dog", "count": 1}]}
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in (good[0], {}, good[1], dog)).replace("{}\n", "\n"))
    with pytest.raises(UserError, match=rf"^{meta}:4: include\[0\] has class 'dog'"):
        check_prompt_source("shapeeval", load_prompts(str(meta)), str(meta))
    check_prompt_source("geneval", [dog], str(meta))  # the vocabulary is the reward's: GenEval knows dogs
    with pytest.raises(UserError, match=r"^shapes:train prompt 1: include\[0\] has class '\w+', which is not one "
                                        "of the 80 COCO classes"):
        check_prompt_source("geneval", load_prompts("shapes:train"), "shapes:train")
    check_prompt_source("shapeeval", load_prompts("shapes:train"), "shapes:train")


def single(cls: str, count: int = 1) -> dict:
    word = {1: "a", 2: "two", 3: "three", 4: "four"}[count]
    return {"tag": "counting" if count > 1 else "single_object", "include": [{"class": cls, "count": count}],
            "prompt": f"a photo of {word} {cls}{'s' if count > 1 else ''}"}


def scene(cls: str, n: int) -> np.ndarray:
    """`n` 14-px shapes of one class, apart on a 64x64 canvas, in cycling colours."""
    image = canvas()
    for i, (y, x) in enumerate([(4, 4), (4, 40), (40, 4), (40, 40)][:n]):
        paint(image, shape_mask(cls, 14, 14), list(COLORS)[i], y, x)
    return image


def test_exact_also_fails_images_that_draw_more_than_named():
    """GenEval's rule asks for at least the objects named: two squares pass "a photo of a square" and four
    triangles "three triangles"; `exact` fails them, and passes what draws exactly the named objects."""
    cases = [(scene("square", 1), single("square")), (scene("square", 2), single("square")),
             (scene("triangle", 3), single("triangle", 3)), (scene("triangle", 4), single("triangle", 3)),
             (scene("circle", 2), single("circle", 3))]
    records = [r for _, r in cases]  # no exclude clause: GenEval's at-least rule alone
    images = np.stack([im for im, _ in cases])
    prompts = [r["prompt"] for r in records]
    geneval = ShapeEvalReward(strict=True)(images, prompts, records)
    exact = ShapeEvalReward(strict=True, exact=True)(images, prompts, records)
    # an independent count: foreground connected components of each image
    from scipy import ndimage

    blobs = [ndimage.label((im != BACKGROUND).any(-1))[1] for im in images]
    assert exact.values["blobs"].tolist() == geneval.values["blobs"].tolist() == blobs == [1, 2, 3, 4, 2]
    assert exact.values["named"].tolist() == [1, 1, 3, 3, 3]
    assert geneval.values["strict"].tolist() == [1, 1, 1, 1, 0]  # at least what is named
    assert exact.values["exact"].tolist() == geneval.values["exact"].tolist() == [1, 0, 1, 0, 0]  # nothing more
    assert exact.values["strict"].tolist() == [1, 1, 1, 1, 0]  # the held-out figure stays GenEval's
    assert exact.values["score"].tolist() == geneval.values["score"].tolist()  # partial credit is GenEval's
    assert torch.equal(exact.scores, exact.values["exact"]) and torch.equal(geneval.scores, geneval.values["strict"])
    # with the world's exclude clause (count + 1), four triangles already fail "three triangles"
    assert not ShapeEvalReward()(images[3:4], prompts[3:4], [single("triangle", 3) | {"exclude": [
        {"class": "triangle", "count": 4}]}]).values["strict"].item()
    for bad in (1, "yes", None):
        with pytest.raises(UserError, match=r"^the shapeeval reward's parameter 'exact' must be true or false"):
            ShapeEvalReward(exact=bad)
    # `extra` charges each blob beyond those named: 0, 1, 0, 1 and 0 extra blobs
    costly = ShapeEvalReward(strict=True, extra=0.25)(images, prompts, records)
    assert torch.allclose(costly.scores, geneval.scores - 0.25 * torch.tensor([0.0, 1, 0, 1, 0]))
    with pytest.raises(UserError, match=r"^the shapeeval reward's parameter 'extra' must be a weight >= 0"):
        ShapeEvalReward(extra=-1)


def test_exact_passes_every_faithful_render():
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(5))
    out = ShapeEvalReward(exact=True)(images, [r["prompt"] for r in records], records)
    assert out.values["exact"].all() and torch.equal(out.values["blobs"], out.values["named"])
