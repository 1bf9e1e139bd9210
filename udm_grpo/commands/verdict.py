"""The end-of-run verdict of `udm-grpo train`: held-out figures before -> after with their noise, warnings a
person can act on (reward hacking, diversity collapse), and the commands and files to look at next.

Warnings (`health_warnings`), from the run's metrics.jsonl and its first and last held-out evaluation, with
`WINDOW` = 10 logged steps (half the logged steps when there are fewer than 20):

- reward hacking: the train reward (`reward/mean`) of the last WINDOW steps exceeds that of the first WINDOW by
  more than the 95% interval of a difference of two means, 1.96 sqrt(s_a^2 / n_a + s_b^2 / n_b) with the
  per-step values taken as independent samples, while a held-out figure moves the bad way beyond the noise of
  two evaluations, sqrt(h_first^2 + h_last^2) (their 95% half-widths): `strict`, `score`, `clean` (any figure)
  falling, or `blobs` (shapes drawn per image) rising to above `named` (objects named per image). One line
  names them all, with the meaning of the first (a falling `score` or rising `blobs` is put down to extra shapes
  when blobs end over 25% above named, or rose and end above it);
- more drawn than named (tiny world): held-out blobs per image exceed the objects named per image by more than
  `EXCESS` (25%) while before training they did not (only when the blobs line above did not fire);
- diversity collapse: the mean of `health/group_diversity` over the last WINDOW steps is under half that of
  the first WINDOW; likewise `health/codebook_entropy`.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

WINDOW = 10  # logged steps compared at each end of the run
EXCESS = 0.25  # shapes drawn beyond those named, as a fraction of them, that a healthy run stays within
Z95 = 1.959964
MORE_THAN_NAMED = ("the policy draws more shapes than named; GenEval's at-least rule rewards it; "
                   "try reward.params.exact=true")
MEANING = {
    "strict": "the optimised reward no longer tracks held-out correctness (a loophole in the reward or "
              "overfitting to the training prompts); look at samples/step-N.png",
    "score": "partial credit, which counts extra or missing objects, falls while the reward rises; "
             "look at samples/step-N.png",
    "clean": "more fused, ragged or multi-coloured blobs; raise reward.params.clean",
    "blobs": MORE_THAN_NAMED,
}


def command_name() -> str:
    """How the user can run `udm-grpo` again: the bare name when it is on PATH, else this environment's."""
    here = Path(sys.executable).parent / "udm-grpo"
    if shutil.which("udm-grpo") and Path(shutil.which("udm-grpo")).resolve() == here.resolve():
        return "udm-grpo"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def ends(values: list[float], window: int = WINDOW) -> tuple[float, float, float, int] | None:
    """(mean of the first w values, mean of the last w, 95% half-width of their difference, w) with
    w = min(window, len // 2); None under 2 values a side. The half-width is 1.96 sqrt(s_a^2 / w + s_b^2 / w)
    (sample variances; steps taken as independent)."""
    w = min(window, len(values) // 2)
    if w < 2:
        return None
    a, b = values[:w], values[-w:]
    mean_a, mean_b = sum(a) / w, sum(b) / w
    var_a = sum((x - mean_a) ** 2 for x in a) / (w - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (w - 1)
    return mean_a, mean_b, Z95 * math.sqrt((var_a + var_b) / w), w


def _values(metrics: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in metrics if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def _change(first: dict, last: dict, name: str) -> tuple[float, float, float]:
    """(before, after, noise of the change) of held-out figure `name`; nan where a figure is missing."""
    noise = math.hypot(first.get(f"eval/ci95/{name}", math.nan), last.get(f"eval/ci95/{name}", math.nan))
    return first.get(f"eval/{name}", math.nan), last.get(f"eval/{name}", math.nan), noise


def health_warnings(first: dict, last: dict, metrics: list[dict]) -> list[str]:
    """One-line warnings (see the module docstring) from the first and last held-out evaluations' `eval/...`
    keys and the per-step rows of metrics.jsonl; [] for a healthy run or when the keys are absent."""
    lines = []
    blobs_line = False
    reward = ends(_values(metrics, "reward/mean") or _values(metrics, "reward_mean"))
    if reward and reward[1] - reward[0] > reward[2] and first:
        a, b, noise, w = reward
        trend = (f"the train reward rose {a:.3f} -> {b:.3f} ({b - a:+.3f} +-{noise:.3f}, means of the first and "
                 f"last {w} steps)")
        names = [k[5:] for k in last if k.startswith("eval/") and k.count("/") == 1
                 and k[5:] not in ("reward", "images", "named") and not k.endswith("_images")]
        blobs = _change(first, last, "blobs")
        excess = _drawn_beyond_named(last)
        more = excess > EXCESS or excess > 0 and blobs[1] - blobs[0] > blobs[2]  # nan compares false
        bad = []
        for n in names:
            before, after, h = _change(first, last, n)
            if n == "blobs":  # a rise is bad when it ends above the objects named (or they are not logged)
                if after - before > h and not excess <= 0:
                    bad.append((n, f"{n} rose {before:.3f} -> {after:.3f}"))
            elif before - after > h:
                bad.append((n, f"{n} fell {before:.3f} -> {after:.3f}"))
        if bad:
            figures = [n for n, _ in bad]
            meaning = MORE_THAN_NAMED if more and {"blobs", "score"} & set(figures) else MEANING.get(
                figures[0], "the optimised reward and these held-out figures disagree; look at samples/step-N.png")
            lines.append(f"warning: reward hacking? {trend} while held-out {', '.join(text for _, text in bad)} "
                         f"(each beyond the noise of two evaluations): {meaning}.")
            blobs_line = "blobs" in figures
    excess, base = _drawn_beyond_named(last), _drawn_beyond_named(first)
    if not blobs_line and excess > EXCESS and base <= EXCESS:
        lines.append(f"warning: held-out images draw {last['eval/blobs']:.2f} shapes per image for "
                     f"{last['eval/named']:.2f} named ({excess:+.0%}; before training {first['eval/blobs']:.2f}, "
                     f"{base:+.0%}): {MORE_THAN_NAMED}.")
    collapse = [("health/group_diversity", "within-group diversity (mean pairwise Hamming fraction)", "",
                 "the images of a prompt are becoming copies, so its group stops giving a learning signal"),
                ("health/codebook_entropy", "codebook entropy of the samples", " nats",
                 "the samples use ever fewer codebook tokens (mode collapse)")]
    for key, what, unit, meaning in collapse:
        got = ends(_values(metrics, key))
        if got and got[1] < 0.5 * got[0]:
            lines.append(f"warning: diversity collapse: {what} fell from {got[0]:.3f}{unit} (first {got[3]} steps) "
                         f"to {got[1]:.3f}{unit} (last {got[3]}), under half: {meaning}; lower training.lr or raise "
                         "reward.kl_beta.")
    return lines


def _drawn_beyond_named(row: dict) -> float:
    """Held-out blobs per image over named per image, minus 1 (nan without both)."""
    blobs, named = row.get("eval/blobs"), row.get("eval/named")
    return blobs / named - 1 if isinstance(blobs, int | float) and isinstance(named, int | float) and named else \
        math.nan


def verdict(first: dict, last: dict, records: list[dict], steps: int, minutes: float, run_dir: Path,
            tiny_world: bool, metrics: list[dict] | None = None) -> str:
    """The end-of-run summary a person reads: held-out values before -> after per tag with 95%
    intervals, whether the overall change is beyond its interval, shapes drawn vs named (tiny world),
    `health_warnings` (from `metrics`, default the rows of run_dir/metrics.jsonl), where the outputs are."""
    from ..errors import UserError
    from ..grpo.logger import read_jsonl

    if metrics is None:
        try:
            metrics = read_jsonl(Path(run_dir) / "metrics.jsonl")
        except UserError:
            metrics = []
    lines = [f"UDM-GRPO: {steps} steps in {minutes:.1f} min."]
    names = [k[5:] for k in last if k.startswith("eval/") and k.count("/") == 1 and k[5:] not in ("reward", "images")
             and not k.endswith("_images") and not (k == "eval/named" and first.get(k) == last[k])]
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
            before, after, noise = _change(first, last, n)
            change = after - before
            where = "beyond" if abs(change) > noise else "within"
            lines.append(f"  overall {n}: {change:+.3f}, {where} the noise of two evaluations (+-{noise:.3f}).")
        if "eval/blobs" in last and "eval/named" in last:
            lines.append(f"  shapes drawn per image: {first.get('eval/blobs', math.nan):.2f} -> "
                         f"{last['eval/blobs']:.2f} (+-{last.get('eval/ci95/blobs', math.nan):.2f}) for "
                         f"{last['eval/named']:.2f} named.")
        lines.append("  The in-run evaluation is a rough indicator at this size.")
    lines += health_warnings(first, last, metrics)
    if tiny_world:
        lines.append(f"Evaluate precisely (64 images per tag): {command_name()} eval shapes --per-tag 64 "
                     f"--checkpoint {run_dir} -o {run_dir / 'eval-shapes'}")
    lines.append(f"Run folder {run_dir}: samples/step-N.png (held-out images), curves.png, metrics.jsonl, "
                 "eval.jsonl, tensorboard/, checkpoints/.")
    return "\n".join(lines)
