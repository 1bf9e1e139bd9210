"""Run logging: metrics.jsonl, TensorBoard events, optional wandb, and curves.png (reward, KL, eval, health)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from ..outputs import save_figure, write_text_atomic
from ..textfiles import iter_jsonl


class RunLogger:
    """Appends one JSON line per logged step to `<run>/metrics.jsonl` (and eval lines to eval.jsonl)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = None
        if wandb_config is not None:
            try:
                import wandb
            except ImportError:
                from ..errors import ConfigError

                raise ConfigError("experiment.wandb is true but wandb is not installed; "
                                  "pip install 'udm-grpo[wandb]'.") from None
            self.wandb = wandb.init(dir=str(self.run_dir), config=wandb_config, resume="allow")

    def log(self, step: int, metrics: dict, file: str = "metrics.jsonl") -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.run_dir / file, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if self.writer is not None:
            for k, v in numeric.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint's step (they will be produced again)."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            if path.is_file():
                keep = [json.dumps(row) for row in read_jsonl(path) if row.get("step", 0) <= step]
                write_text_atomic(path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl / eval.jsonl ([] when absent); UserError naming FILE:LINE of a line
    that is not a JSON object."""
    if not Path(path).exists():
        return []
    rows = []
    for n, row in iter_jsonl(path, "log file"):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: each line must be a JSON object.")
        rows.append(row)
    return rows


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing rolling mean: entry i is the mean of values[max(0, i - window + 1) : i + 1]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """The rolling-mean window of an n-point per-step series: max(3, n // 10)."""
    return max(3, n // 10)


def _series(rows: list[dict], *keys: str) -> tuple[list, list]:
    """(steps, values) of the first of `keys` present (not None) in each row that has a step."""
    steps, values = [], []
    for r in rows:
        v = next((r[k] for k in keys if r.get(k) is not None), None)
        if v is not None and "step" in r:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def flip_profile(rows: list[dict], fraction: float = 0.1) -> dict[str, tuple[list[int], list[float]]]:
    """Token flip rate against sampling step k, averaged over the first and the last `fraction` of the rows
    that log `health/flip/kNN`: {"first": (ks, rates), "last": (ks, rates)}; {} when none logs it."""
    keys = sorted({k for r in rows for k in r if k.startswith("health/flip/k")}, key=lambda k: int(k[13:]))
    logged = [r for r in rows if any(r.get(k) is not None for k in keys)]
    if not logged:
        return {}
    n = max(1, math.ceil(fraction * len(logged)))
    out = {}
    for name, part in (("first", logged[:n]), ("last", logged[-n:])):
        ks, rates = [], []
        for k in keys:
            got = [r[k] for r in part if r.get(k) is not None]
            if got:
                ks.append(int(k[13:]))
                rates.append(sum(got) / len(got))
        out[name] = (ks, rates)
    return out


# per-step panels: (title, y label, [(legend, keys: the namespaced key, then older flat ones)])
_CORE = [("train reward per step", "reward", [("train reward (mean)", ("reward/mean", "reward_mean"))]),
         ("KL to the reference", "KL (k3)", [("KL (k3)", ("train/kl", "kl"))])]
_HEALTH = [("token flip rate", "fraction of tokens changed per sampling step",
            [("mean over sampling steps", ("health/flip_rate",))]),
           ("codebook entropy (final samples)", "nats", [("entropy", ("health/codebook_entropy",))]),
           ("within-group diversity", "mean pairwise Hamming fraction",
            [("diversity", ("health/group_diversity",))]),
           ("zero-variance groups", "fraction of groups",
            [("all-equal rewards", ("reward/zero_var_frac",)), ("zero std (train)", ("train/zero_std_fraction",))]),
           ("extra rollouts", "rollouts per step", [("extra rollouts", ("train/extra_rollouts",))])]
_EVAL = [("held-out strict", ("eval/strict", "strict")), ("held-out score", ("eval/score", "score")),
         ("held-out clean", ("eval/clean",))]


def _per_step(ax, rows: list[dict], lines: list) -> None:
    """Each series raw (thin, transparent) with its rolling mean on top when it has two windows of points."""
    for label, keys in lines:
        steps, values = _series(rows, *keys)
        if not steps:
            continue
        w = smoothing_window(len(values))
        smooth = len(values) >= 2 * w
        (raw,) = ax.plot(steps, values, "-", lw=0.8 if smooth else 1.5, alpha=0.35 if smooth else 1.0,
                         label=None if smooth else label)
        if smooth:
            ax.plot(steps, rolling_mean(values, w), "-", lw=2, color=raw.get_color(), label=f"{label} (mean of {w})")


def _held_out(ax, evals: list[dict], lines: list) -> None:
    """Held-out points joined by lines, with 95% error bars where `eval/ci95/NAME` is logged."""
    for label, keys in lines:
        steps, values = _series(evals, *keys)
        if not steps:
            continue
        ci = [r.get(f"eval/ci95/{keys[0][5:]}") for r in evals if any(r.get(k) is not None for k in keys)]
        if all(isinstance(c, int | float) and math.isfinite(c) for c in ci):
            ax.errorbar(steps, values, yerr=ci, fmt="o-", markersize=3, capsize=2, label=label)
        else:
            ax.plot(steps, values, "o-", markersize=3, label=label)


def _flip_profile(ax, profile: dict[str, tuple[list[int], list[float]]]) -> None:
    for name, (ks, rates) in profile.items():
        ax.plot(ks, rates, "o-", markersize=3, label=f"{name} 10% of steps")
    ax.set(xlabel="sampling step k", ylabel="fraction of tokens changed", title="flip rate per sampling step")
    ax.legend(fontsize=7)


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if ax.lines or ax.containers:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def _has(rows: list[dict], lines: list) -> bool:
    return any(r.get(k) is not None for r in rows for _, keys in lines for k in keys)


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """curves.png: a grid of labelled panels against step. Always: train reward, held-out eval figures (95%
    error bars from `eval/ci95/NAME`) and KL to the reference ("no data" when absent); then, for the keys a run
    logs: token flip rate, its profile over sampling steps k (first vs last 10% of training), codebook entropy,
    within-group diversity, zero-variance group fraction, and blobs drawn vs objects named per image (train and
    held-out). Per-step series are drawn thin with a rolling mean (`smoothing_window`) on top.

    Reads the namespaced keys (`reward/mean`, `train/kl`, `eval/strict` ...) or the older flat ones
    (`reward_mean`, `kl`, `strict` ...); a line whose key is absent is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    evals = [r for r in evals if "step" in r]
    profile = flip_profile(rows)
    shapes_train = [("train blobs drawn", ("reward/blobs",)), ("train objects named", ("reward/named",))]
    shapes_eval = [("held-out blobs drawn", ("eval/blobs",)), ("held-out objects named", ("eval/named",))]
    draws = [lambda ax: (_per_step(ax, rows, _CORE[0][2]), _finish(ax, _CORE[0][1], _CORE[0][0])),
             lambda ax: (_held_out(ax, evals, _EVAL), _finish(ax, "accuracy / score", "held-out eval")),
             lambda ax: (_per_step(ax, rows, _CORE[1][2]), _finish(ax, _CORE[1][1], _CORE[1][0]))]
    for title, ylabel, lines in _HEALTH:
        if _has(rows, lines):
            draws.append(lambda ax, t=title, y=ylabel, ls=lines: (_per_step(ax, rows, ls), _finish(ax, y, t)))
        if title == "token flip rate" and profile:
            draws.append(lambda ax: _flip_profile(ax, profile))
    if _has(rows, shapes_train) or _has(evals, shapes_eval):
        draws.append(lambda ax: (_per_step(ax, rows, shapes_train), _held_out(ax, evals, shapes_eval),
                                 _finish(ax, "per image", "blobs drawn vs objects named")))
    ncols = 3
    nrows = math.ceil(len(draws) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.7 * ncols, 3.8 * nrows), squeeze=False)
    for ax, draw in zip(axes.flat, draws):
        draw(ax)
    for ax in list(axes.flat)[len(draws):]:
        ax.remove()
    fig.tight_layout()
    out = Path(out or run_dir / "curves.png")
    save_figure(fig, out)
    plt.close(fig)
    return out
