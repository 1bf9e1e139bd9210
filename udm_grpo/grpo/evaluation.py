"""Held-out evaluation of a run: which prompts, per-tag means with 95% intervals, and the end-of-run verdict.

For GenEval-schema prompts (with a `tag`) the overall figure is the mean over tags, as in GenEval, and
every tag gets the same number of images (`data.prompts.balance_tags`); 95% intervals as in `stats`.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

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


def command_name() -> str:
    """How the user can run `udm-grpo` again: the bare name when it is on PATH, else this environment's."""
    here = Path(sys.executable).parent / "udm-grpo"
    if shutil.which("udm-grpo") and Path(shutil.which("udm-grpo")).resolve() == here.resolve():
        return "udm-grpo"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def verdict(first: dict, last: dict, records: list[dict], steps: int, minutes: float, run_dir: Path,
            tiny_world: bool) -> str:
    """The end-of-run summary a person reads: held-out values before -> after per tag with 95%
    intervals, whether the overall change is beyond its interval, where the outputs are."""
    lines = [f"UDM-GRPO: {steps} steps in {minutes:.1f} min."]
    names = [k[5:] for k in last if k.startswith("eval/") and k.count("/") == 1 and k[5:] not in ("reward", "images")
             and not k.endswith("_images")]
    if first and last and names:
        tags = list(dict.fromkeys(r["tag"] for r in records)) if all("tag" in r for r in records) else []
        per = f"{len(records) // len(tags)} images per tag" if tags else f"{len(records)} images"
        lines.append(f"Held-out prompts (never trained on), {per}, before -> after (+- 95% interval):")
        lines.append(" " * 16 + "".join(f"{n:28s}" for n in names))
        for tag in [*tags, None]:
            suffix = f"/{tag}" if tag else ""
            cells = []
            for n in names:
                a, b = first.get(f"eval/{n}{suffix}", math.nan), last.get(f"eval/{n}{suffix}", math.nan)
                h = last.get(f"eval/ci95/{n}{suffix}", math.nan)
                cells.append(f"{a:.3f} -> {b:.3f} +-{h:.2f}".ljust(28))
            lines.append(f"  {tag or 'overall':14s}" + "".join(cells))
        for n in names:
            change = last[f"eval/{n}"] - first.get(f"eval/{n}", math.nan)
            noise = math.hypot(first.get(f"eval/ci95/{n}", math.nan), last.get(f"eval/ci95/{n}", math.nan))
            where = "beyond" if abs(change) > noise else "within"
            lines.append(f"  overall {n}: {change:+.3f}, {where} the noise of two evaluations (+-{noise:.3f}).")
        lines.append("  The in-run evaluation is a rough indicator at this size.")
    if tiny_world:
        lines.append(f"Evaluate precisely (64 images per tag): {command_name()} eval shapes --per-tag 64 "
                     f"--checkpoint {run_dir} -o {run_dir / 'eval-shapes'}")
    lines.append(f"Run folder {run_dir}: samples/step-N.png (held-out images), curves.png, metrics.jsonl, "
                 "eval.jsonl, tensorboard/, checkpoints/.")
    return "\n".join(lines)
