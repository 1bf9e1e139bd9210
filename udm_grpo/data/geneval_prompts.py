"""GenEval-schema training prompts over the 80 COCO classes: vocabulary, phrasing, parsing, generator.

Records follow GenEval's evaluation_metadata.jsonl (keys in this order; clause keys class, count,
color, position). Per tag, include (and exclude) -> prompt:

- single_object: [A] -> "a photo of a cow"
- two_object: [A, B], distinct classes -> "a photo of a cow and an apple"
- counting: [A x k], exclude [A x (k + 1)], k in 2..4 -> "a photo of three cows"
- colors: [A + colour] -> "a photo of a red cow"
- position: [B, A + "position": [rel, 0]] -> "a photo of a cow left of a bus"; the first-named object is
  include[1] and its position refers to include[0]
- color_attr: [A + colour a, B + colour b], distinct classes and colours -> "a photo of a red cow and a blue bus"

Articles: "an" before a vowel letter, else "a" (of the word that follows: "an orange cow").
Plurals: GenEval appends "es" after a final "s" and "s" otherwise ("two sheeps", "two wine glasses");
`plural(name, "english")` uses an exceptions table instead ("two sheep").

Each tag's prompts form a finite index space (`SPACE`, e.g. color_attr: 80*79 class pairs x 10*9
colour pairs); `generate` splits n over tags by `TAG_MIX` (capped at what each tag can give, the excess
redistributed), draws distinct indices per tag with a numpy Generator and shuffles: same seed (and numpy
version), same list.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from ..errors import UserError

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval: offsets within 0.1 x (sum of the two boxes' sizes) do not count
Box = tuple[float, float, float, float]  # x0, y0, x1, y1
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# default tag weights: the number of prompts per tag in GenEval's evaluation metadata (553 in all)
TAG_MIX: dict[str, int] = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                           "position": 100, "color_attr": 100}
PLURAL_STYLES: tuple[str, ...] = ("geneval", "english")
# proper English plurals where appending "s"/"es" is wrong or GenEval's form reads oddly
ENGLISH_PLURALS: dict[str, str] = {
    "person": "people", "sheep": "sheep", "knife": "knives", "skis": "pairs of skis", "scissors": "pairs of scissors",
    "bench": "benches", "sandwich": "sandwiches", "toothbrush": "toothbrushes", "broccoli": "heads of broccoli",
    "computer mouse": "computer mice",
}

_C, _K = len(COCO_CLASSES), len(COLORS)
_PAIRS, _COLOR_PAIRS = _C * (_C - 1), _K * (_K - 1)
SPACE: dict[str, int] = {"single_object": _C, "two_object": _PAIRS, "counting": _C * len(NUMBERS),
                         "colors": _C * _K, "position": _PAIRS * len(RELATIONS), "color_attr": _PAIRS * _COLOR_PAIRS}
_PREFIX = "a photo of "


def position_offset(box_a: Box, box_b: Box) -> tuple[float, float] | None:
    """The normalised revised offset (dx, dy) of A relative to B, or None when they are too close."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return None
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def article(phrase: str) -> str:
    """'an ' + phrase before a vowel letter, else 'a ' + phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(name: str, style: str = "geneval") -> str:
    """GenEval's plural (name + 'es' after a final 's', else + 's'), or with `style="english"` the
    `ENGLISH_PLURALS` exception when there is one."""
    if style == "english" and name in ENGLISH_PLURALS:
        return ENGLISH_PLURALS[name]
    return name + ("es" if name.endswith("s") else "s")


def clause(cls: str, count: int = 1, color: str | None = None, position: tuple[str, int] | None = None) -> dict:
    c: dict = {"class": cls, "count": count}
    if color is not None:
        c["color"] = color
    if position is not None:
        c["position"] = [position[0], position[1]]
    return c


def _noun(c: dict, style: str) -> str:
    if c["count"] == 1:
        return article(f"{c['color']} {c['class']}" if "color" in c else c["class"])
    colour = f"{c['color']} " if "color" in c else ""
    return f"{NUMBERS[c['count']]} {colour}{plural(c['class'], style)}"


def phrase(record: dict, style: str = "geneval") -> str:
    """GenEval's prompt for a record: 'a photo of ' + the include clauses joined by ' and ', or for a
    position clause on include[1] '<include[1]> <relation> <include[0]>'."""
    inc = record["include"]
    if len(inc) == 2 and "position" in inc[1]:
        return f"{_PREFIX}{_noun(inc[1], style)} {inc[1]['position'][0]} {_noun(inc[0], style)}"
    return _PREFIX + " and ".join(_noun(c, style) for c in inc)


def make_record(tag: str, include: list[dict], style: str = "geneval") -> dict:
    """A GenEval record (counting gets its exclude clause, count + 1) with its phrased prompt."""
    rec: dict = {"tag": tag, "include": include}
    if tag == "counting":
        rec["exclude"] = [clause(include[0]["class"], include[0]["count"] + 1)]
    rec["prompt"] = phrase(rec, style)
    return rec


def record_line(record: dict) -> str:
    """One line of GenEval's metadata layout (json.dumps defaults, no trailing newline)."""
    return json.dumps(record)


def _pair(i: int) -> tuple[int, int]:
    """Index in [0, n (n - 1)) -> an ordered pair of distinct indices in [0, n)."""
    a, b = divmod(i, _C - 1)
    return a, b + (b >= a)


def decode(tag: str, index: int, style: str = "geneval") -> dict:
    """Record `index` (0 <= index < SPACE[tag]) of a tag's prompt space."""
    C, K = COCO_CLASSES, COLORS
    if tag == "single_object":
        include = [clause(C[index])]
    elif tag == "two_object":
        a, b = _pair(index)
        include = [clause(C[a]), clause(C[b])]
    elif tag == "counting":
        c, k = divmod(index, len(NUMBERS))
        include = [clause(C[c], k + 2)]
    elif tag == "colors":
        c, k = divmod(index, _K)
        include = [clause(C[c], 1, K[k])]
    elif tag == "position":
        p, r = divmod(index, len(RELATIONS))
        subject, target = _pair(p)
        include = [clause(C[target]), clause(C[subject], position=(RELATIONS[r], 0))]
    elif tag == "color_attr":
        p, q = divmod(index, _COLOR_PAIRS)
        (a, b), (ca, cb) = _pair(p), divmod(q, _K - 1)
        include = [clause(C[a], 1, K[ca]), clause(C[b], 1, K[cb + (cb >= ca)])]
    else:
        raise ValueError(f"unknown tag {tag!r}")
    return make_record(tag, include, style)


@lru_cache(maxsize=1)
def _nouns() -> dict[str, dict]:
    """Every noun phrase of the grammar (both plural styles) -> its clause."""
    table: dict[str, dict] = {}
    for cls in COCO_CLASSES:
        table[article(cls)] = clause(cls)
        for col in COLORS:
            table[article(f"{col} {cls}")] = clause(cls, 1, col)
        for k, word in NUMBERS.items():
            for style in PLURAL_STYLES:
                table[f"{word} {plural(cls, style)}"] = clause(cls, k)
    return table


def normalise_prompt(text: str) -> str:
    return " ".join(text.lower().split())


def parse_prompt(text: str, style: str = "geneval") -> dict | None:
    """The record whose prompt (phrased in `style`) `text` is, up to case and spacing; None when `text`
    is not a prompt of the grammar."""
    text = normalise_prompt(text)
    if not text.startswith(_PREFIX):
        return None
    rest, nouns = text[len(_PREFIX):], _nouns()
    parts = rest.split(" and ")
    if len(parts) == 2:
        a, b = nouns.get(parts[0]), nouns.get(parts[1])
        if not a or not b or a["count"] != 1 or b["count"] != 1 or a["class"] == b["class"]:
            return None
        if "color" in a and "color" in b and a["color"] != b["color"]:
            return make_record("color_attr", [a, b], style)
        return make_record("two_object", [a, b], style) if "color" not in a and "color" not in b else None
    for rel in RELATIONS:
        subject, sep, target = rest.partition(f" {rel} ")
        if sep:
            s, t = nouns.get(subject), nouns.get(target)
            plain = s and t and s["count"] == t["count"] == 1 and "color" not in s and "color" not in t
            if not plain or s["class"] == t["class"]:
                return None
            return make_record("position", [t, clause(s["class"], position=(rel, 0))], style)
    c = nouns.get(rest)
    if c is None:
        return None
    tag = "counting" if c["count"] > 1 else "colors" if "color" in c else "single_object"
    return make_record(tag, [c], style)


def canonical_prompt(text: str) -> str | None:
    """GenEval's phrasing of the record `text` names (in either plural style), or None outside the grammar."""
    for style in PLURAL_STYLES:
        rec = parse_prompt(text, style)
        if rec is not None:
            return phrase(rec)
    return None


def allocate(n: int, mix: dict[str, float], capacity: dict[str, int]) -> dict[str, int]:
    """Per-tag counts summing to n: n * w_t / sum(w), capped at capacity[t], the excess shared by the
    other tags in proportion to their weights; integer parts by largest remainders (ties in mix order)."""
    counts = dict.fromkeys(mix, 0)
    active = [t for t in mix if mix[t] > 0]
    total = sum(capacity[t] for t in active)
    if n > total:
        raise UserError(f"-n {n} exceeds the {total} distinct prompts the tag mix allows "
                        f"({', '.join(f'{t} {capacity[t]}' for t in active)}).")
    left = n
    while True:
        weight = sum(mix[t] for t in active)
        full = [t for t in active if left * mix[t] / weight >= capacity[t]]
        if not full:
            break
        for t in full:
            counts[t], left = capacity[t], left - capacity[t]
            active.remove(t)
    if active:
        weight = sum(mix[t] for t in active)
        share = {t: left * mix[t] / weight for t in active}
        for t in active:
            counts[t] = int(share[t])
        spare = left - sum(counts[t] for t in active)
        for t in sorted(active, key=lambda t: -(share[t] - int(share[t])))[:spare]:
            counts[t] += 1
    return counts


def excluded_by_tag(prompts) -> dict[str, set[str]]:
    """The GenEval-phrased prompts of the grammar among `prompts` (strings), grouped by tag."""
    out: dict[str, set[str]] = {t: set() for t in TAGS}
    for p in prompts:
        for style in PLURAL_STYLES:
            rec = parse_prompt(p, style)
            if rec is not None:
                out[rec["tag"]].add(phrase(rec))
                break
    return out


def generate(n: int, seed: int = 0, mix: dict[str, float] | None = None, exclude=(),
             style: str = "geneval", distinct: bool = False) -> tuple[list[dict], dict[str, int]]:
    """n records, none of whose prompts is in `exclude` (prompt strings, compared as records of the
    grammar), split over tags by `mix` (default TAG_MIX) and shuffled; and each tag's capacity (distinct
    prompts) after exclusion. A tag whose share exceeds its capacity repeats its distinct prompts (each
    k or k + 1 times), which keeps the mix (GenEval's score is a mean over tags); with `distinct`, every
    record differs and such a tag's excess goes to the other tags instead. A tag with no prompt left gets
    none either way. Deterministic in (n, seed, mix, exclude, style, distinct)."""
    mix = dict(TAG_MIX if mix is None else mix)
    unknown = [t for t in mix if t not in TAGS]
    if unknown or not any(w > 0 for w in mix.values()) or any(w < 0 for w in mix.values()):
        raise UserError(f"the tag mix needs non-negative weights for tags among {', '.join(TAGS)}, one positive.")
    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}.")
    if style not in PLURAL_STYLES:
        raise UserError(f"the plural style must be one of {', '.join(PLURAL_STYLES)}, got {style!r}.")
    excluded = excluded_by_tag(exclude)
    capacity = {t: SPACE[t] - len(excluded[t]) for t in mix}
    counts = allocate(n, mix, capacity if distinct else {t: n if capacity[t] else 0 for t in mix})
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    for tag in TAGS:
        k = counts.get(tag, 0)
        if k == 0:
            continue
        unique = min(k, capacity[tag])
        draws = rng.choice(SPACE[tag], size=min(SPACE[tag], unique + len(excluded[tag])), replace=False)
        chosen: list[dict] = []
        for i in draws:
            rec = decode(tag, int(i))
            if rec["prompt"] in excluded[tag]:
                continue
            if style != "geneval":
                rec["prompt"] = phrase(rec, style)
            chosen.append(rec)
            if len(chosen) == unique:
                break
        records.extend(chosen[j % unique] for j in range(k))
    records = [records[i] for i in rng.permutation(len(records))]
    return records, capacity
