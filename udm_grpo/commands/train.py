"""`udm-grpo train`: UDM-GRPO fine-tuning (default: the shipped tiny-world model with ShapeEval)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_world_grpo.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. sampling.num_images_per_prompt=16 training.lr=3e-5")
    p.add_argument("--config", default=None, help=f"YAML run config (default: {DEFAULT_CONFIG.name}, the tiny world)")
    p.add_argument("-o", "--output", default=None, help="run folder (experiment.output_dir)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (training.max_steps)")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of the run folder, or from a checkpoint folder")
    p.add_argument("--check", action="store_true", help="validate the config, print the batch plan and exit")


def run(args) -> int:
    from ..config import load_config

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"experiment.output_dir={args.output}")
    if args.steps is not None:
        overrides.append(f"training.max_steps={args.steps}")
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    if args.check:
        from ..grpo.batching import plan_from_config

        print(plan_from_config(cfg, 1).describe())
        return 0
    from ..grpo.trainer import TrainingError, UDMGRPOTrainer

    trainer = UDMGRPOTrainer(cfg)
    try:
        result = trainer.train(resume=args.resume)
    except TrainingError as e:
        print(f"udm-grpo train: stopped: {e}")
        return 1
    if trainer.acc.is_main_process:
        print(json.dumps({"step": result["step"], "eval": result["eval"]}))
        print(f"run folder: {cfg.experiment.output_dir}")
    return 0
