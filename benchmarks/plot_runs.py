"""Overlay several training runs: train reward (rolling mean) and held-out strict accuracy with its 95%
interval, against step. Used for the naive-vs-UDM-GRPO collapse figure of benchmarks/results/.

    python benchmarks/plot_runs.py RUN [RUN ...] [--labels A B ...] [--window 5] -o out.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


def rolling_mean(values: list[float], window: int) -> list[float]:
    """out[i] = mean(values[max(0, i - window + 1) : i + 1])."""
    windows = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", nargs="+", default=None)
    ap.add_argument("--window", type=int, default=5, help="steps in the train-reward rolling mean")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error("give one label per run")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from udm_grpo.grpo.logger import read_jsonl

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, label in zip(args.runs, labels):
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "reward/mean" in r]
        if not rows:
            ap.error(f"{run / 'metrics.jsonl'} holds no train metrics")
        ax_r.plot([r["step"] for r in rows], rolling_mean([r["reward/mean"] for r in rows], args.window), label=label)
        evals = [e for e in read_jsonl(run / "eval.jsonl") if "eval/strict" in e]
        ax_e.errorbar([e["step"] for e in evals], [e["eval/strict"] for e in evals],
                      yerr=[e.get("eval/ci95/strict", 0.0) for e in evals], marker="o", capsize=3, label=label)
    ax_r.set(xlabel="step", ylabel="reward", title=f"train reward ({args.window}-step rolling mean)")
    ax_e.set(xlabel="step", ylabel="strict accuracy", title="held-out strict accuracy (+- 95%)")
    for ax in (ax_r, ax_e):
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
