"""`udm-grpo train`: UDM-GRPO fine-tuning (default: the shipped tiny-world model with ShapeEval)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_world_grpo.yaml"
ROOT_TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "template.yaml"  # in a source checkout
LAYERS = (f"Configuration layers, later wins: the tiny-world defaults ({DEFAULT_CONFIG.name}) <- --config FILE <- "
          "KEY=VALUE overrides, so a file needs only the keys it changes (--print-template shows every key). "
          "--resume without --config continues with the run's own config.yaml.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"{p.description}. {LAYERS}"
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. sampling.num_images_per_prompt=16 training.lr=3e-5")
    p.add_argument("--config", default=None, help="YAML run config layered on the tiny-world defaults")
    p.add_argument("-o", "--output", default=None, help="run folder (experiment.output_dir)")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (training.max_steps); with "
                   "--resume, the new total")
    p.add_argument("--resume", default=None, metavar="latest|RUN|CHECKPOINT",
                   help="continue the newest checkpoint of the run folder (latest or RUN), or a checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace a run folder that already holds a run")
    p.add_argument("--check", action="store_true",
                   help="validate the config, reward, model folder and prompts; print the world layout, the batch "
                   "plan and an estimate of memory per GPU, and exit")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="with --check: plan for N processes (default: WORLD_SIZE of the launcher, else 1)")
    p.add_argument("--print-template", action="store_true", help="print a commented config with every key and exit")


def template_text() -> str:
    from ..config import config_template, load_config

    title = ("udm-grpo run configuration: every key, with the tiny-world values `udm-grpo train` starts from.\n"
             "Copy it, edit it and run `udm-grpo train --config my_run.yaml`. " + LAYERS + "\n"
             "'(paper: X)' marks the paper's URSA-1.7B recipe where it differs.\n"
             "Regenerate: udm-grpo train --print-template > configs/template.yaml")
    return config_template(load_config(DEFAULT_CONFIG), title)


def resolve_config(args):
    """(Config, checkpoint folder to resume or None) from the layers, -o, --steps and --resume."""
    from ..config import load_config
    from ..errors import UserError
    from ..grpo.checkpoint import resolve_checkpoint, run_folder_of

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}.")
    if args.output is not None and not args.output.strip():
        raise UserError("-o/--output must name a folder.")
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"experiment.output_dir={args.output}")
    if args.steps is not None:
        overrides.append(f"training.max_steps={args.steps}")
    layers = [DEFAULT_CONFIG, args.config]
    notes = {str(DEFAULT_CONFIG): "the default layer"}
    cfg = load_config(layers, overrides, notes=notes)
    if not args.resume:
        return cfg, None
    ckpt = resolve_checkpoint(args.resume, Path(cfg.experiment.output_dir))
    run = run_folder_of(ckpt)
    if run is not None and not args.output:
        overrides.append(f"experiment.output_dir={run}")
    if run is not None and not args.config and (run / "config.yaml").is_file():
        layers = [run / "config.yaml"]
    return load_config(layers, overrides, notes=notes), ckpt


def check(cfg, processes: int | None = None) -> None:
    """Everything `train` would load, checked without loading weights (reward, model folder, prompts); then
    the world layout, the batch plan and the memory estimate for `processes` (default: the launcher's)."""
    import os

    from ..data.prompts import load_prompts
    from ..errors import UserError
    from ..grpo.batching import plan_from_config
    from ..grpo.engine import engine_spec, world_layout
    from ..models.pipeline import URSAPipeline, resolve_model
    from ..rewards import check_prompt_source, check_reward
    from ..tinyworld import SHIPPED_MODEL

    if int(os.environ.get("RANK", 0)) != 0:  # under a launcher: the main process reports for all
        return
    if processes is not None and processes < 1:
        raise UserError(f"--processes must be a positive integer, got {processes}.")
    world = processes or int(os.environ.get("WORLD_SIZE", 1))
    spec = engine_spec(cfg.training.engine, cfg.training.zero_stage)
    plan = plan_from_config(cfg, world)
    print(world_layout(world, spec, {} if processes else None))
    print(plan.describe())
    check_reward(cfg.reward.name, cfg.reward.params)
    folder = resolve_model(cfg.model.path) if cfg.model.path else SHIPPED_MODEL
    index = URSAPipeline.check_folder(folder)
    print(memory_text(cfg, folder, index, spec, plan))
    for source in (cfg.data.train or "shapes:train", cfg.data.test or "shapes:test"):
        check_prompt_source(cfg.reward.name, load_prompts(source), source)
    print("check passed: the reward, the model folder and the prompt files are usable")


def memory_text(cfg, folder: Path, index: dict, spec, plan) -> str:
    """The memory estimate for the model in `folder` (its parsed model_index.json is `index`)."""
    from ..grpo.memory import Shape, describe, estimate
    from ..models.io import read_config
    from ..models.pipeline import DEFAULT_PROMPT_LENGTH
    from ..models.transformer import URSAConfig

    data, path = read_config(folder / "transformer", "transformer")
    shape = Shape.from_config(URSAConfig.from_dict(data, str(path)))
    vae, _ = read_config(folder / "vae", "vae")
    stride = vae.get("patch_size") or 2 ** (len(vae.get("block_out_channels", [0] * 5)) - 1)
    r = cfg.sampling.rollout
    text = int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH))
    gib = estimate(shape, spec.kind, spec.zero_stage, plan.num_processes, cfg.bf16, cfg.reward.kl_beta > 0,
                   cfg.model.gradient_checkpointing, plan.micro_batch_size, r.batch_size or plan.images_per_process,
                   text, (r.height // stride) * (r.width // stride), r.guidance_scale != 1.0,
                   cfg.model.lora is not None)
    return describe(gib, shape)


def run(args) -> int:
    if args.print_template:
        print(template_text(), end="")
        return 0
    cfg, ckpt = resolve_config(args)
    if args.check:
        check(cfg, args.processes)
        return 0
    from ..grpo.control import check_run_dir
    from ..grpo.evaluation import verdict
    from ..grpo.logger import read_jsonl
    from ..grpo.trainer import TrainingError, UDMGRPOTrainer

    check_run_dir(Path(cfg.experiment.output_dir), ckpt, args.force)  # before loading anything
    start = time.time()
    trainer = UDMGRPOTrainer(cfg)
    try:
        result = trainer.train(resume=str(ckpt) if ckpt else None, force=args.force)
    except TrainingError as e:
        print(f"udm-grpo train: stopped: {e}")
        return 1
    finish_processes(trainer.acc)
    if trainer.acc.is_main_process:
        run_dir = Path(cfg.experiment.output_dir)
        if result["interrupted"]:
            print(f"udm-grpo train: interrupted; saved checkpoint step {result['step']} in {run_dir / 'checkpoints'}; "
                  f"continue with --resume latest -o {run_dir}.")
            return 130
        first = result["first_eval"] or next(iter(read_jsonl(run_dir / "eval.jsonl")), {})
        print(verdict(first, result["eval"], trainer.eval_records, result["step"],
                      (time.time() - start) / 60, run_dir, cfg.reward.name == "shapeeval"))
    return 0


def finish_processes(acc) -> None:
    """Wait for every process, then close the process group (an open gloo group can abort at exit)."""
    if acc.num_processes > 1:
        acc.wait_for_everyone()
        acc.end_training()
