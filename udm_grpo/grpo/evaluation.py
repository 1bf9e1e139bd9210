"""Held-out evaluation of a run: which prompts, per-tag means with 95% intervals, and the end-of-run verdict.

For GenEval-schema prompts (with a `tag`) the overall figure is the mean over tags, as in GenEval, and
every tag gets the same number of images (`data.prompts.balance_tags`); 95% intervals as in `stats`.
"""

from __future__ import annotations

import math

import torch

from ..data.prompts import balance_tags
from ..stats import half_width, mean_of_groups_half_width


def eval_records(records: list[dict], e) -> list[dict]:
    """The held-out evaluation set: `eval_images_per_tag` images per tag when every record has a tag,
    else the first `num_eval_prompts` prompts with `eval_images_per_prompt` images each."""
    if e.eval_images_per_tag and all("tag" in r for r in records):
        return balance_tags(records, e.eval_images_per_tag)
    return [x for x in records[: e.num_eval_prompts] for _ in range(e.eval_images_per_prompt)]


def summarise_eval(records: list[dict], scores: torch.Tensor, values: dict[str, torch.Tensor]) -> dict:
    """Eval metrics: `eval/reward` (the optimised score, mean over images), `eval/images`, and per
    logged value NAME: `eval/NAME` (mean over tags when every record has one, else over images) with
    `eval/ci95/NAME`; for tagged prompts also `eval/NAME/TAG`, `eval/ci95/NAME/TAG` and `eval/NAME_images`."""
    out = {"eval/reward": scores.mean().item() if len(scores) else math.nan, "eval/images": len(records)}
    tags = [r.get("tag") for r in records]
    for name, v in values.items():
        if not (tags and all(tags)):
            out[f"eval/{name}"], out[f"eval/ci95/{name}"] = v.mean().item(), half_width(v)
            continue
        by_tag = {t: v[[i for i, x in enumerate(tags) if x == t]] for t in dict.fromkeys(tags)}
        out[f"eval/{name}"] = sum(x.mean().item() for x in by_tag.values()) / len(by_tag)
        out[f"eval/ci95/{name}"] = mean_of_groups_half_width([half_width(x) for x in by_tag.values()])
        out[f"eval/{name}_images"] = v.mean().item()
        for t, x in by_tag.items():
            out[f"eval/{name}/{t}"], out[f"eval/ci95/{name}/{t}"] = x.mean().item(), half_width(x)
    return out


def save_samples(images, records: list[dict], path) -> None:
    """A 4-column grid of up to 16 evenly spaced held-out images (uint8 [B, H, W, 3]), each captioned with its
    record's prompt."""
    from ..images import make_grid, save_png

    if not len(images):
        return
    pick = sorted(set(torch.linspace(0, len(images) - 1, min(16, len(images))).long().tolist()))
    save_png(make_grid(images[pick], nrow=4, scale=2, captions=[records[i]["prompt"] for i in pick]), path)
