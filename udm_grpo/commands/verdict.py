"""The end-of-run verdict of `udm-grpo train`: held-out figures before -> after with their noise, and the
commands and files to look at next."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path


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
