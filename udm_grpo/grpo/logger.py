"""Run logging: metrics.jsonl, TensorBoard events, optional wandb, and a reward/KL curve PNG."""

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


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """curves.png: train reward mean, held-out eval metrics and KL against step, each in its own labelled panel.

    Reads the namespaced keys (`reward/mean`, `train/kl`, `eval/strict` ...) or the older flat ones
    (`reward_mean`, `kl`, `strict` ...); a line whose key is absent is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows: list[dict], *keys: str) -> tuple[list, list]:
        steps, values = [], []
        for r in rows:
            v = next((r[k] for k in keys if r.get(k) is not None), None)
            if v is not None and "step" in r:
                steps.append(r["step"])
                values.append(v)
        return steps, values

    run_dir = Path(run_dir)
    rows, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    fig, (ax_r, ax_e, ax_k) = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [
        (ax_r, rows, [("train reward (mean)", ("reward/mean", "reward_mean"))], "reward", "train reward per step"),
        (ax_e, evals, [("held-out strict", ("eval/strict", "strict")), ("held-out score", ("eval/score", "score"))],
         "accuracy / score", "held-out eval"),
        (ax_k, rows, [("KL (k3)", ("train/kl", "kl"))], "KL (k3)", "KL to the reference"),
    ]
    for ax, source, lines, ylabel, title in panels:
        for label, keys in lines:
            steps, values = series(source, *keys)
            if steps:
                ax.plot(steps, values, "o-" if source is evals else "-", label=label, markersize=3)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    out = Path(out or run_dir / "curves.png")
    save_figure(fig, out)
    plt.close(fig)
    return out
