"""The tiny world: 64x64 scenes of 1-4 flat-coloured shapes, and a GenEval-style prompt grammar.

Records use the GenEval metadata schema::

    {"tag": "counting", "include": [{"class": "square", "count": 3}],
     "exclude": [{"class": "square", "count": 4}], "prompt": "a photo of three squares"}

Tags and phrasing (as in GenEval; two-object prompts name two distinct classes and, when coloured,
two distinct colours):

- single_object  "a photo of a circle"
- two_object     "a photo of a circle and a square"
- counting       "a photo of three squares"            (2-4; excludes count + 1)
- colors         "a photo of a red circle"
- position       "a photo of a square left of a circle" (uncoloured, as GenEval: position asks for the
                 relation alone; binding colours to objects is color_attr's test)
- color_attr     "a photo of a red circle and a blue square"

The prompt space is finite. The split is fixed (independent of any seed): within each tag, prompts
are ordered by the SHA-256 of their text and the first third (at most `TEST_CAP`) form the test split;
counting is stratified by count. Train and test share no prompt. Each split lists its prompts
round-robin over tags (hash order within a tag), so any prefix of it mixes all tags.

`render` draws a random scene that satisfies a record: exactly the included objects (so every
count and exclude clause holds), non-overlapping axis-aligned shapes 10-20 px wide on a light
background, colours as named (random palette colours otherwise), and position clauses satisfied with
a margin under GenEval's relation rule.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import UserError
from .geneval_prompts import article as _a
from .geneval_prompts import clause as _clause
from .geneval_prompts import position_offset

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 210),
    "yellow": (240, 220, 50),
    "purple": (135, 60, 180),
    "orange": (240, 130, 20),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 10, 20
GAP = 3  # minimum free pixels between the boxes of two shapes
POSITION_MARGIN = 0.6  # rendered relations hold with |normalised offset| > this (GenEval needs > 0.5)
TEST_FRACTION, TEST_CAP = 1 / 3, 80


# ---- prompt grammar -----------------------------------------------------------------------------
def _named(cls: str, color: str | None) -> str:
    return _a(f"{color} {cls}" if color else cls)


def _enumerate() -> dict[str, list[dict]]:
    """Every record of the grammar, per tag, in a canonical order."""
    out: dict[str, list[dict]] = {t: [] for t in TAGS}
    pairs = list(itertools.permutations(CLASSES, 2))
    cpairs = list(itertools.permutations(COLORS, 2))
    for c in CLASSES:
        out["single_object"].append({"tag": "single_object", "include": [_clause(c)],
                                     "prompt": f"a photo of {_a(c)}"})
    for a, b in pairs:
        out["two_object"].append({"tag": "two_object", "include": [_clause(a), _clause(b)],
                                  "prompt": f"a photo of {_a(a)} and {_a(b)}"})
    for n, c in itertools.product(NUMBERS, CLASSES):
        out["counting"].append({"tag": "counting", "include": [_clause(c, n)], "exclude": [_clause(c, n + 1)],
                                "prompt": f"a photo of {NUMBERS[n]} {c}s"})
    for c, col in itertools.product(CLASSES, COLORS):
        out["colors"].append({"tag": "colors", "include": [_clause(c, 1, col)],
                              "prompt": f"a photo of {_named(c, col)}"})
    for (target, subject), rel in itertools.product(pairs, RELATIONS):
        out["position"].append({"tag": "position", "include": [_clause(target), _clause(subject, 1, None, (rel, 0))],
                                "prompt": f"a photo of {_a(subject)} {rel} {_a(target)}"})
    for (a, b), (ca, cb) in itertools.product(pairs, cpairs):
        out["color_attr"].append({"tag": "color_attr", "include": [_clause(a, 1, ca), _clause(b, 1, cb)],
                                  "prompt": f"a photo of {_named(a, ca)} and {_named(b, cb)}"})
    return out


def _digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def _key(record: dict) -> str:
    return _digest(record["prompt"])


def _interleave(per_tag: list[list[dict]]) -> list[dict]:
    """Round-robin over tags, so that every prefix of a split mixes all tags."""
    out: list[dict] = []
    for i in range(max(len(g) for g in per_tag)):
        out += [g[i] for g in per_tag if i < len(g)]
    return out


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[dict, ...]]:
    train: list[list[dict]] = []
    test: list[list[dict]] = []
    for tag, records in _enumerate().items():
        strata: dict[object, list[dict]] = {}
        for r in sorted(records, key=_key):
            strata.setdefault(r["include"][0]["count"] if tag == "counting" else None, []).append(r)
        quota = min(TEST_CAP, max(1, int(len(records) * TEST_FRACTION)))
        per = max(1, quota // len(strata))
        test.append(sorted((r for g in strata.values() for r in g[:per]), key=_key))
        train.append(sorted((r for g in strata.values() for r in g[per:]), key=_key))
    tr, te = _interleave(train), _interleave(test)
    return {"train": tuple(tr), "test": tuple(te), "all": tuple(tr + te)}


def generate_records(split: str, n: int | None = None,
                     seed: int | np.random.Generator | None = 0) -> list[dict]:
    """GenEval-schema records of a split ("train", "test" or "all").

    n=None: the whole split in its canonical order (the seed is unused). Otherwise n distinct records
    drawn at random with `seed`. The split itself never depends on the seed.
    """
    if split not in ("train", "test", "all"):
        raise UserError(f"unknown tiny-world split {split!r}; expected 'train', 'test' or 'all'.")
    records = _splits()[split]
    if n is None:
        return copy.deepcopy(list(records))
    if not 0 <= n <= len(records):
        raise UserError(f"asked for {n} records but the tiny-world {split} split holds {len(records)}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return [copy.deepcopy(records[i]) for i in rng.choice(len(records), size=n, replace=False)]


def sample_records(split: str, n: int, rng: np.random.Generator, balance_tags: bool = True) -> list[dict]:
    """n records drawn with replacement; with `balance_tags` a uniform tag first, then a uniform record
    of that tag (the raw splits are dominated by position and color_attr prompts)."""
    records = generate_records(split)
    if not balance_tags:
        return [records[i] for i in rng.integers(0, len(records), n)]
    by_tag: dict[str, list[dict]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
    tags = sorted(by_tag, key=TAGS.index)
    out = []
    for t in rng.integers(0, len(tags), n):
        group = by_tag[tags[t]]
        out.append(group[rng.integers(len(group))])
    return out


def all_prompts() -> list[str]:
    """Every prompt the grammar can produce (both splits)."""
    return [r["prompt"] for r in _splits()["all"]]


# ---- rendering ----------------------------------------------------------------------------------
def shape_mask(cls: str, h: int, w: int) -> np.ndarray:
    """Bool [h, w]: the shape filling an h x w box, rasterised at pixel centres.

    circle: inscribed ellipse; square: the whole box; triangle: apex at the top centre, base at the
    bottom. The detector matches components against these same templates.
    """
    v = (np.arange(h) + 0.5)[:, None] / h
    u = (np.arange(w) + 0.5)[None, :] / w
    if cls == "circle":
        return (2 * u - 1) ** 2 + (2 * v - 1) ** 2 <= 1.0
    if cls == "square":
        return np.ones((h, w), dtype=bool)
    if cls == "triangle":
        return np.abs(u - 0.5) <= 0.5 * v + 1e-9
    raise UserError(f"unknown tiny-world class {cls!r}; known: {', '.join(CLASSES)}.")


def _mask_box(mask: np.ndarray, x: int, y: int) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1))


def _objects(record: dict, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """(clause index, class, colour) for every object the scene must contain."""
    objs = []
    for i, clause in enumerate(record.get("include", [])):
        cls = clause.get("class")
        if cls not in CLASSES:
            raise UserError(f"cannot render class {cls!r} in prompt {record.get('prompt')!r}; "
                            f"the tiny world knows {', '.join(CLASSES)}.")
        color = clause.get("color")
        if color is not None and color not in COLORS:
            raise UserError(f"cannot render colour {color!r} in prompt {record.get('prompt')!r}; "
                            f"the tiny world knows {', '.join(COLORS)}.")
        for _ in range(int(clause.get("count", 1))):
            objs.append((i, cls, color or list(COLORS)[rng.integers(len(COLORS))]))
    if not 1 <= len(objs) <= 4:
        raise UserError(f"prompt {record.get('prompt')!r} asks for {len(objs)} objects; "
                        "the tiny world draws 1 to 4.")
    for clause in record.get("exclude", []):
        if sum(cls == clause.get("class") for _, cls, _ in objs) >= int(clause.get("count", 1)):
            raise UserError(f"prompt {record.get('prompt')!r}: its include and exclude clauses contradict.")
    return objs


def _relations_ok(record: dict, objs: list, boxes: list) -> bool:
    for i, clause in enumerate(record.get("include", [])):
        if "position" not in clause:
            continue
        rel, target = clause["position"]
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[rel]
        for a, (ia, _, _) in enumerate(objs):
            for b, (ib, _, _) in enumerate(objs):
                if ia == i and ib == target:
                    off = position_offset(boxes[a], boxes[b])
                    if off is None or sign * off[axis] <= POSITION_MARGIN:
                        return False
    return True


def render(record: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random scene satisfying `record`: uint8 [size, size, 3]."""
    objs = _objects(record, rng)
    max_size = min(MAX_SIZE, size // 3)
    for attempt in range(2000):
        hi = max(MIN_SIZE, max_size - attempt // 200)  # shrink the shapes if placement keeps failing
        placed: list[tuple[int, int, int]] = []  # (x, y, side)
        for _ in objs:
            for _ in range(50):
                s = int(rng.integers(MIN_SIZE, hi + 1))
                x, y = (int(v) for v in rng.integers(1, size - s, size=2))
                if all(x + s + GAP <= px or px + ps + GAP <= x or y + s + GAP <= py or py + ps + GAP <= y
                       for px, py, ps in placed):
                    placed.append((x, y, s))
                    break
            else:
                break
        if len(placed) < len(objs):
            continue
        masks = [shape_mask(cls, s, s) for (_, cls, _), (_, _, s) in zip(objs, placed)]
        boxes = [_mask_box(m, x, y) for m, (x, y, _) in zip(masks, placed)]
        if not _relations_ok(record, objs, boxes):
            continue
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for (_, _, color), m, (x, y, s) in zip(objs, masks, placed):
            image[y : y + s, x : x + s][m] = COLORS[color]
        return image
    raise UserError(f"could not place the objects of prompt {record.get('prompt')!r} "
                    f"in a {size}x{size} image.")


def render_batch(records: list[dict], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [B, size, size, 3], one random scene per record."""
    if not records:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([render(r, rng, size) for r in records])


# ---- metadata files -----------------------------------------------------------------------------
def write_metadata_jsonl(records: list[dict], path: str | Path) -> None:
    """One JSON record per line (GenEval's evaluation_metadata.jsonl layout)."""
    from ..outputs import write_lines_atomic

    write_lines_atomic(path, (json.dumps(r) for r in records))


def _check_record(rec: object, where: str) -> None:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
    for key, kind in (("tag", str), ("include", list), ("prompt", str)):
        if key not in rec:
            raise UserError(f"{where}: missing key '{key}'.")
        if not isinstance(rec[key], kind):
            raise UserError(f"{where}: '{key}' must be a {kind.__name__}.")
    if not isinstance(rec.get("exclude", []), list):
        raise UserError(f"{where}: 'exclude' must be a list.")
    for part in ("include", "exclude"):
        for j, clause in enumerate(rec.get(part, [])):
            at = f"{where}: {part}[{j}]"
            if not isinstance(clause, dict):
                raise UserError(f"{at} must be a JSON object.")
            for key in ("class", "count"):
                if key not in clause:
                    raise UserError(f"{at}: missing key '{key}'.")
            if not isinstance(clause["class"], str):
                raise UserError(f"{at}: 'class' must be a string.")
            count = clause["count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise UserError(f"{at}: 'count' must be an integer >= 1.")
            if "color" in clause and not isinstance(clause["color"], str):
                raise UserError(f"{at}: 'color' must be a string.")
            if "position" in clause:
                pos = clause["position"]
                ok = (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                      and isinstance(pos[1], int) and 0 <= pos[1] < j and part == "include")
                if not ok:
                    raise UserError(f"{at}: 'position' must be [relation, index of an earlier include "
                                    f"clause] with relation one of {', '.join(RELATIONS)}.")


def check_world_record(rec: dict, where: str) -> None:
    """UserError naming `where` when a (schema-valid) record asks for a class or colour the tiny world lacks."""
    for part in ("include", "exclude"):
        for j, clause in enumerate(rec.get(part, [])):
            if clause["class"] not in CLASSES:
                raise UserError(f"{where}: {part}[{j}] has class {clause['class']!r}, which the tiny world does not "
                                f"draw (it knows {', '.join(CLASSES)}).")
            if "color" in clause and clause["color"] not in COLORS:
                raise UserError(f"{where}: {part}[{j}] has colour {clause['color']!r}, which the tiny world does not "
                                f"draw (it knows {', '.join(COLORS)}).")


def read_metadata_jsonl(path: str | Path, world: bool = False) -> list[dict]:
    """Read and validate a GenEval-schema metadata file; UserError names file:line on any fault.
    With `world`, also refuse classes and colours the tiny world does not have."""
    from ..textfiles import iter_jsonl

    records = []
    for n, rec in iter_jsonl(path, "metadata file"):
        _check_record(rec, f"{path}:{n}")
        if world:
            check_world_record(rec, f"{path}:{n}")
        records.append(rec)
    if not records:
        raise UserError(f"metadata file {path} holds no records.")
    return records
