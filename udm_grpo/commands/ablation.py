"""The paper's ablation ladder, trained for the same budget and seeds, summarised as a table and a plot.

| variant | action | states | rollout guidance |
|---|---|---|---|
| naive GRPO | each step's x1_hat^{(k)} | rollout's own x_t | CFG |
| + clean action | final x1_hat | rollout's own x_t | CFG |
| + forward states | final x1_hat | forward-noised around x1_hat | CFG |
| + CFG-free (UDM-GRPO) | final x1_hat | forward-noised | none |
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import load_config
from ..grpo.logger import read_jsonl
from ..grpo.run_folder import check_run_dir
from ..outputs import save_figure, write_text_atomic

VARIANTS: dict[str, dict] = {
    "naive": {"sampling.clean_response": False, "sampling.forward_process": False},
    "+clean-action": {"sampling.clean_response": True, "sampling.forward_process": False},
    "+forward-states": {"sampling.clean_response": True, "sampling.forward_process": True},
    "+cfg-free": {"sampling.clean_response": True, "sampling.forward_process": True,
                  "sampling.rollout.guidance_scale": 1.0},
}


def run_ablation(config_path, overrides: list[str], output: Path, steps: int, cfg_scale: float = 3.0,
                 variants: list[str] | None = None, make_trainer=None, force: bool = False) -> list[dict]:
    """Train each variant into `output/<variant>` (`force` replaces earlier runs there); write
    output/ablation.md and output/ablation.png.

    `make_trainer(config)` builds the trainer (default `UDMGRPOTrainer(config)`).
    """
    from ..grpo.trainer import UDMGRPOTrainer

    output = Path(output)
    rows = []
    names = variants or list(VARIANTS)
    configs = {}
    for name in names:  # every run folder is checked before the first variant trains
        settings = {"sampling.rollout.guidance_scale": cfg_scale, **VARIANTS[name]}
        extra = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
        cfg = load_config(config_path, [*overrides, *extra, f"experiment.output_dir={output / name}",
                                        f"training.max_steps={steps}"])
        check_run_dir(output / name, None, force, [cfg.model.path])
        configs[name] = settings, cfg
    for i, name in enumerate(names, 1):
        settings, cfg = configs[name]
        print(f"ablation variant {i}/{len(names)}: {name} ("
              + ", ".join(f"{k.rsplit('.', 1)[1]}={v}" for k, v in settings.items()) + ")", flush=True)
        start = time.time()
        result = (make_trainer or UDMGRPOTrainer)(cfg).train(force=force)
        metrics = read_jsonl(output / name / "metrics.jsonl")
        evals = read_jsonl(output / name / "eval.jsonl")
        rows.append({
            "variant": name,
            "eval_before": evals[0] if evals else {},
            "eval_after": result["eval"],
            "reward_last10": _mean([m.get("reward/mean") for m in metrics[-10:]]),
            "kl_last10": _mean([m.get("train/kl") for m in metrics[-10:]]),
            "minutes": round((time.time() - start) / 60, 2),
        })
    write_report(rows, output, steps)
    return rows


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, int | float)]
    return sum(values) / len(values) if values else float("nan")


def write_report(rows: list[dict], output: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# Ablation ({steps} steps each, same seeds)", "",
             "| variant | held-out strict before | after (+- 95%) | held-out score after | train reward (last 10) "
             "| KL (last 10) | minutes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["eval_before"], r["eval_after"]
        nan = float("nan")
        lines.append(f"| {r['variant']} | {b.get('eval/strict', nan):.3f} | {a.get('eval/strict', nan):.3f} "
                     f"+-{a.get('eval/ci95/strict', nan):.3f} "
                     f"| {a.get('eval/score', nan):.3f} | {r['reward_last10']:.3f} | {r['kl_last10']:.4f} "
                     f"| {r['minutes']} |")
    write_text_atomic(output / "ablation.md", "\n".join(lines) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in rows:
        m = read_jsonl(output / r["variant"] / "metrics.jsonl")
        ax1.plot([x["step"] for x in m], [x.get("reward/mean") for x in m], label=r["variant"])
        ax2.plot([x["step"] for x in m], [x.get("train/kl") for x in m], label=r["variant"])
    ax1.set_title("train reward (mean)")
    ax2.set_title("KL to reference (k3)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, output / "ablation.png")
    plt.close(fig)
