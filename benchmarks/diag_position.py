"""Why does a tiny-world model fail position prompts? Splits ShapeEval's strict position accuracy into its parts.

Samples N images for the test split's position prompts (as `eval shapes --per-tag N`: evaluation seed 0,
default sampling) and re-scores the same images against variants of each record:

- both classes:  the two named classes are drawn (colours and relation ignored), as a two-object prompt;
- both objects:  both named objects with their named colours (relation ignored), as a color_attr prompt
  (the same as "both classes" for the tiny world's uncoloured position prompts);
- relation right | both objects: the fraction of those whose relation holds (= strict / both objects);
- reversed | both objects: the fraction whose opposite relation holds. Chance is where "right" and
  "reversed" are equal; the rest have the objects too close on the asked axis for GenEval's rule.

    python benchmarks/diag_position.py [--images 256] [--model DIR] [--checkpoint RUN]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def variant(record: dict, mode: str) -> dict:
    """`record` with its relation dropped ("objects"), reversed ("reversed"), or relation and colours dropped
    ("classes")."""
    r = copy.deepcopy(record)
    for clause in r["include"]:
        if "position" in clause:
            rel, target = clause.pop("position")
            if mode == "reversed":
                clause["position"] = [OPPOSITE[rel], target]
        if mode == "classes":
            clause.pop("color", None)
    return r


def main() -> None:
    from udm_grpo.data.prompts import balance_tags
    from udm_grpo.data.shapes import generate_records
    from udm_grpo.pipelines import load_pipeline
    from udm_grpo.rewards.shapeeval import score_images
    from udm_grpo.stats import half_width
    from udm_grpo.tinyworld import evaluate_shapes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="images (one per prompt draw; default 256)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped tiny world)")
    p.add_argument("--checkpoint", default=None, help="a training run or checkpoint whose transformer to use")
    args = p.parse_args()

    records = balance_tags([r for r in generate_records("test") if r["tag"] == "position"], args.images)
    pipe = load_pipeline(args.model, "cpu", args.checkpoint)
    _, images = evaluate_shapes(pipe, records, progress=True)
    strict = score_images(images, records)[1]
    ok = {m: score_images(images, [variant(r, m) for r in records])[1] for m in ("classes", "objects", "reversed")}
    both = ok["objects"]

    def line(name: str, v: np.ndarray) -> str:
        return f"  {name:32s} {v.mean():.3f} +-{half_width(v):.3f}  (n={len(v)})"

    print(f"position prompts of the test split, {len(records)} images, evaluation seed 0")
    print(line("strict", strict))
    print(line("both classes drawn", ok["classes"]))
    print(line("both objects (class + colour)", both))
    if both.any():
        print(line("relation right | both objects", strict[both]))
        print(line("relation reversed | both objects", ok["reversed"][both]))


if __name__ == "__main__":
    main()
