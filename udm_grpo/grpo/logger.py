"""Run logging: metrics.jsonl, TensorBoard events, optional wandb, and a reward/KL curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path


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
        prefix = "eval/" if file.startswith("eval") else ""
        numeric = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
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
                keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
                path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """reward mean (with held-out eval when present) and KL against step -> curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r.get("reward_mean") for r in rows], label="train reward (mean)")
    if evals:
        ax1.plot([e["step"] for e in evals], [e.get("strict") for e in evals], "o-", label="held-out strict")
    ax1.set_xlabel("step")
    ax1.legend()
    ax2.plot(steps, [r.get("kl") for r in rows], color="tab:red")
    ax2.set_xlabel("step")
    ax2.set_ylabel("KL (k3)")
    fig.tight_layout()
    out = Path(out or run_dir / "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
