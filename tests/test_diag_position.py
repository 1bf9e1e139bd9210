"""benchmarks/diag_position.py: its record variants, checked on rendered scenes whose truth is known."""

import copy

import numpy as np

from udm_grpo.data.shapes import generate_records, render_batch
from udm_grpo.rewards.shapeeval import score_images

from .benchmark_scripts import load_benchmark


def test_variants_split_a_position_prompt_into_its_parts():
    variant = load_benchmark("diag_position").variant
    records = [r for r in generate_records("test") if r["tag"] == "position"][:8]
    images = render_batch(records, np.random.default_rng(0))  # each render satisfies its record
    ok = {m: score_images(images, [variant(r, m) for r in records])[1] for m in ("classes", "objects", "reversed")}
    assert score_images(images, records)[1].all()
    assert ok["classes"].all() and ok["objects"].all() and not ok["reversed"].any()
    # The variants drop or flip the relation and colours only; the record itself is left as it was.
    include = [{**c, "color": col} for c, col in zip(records[0]["include"], ("red", "blue"))]
    coloured = {**records[0], "include": include}
    original = copy.deepcopy(coloured)
    assert all("color" in c for c in variant(coloured, "objects")["include"])
    assert all("color" not in c and "position" not in c for c in variant(coloured, "classes")["include"])
    assert coloured == original
    reversed_ = variant(records[0], "reversed")
    rel = next(c["position"] for c in records[0]["include"] if "position" in c)
    flipped = next(c["position"] for c in reversed_["include"] if "position" in c)
    assert flipped[1] == rel[1] and {rel[0], flipped[0]} in ({"left of", "right of"}, {"above", "below"})
    assert all("position" not in c for c in variant(records[0], "objects")["include"])
