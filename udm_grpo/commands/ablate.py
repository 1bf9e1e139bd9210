"""`udm-grpo ablate`: the paper's ladder (naive -> +clean action -> +forward states -> +CFG-free), a
`udm-grpo compare` of fixed variants."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..recipes import recipes_help
from .common import guidance_float, nonnegative_int, positive_int
from .train import DEFAULT_CONFIG


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides shared by all variants")
    p.add_argument("--config", default=None, metavar="FILE|RECIPE",
                   help=f"run config layered on {DEFAULT_CONFIG.name}: {recipes_help()}")
    p.add_argument("-o", "--output", default="runs/ablation", help="folder for the runs, table and plot")
    p.add_argument("--steps", type=positive_int, default=40, help="optimiser steps per variant (default 40)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0], metavar="S",
                   help="training seeds, one run per variant and seed (default 0)")
    p.add_argument("--cfg-scale", type=guidance_float, default=3.0, help="rollout guidance of the CFG variants")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the ladder")
    p.add_argument("--metric", default="strict", help="held-out metric (eval/NAME; default strict, else reward)")
    p.add_argument("--force", action="store_true", help="replace earlier runs in the output folder")


def run(args) -> int:
    from ..errors import TrainingError, UserError
    from ..outputs import check_output
    from ..recipes import resolve_config_path
    from .ablation import VARIANTS, run_ablation

    unknown = [v for v in args.variants or [] if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant '{unknown[0]}'; choose from {', '.join(VARIANTS)}.")
    config = resolve_config_path(args.config)
    check_output(args.output, "folder", exists_ok=True)  # each run folder is checked by run_ablation
    try:
        rows = run_ablation([DEFAULT_CONFIG, config], args.overrides, Path(args.output), args.steps, args.cfg_scale,
                            args.variants, force=args.force, seeds=args.seeds, metric=args.metric)
    except TrainingError as e:
        print(f"udm-grpo ablate: stopped: {e}")
        return 1
    if not rows:
        return 130
    print((Path(args.output) / "ablation.md").read_text())
    return 0
