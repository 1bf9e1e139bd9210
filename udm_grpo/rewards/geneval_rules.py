"""GenEval scoring rules, shared by ShapeEval (exact tiny-world detector) and the real GenEval reward.

A record is GenEval metadata: `include` / `exclude` clauses `{"class", "count", optional "color",
optional "position": [relation, index of an earlier include clause]}`. Detections of a class are
ranked by score, highest first; the sort is stable, so detections with tied scores keep the order the
detector returned them in (ShapeEval, whose scores all tie, returns them largest first).
`evaluate` returns (score, strict, details).

Position (official GenEval `relative_position`): with box centres c_a, c_b and sizes s_a, s_b
(w, h), offset = c_a - c_b and revised = sign(offset) * max(|offset| - 0.1 (s_a + s_b), 0). If both
|revised| < 1e-3 there is no relation; otherwise (dx, dy) = revised / ||offset|| and the relations
are the set of: "left of" dx < -0.5, "right of" dx > 0.5, "above" dy < -0.5, "below" dy > 0.5
(image y points down).

Strict correctness (official GenEval `evaluate`, `strict` = all of):
- include {class, count}: at least `count` detections of the class; the chosen objects are the
  `count` top-ranked detections of the class;
- with "color": every chosen object has that colour (lower-ranked detections of the colour do not
  count: a larger blue circle and a smaller red one fail "a red circle");
- with "position" [rel, j]: clause j matched, and `rel` holds for every chosen object against every
  object chosen for clause j (only checked when the count and colour already hold);
- exclude {class, count}: fails when the class has >= `count` detections.

Partial-credit score (the reference's GRPO score, fixed): the mean of a fixed set of terms, each
in [0, 1]; the number of terms depends only on the record. With found = all detections of the class
and req = count:
- count term per include clause: clip(1 - |req - found| / req, 0, 1) (the reference could go
  negative);
- colour term when the clause has a colour: 0 if found != req, else (#found of that colour) / req;
- position term when the clause has a position: 1 if found == req, clause j has exactly its own
  count, and the relation holds for every pair; else 0 (the reference dropped this term when the
  colour failed, which raised the mean);
- exclude term per exclude clause: 1 if the class has < count detections, else 0 (the reference
  ignored exclude clauses).
score == 1 implies strict; strict does not imply score == 1 (extra objects cost partial credit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.geneval_prompts import Box, position_offset

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


@dataclass
class Detection:
    """One detected object: class, colour (None when unknown), box (x0, y0, x1, y1) in pixels, score,
    and optionally a bool [H, W] instance mask."""

    cls: str
    color: str | None
    box: Box
    score: float = 1.0
    mask: np.ndarray | None = field(default=None, repr=False)


def relative_position(box_a: Box, box_b: Box) -> set[str]:
    """The set of relations of A relative to B ("A is left of B", ...)."""
    off = position_offset(box_a, box_b)
    if off is None:
        return set()
    dx, dy = off
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def filter_detections(detections: list[Detection], tag: str | None = None, threshold: float = 0.3,
                      counting_threshold: float = 0.9, max_per_class: int = 16) -> list[Detection]:
    """Official GenEval detection filter: score > threshold (> counting_threshold for the counting tag),
    at most `max_per_class` highest-scoring detections per class."""
    thr = counting_threshold if tag == "counting" else threshold
    out: list[Detection] = []
    for dets in _by_class(d for d in detections if d.score > thr).values():
        out += dets[:max_per_class]
    return out


def _by_class(detections) -> dict[str, list[Detection]]:
    groups: dict[str, list[Detection]] = {}
    for d in detections:
        groups.setdefault(d.cls, []).append(d)
    for dets in groups.values():
        dets.sort(key=lambda d: -d.score)
    return groups


def _all_pairs(subjects: list[Detection], targets: list[Detection], rel: str) -> bool:
    return all(rel in relative_position(s.box, t.box) for s in subjects for t in targets)


def _strict(record: dict, groups: dict[str, list[Detection]]) -> tuple[bool, list[str]]:
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in record.get("include", []):
        cls, n = req["class"], int(req["count"])
        dets = groups.get(cls, [])
        chosen, ok = dets[:n], True
        if len(dets) < n:
            ok = False
            reasons.append(f"expected {cls}>={n}, found {len(dets)}")
        elif "color" in req:
            colour = req["color"]
            have = sum(d.color == colour for d in chosen)
            if have < n:
                ok = False
                reasons.append(f"expected {colour} {cls}>={n}, found {have} {colour}")
        if ok and "position" in req:
            rel, j = req["position"]
            target = matched[j] if 0 <= j < len(matched) else None
            if target is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            elif not _all_pairs(chosen, target, rel):
                ok = False
                reasons.append(f"expected {cls} {rel} target")
        correct &= ok
        matched.append(chosen if ok else None)
    for req in record.get("exclude", []):
        found = len(groups.get(req["class"], []))
        if found >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {found}")
    return correct, reasons


def _terms(record: dict, groups: dict[str, list[Detection]]) -> list[float]:
    terms: list[float] = []
    exact: list[list[Detection] | None] = []
    for req in record.get("include", []):
        n = int(req["count"])
        dets = groups.get(req["class"], [])
        found = len(dets)
        terms.append(min(max(1.0 - abs(n - found) / n, 0.0), 1.0))
        if "color" in req:
            terms.append(0.0 if found != n else sum(d.color == req["color"] for d in dets) / n)
        if "position" in req:
            rel, j = req["position"]
            target = exact[j] if 0 <= j < len(exact) else None
            terms.append(float(found == n and target is not None and _all_pairs(dets, target, rel)))
        exact.append(dets if found == n else None)
    for req in record.get("exclude", []):
        terms.append(float(len(groups.get(req["class"], [])) < int(req["count"])))
    return terms


def evaluate(record: dict, detections: list[Detection]) -> tuple[float, bool, dict]:
    """Score one image's detections against a GenEval record.

    Returns (partial-credit score in [0, 1], strict correctness, details {"terms", "reasons", "found"}).
    """
    groups = _by_class(detections)
    strict, reasons = _strict(record, groups)
    terms = _terms(record, groups)
    score = sum(terms) / len(terms) if terms else float(strict)
    found = {cls: len(dets) for cls, dets in groups.items()}
    return score, strict, {"terms": terms, "reasons": reasons, "found": found}
