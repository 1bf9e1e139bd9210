"""The paper's ablation ladder, trained for the same budget and seeds, as one use of `comparison`.

| variant | action | states | rollout guidance |
|---|---|---|---|
| naive GRPO | each step's x1_hat^{(k)} | rollout's own x_t | CFG |
| + clean action | final x1_hat | rollout's own x_t | CFG |
| + forward states | final x1_hat | forward-noised around x1_hat | CFG |
| + CFG-free (UDM-GRPO) | final x1_hat | forward-noised | none |

Runs go to OUT/<variant>/seed-<s>/; the table, plot and manifest to OUT/ablation.md, .png and .json.
"""

from __future__ import annotations

import json
from pathlib import Path

from .comparison import Variant, run_comparison

VARIANTS: dict[str, dict] = {
    "naive": {"sampling.clean_response": False, "sampling.forward_process": False},
    "+clean-action": {"sampling.clean_response": True, "sampling.forward_process": False},
    "+forward-states": {"sampling.clean_response": True, "sampling.forward_process": True},
    "+cfg-free": {"sampling.clean_response": True, "sampling.forward_process": True,
                  "sampling.rollout.guidance_scale": 1.0},
}


def ladder(cfg_scale: float = 3.0, names: list[str] | None = None) -> list[Variant]:
    """The ladder's variants (or those named), the CFG ones guided by `cfg_scale`."""
    variants = []
    for name in names or list(VARIANTS):
        settings = {"sampling.rollout.guidance_scale": cfg_scale, **VARIANTS[name]}
        note = " (" + ", ".join(f"{k.rsplit('.', 1)[1]}={v}" for k, v in settings.items()) + ")"
        variants.append(Variant(name, None, tuple(f"{k}={json.dumps(v)}" for k, v in settings.items()), note))
    return variants


def run_ablation(config_path, overrides: list[str], output: Path, steps: int, cfg_scale: float = 3.0,
                 variants: list[str] | None = None, make_trainer=None, force: bool = False,
                 seeds: list[int] = (0,), metric: str = "strict") -> list[dict]:
    """Train each variant x seed into `output/<variant>/seed-<s>` (resumable; `force` replaces the runs) and
    write output/ablation.md, .png and .json; returns the per-run rows ([] when interrupted).

    `make_trainer(config)` builds the trainer (default `UDMGRPOTrainer(config)`).
    """
    result = run_comparison(config_path, overrides, ladder(cfg_scale, variants), Path(output), steps, seeds,
                            force, metric, make_trainer, report="ablation", title="Ablation ladder")
    return result.get("runs", [])
