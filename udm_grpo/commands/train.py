"""`udm-grpo train`: UDM-GRPO fine-tuning (default: the shipped tiny-world model with ShapeEval)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..recipes import TINY_WORLD_LAYER
from .common import fraction, positive_float, positive_int

DEFAULT_CONFIG = TINY_WORLD_LAYER
ROOT_TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "template.yaml"  # in a source checkout
LAYERS = (f"Configuration layers, later wins: the tiny-world defaults ({DEFAULT_CONFIG.name}) <- --config FILE <- "
          "KEY=VALUE overrides, so a file needs only the keys it changes (--print-template shows every key). "
          "--resume without --config continues with the run's own config.yaml.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"{p.description}. {LAYERS}"
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. sampling.num_images_per_prompt=16 training.lr=3e-5")
    from ..recipes import recipes_help

    p.add_argument("--config", default=None, metavar="FILE|RECIPE",
                   help=f"run config layered on the tiny-world defaults: {recipes_help()}")
    p.add_argument("-o", "--output", default=None, help="run folder (experiment.output_dir)")
    p.add_argument("--steps", type=positive_int, default=None, help="total optimiser steps (training.max_steps); with "
                   "--resume, the new total")
    p.add_argument("--resume", default=None, metavar="latest|RUN|CHECKPOINT",
                   help="continue the newest checkpoint of the run folder (latest or RUN), or a checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace a run folder that already holds a run")
    p.add_argument("--check", action="store_true",
                   help="validate the config, reward, model folder and prompts; print the world layout, the batch "
                   "plan and an estimate of memory per GPU, and exit")
    p.add_argument("--processes", type=positive_int, default=None, metavar="N",
                   help="with --check: plan for N processes (default: WORLD_SIZE of the launcher, else 1)")
    p.add_argument("--simulate", action="store_true",
                   help="with --check: run the policy's phases at the model's real shape on fake tensors (config files "
                   "only, no GPU) and print FLOPs and peak bytes per phase, whether the peak fits --gpu-memory and the "
                   "predicted seconds per iteration, for the configured engine and --processes. " + NOT_SIMULATED)
    p.add_argument("--gpu-memory", default="h100", type=_gpu_memory, metavar="GIB|PRESET",
                   help="with --simulate: GiB per GPU, or h200, h100, a100-80, l40s, a100-40, rtx4090 (default h100)")
    p.add_argument("--headroom", type=fraction, default=0.1, metavar="FRACTION",
                   help="with --simulate: the share of --gpu-memory kept free for what is not simulated (reward "
                   "models, allocator fragmentation, CUDA workspaces, communication buffers); default 0.1")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0,
                   help="with --simulate: the GPU's peak TFLOP/s in the compute dtype (default 989, H100 bf16)")
    p.add_argument("--mfu", type=positive_float, default=0.4, help="with --simulate: model FLOPs utilisation assumed "
                   "for the predicted time (default 0.4)")
    p.add_argument("--codebook", type=positive_int, default=None, metavar="K",
                   help="with --simulate: the codebook size K instead of the model's (K of URSA-1.7B is not confirmed)")
    p.add_argument("--fit", action="store_true",
                   help="with --simulate: search micro-batch, rollout batch, checkpointing level and offload (with "
                   "--fit-lora also LoRA on and off) for the plan predicted fastest whose simulated peak fits "
                   "--gpu-memory, and print its overrides (minutes at the 1.7B shape)")
    p.add_argument("--fit-lora", action="store_true", help="with --fit: also try LoRA on and off")
    p.add_argument("--json", action="store_true", help="with --simulate: print one JSON object instead")
    p.add_argument("--print-template", action="store_true",
                   help="print a commented config with every key and exit (with --config or overrides: their values)")


NOT_SIMULATED = ("Not simulated: reward models, communication buffers beyond the engines' buckets, allocator "
                 "fragmentation, CUDA workspaces")


def _gpu_memory(text: str) -> int:
    from ..grpo.simulate import gpu_memory_bytes

    try:
        return gpu_memory_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(args) -> tuple[int, float]:
    """(bytes of --gpu-memory a plan may use: less --headroom, the FLOP/s an iteration runs at: peak x MFU)."""
    return int(args.gpu_memory * (1 - args.headroom)), args.peak_tflops * 1e12 * args.mfu


def simulate_text(cfg, start, args) -> tuple[str, bool]:
    """The --simulate report (text, or one JSON object with --json) and whether the peak fits --gpu-memory."""
    import json

    from ..grpo.simulate import simulate_iteration

    sim = simulate_iteration(cfg, start.folder, start.index, start.plan, start.spec, args.codebook)
    usable, peak_flops = _budget(args)
    fits = sim["peak_bytes"]["total"] <= usable
    seconds = sim["flops"]["total"] / peak_flops
    if args.json:
        return json.dumps({**sim, "gpu_memory_bytes": args.gpu_memory, "usable_bytes": usable, "fits": fits,
                           "predicted_seconds_per_iteration": seconds}), fits
    gib = 2**30
    lines = [f"simulation on fake tensors ({sim['params'] / 1e6:,.1f}M parameters, "
             f"{sim['trainable_params'] / 1e6:,.1f}M trained, K = {sim['codebook']:,}, {sim['engine']} over "
             f"{sim['processes']} process(es)), one process's view in the steady state, GiB. {NOT_SIMULATED}:"]
    for name, phase in sim["phases"].items():
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in phase["peak_bytes"].items() if k != "total")
        lines.append(f"  {name:18s} {phase['flops'] / 1e12:10.2f} TFLOP per iteration, peak "
                     f"{phase['peak_bytes']['total'] / gib:8.2f} GiB ({parts})")
    lines.append(f"  peak {sim['peak_bytes']['total'] / gib:.2f} GiB in the {sim['peak_phase']}: "
                 f"{'fits' if fits else 'does NOT fit'} {usable / gib:.1f} GiB ({args.gpu_memory / gib:.0f} GiB less "
                 f"--headroom {args.headroom:g}); predicted "
                 f"{seconds:.2f} s per iteration at {args.peak_tflops:g} TFLOP/s x {args.mfu:g} MFU (a prediction)")
    return "\n".join(lines), fits


def fit_report(cfg, start, args) -> int:
    """`--fit`: the fastest plan predicted to fit --gpu-memory, as overrides and its whole simulation (text or
    JSON); UserError naming the smallest plan when none fits."""
    import json

    from ..errors import UserError
    from ..grpo.fit import fit
    from ..grpo.simulate import Iteration

    it = Iteration.from_run(cfg, start.folder, start.index, start.plan, start.spec, args.codebook)
    usable, peak_flops = _budget(args)
    best, whole, smallest = fit(it, usable, peak_flops, args.fit_lora)
    where = f"{it.processes} x {args.gpu_memory / 2**30:.3g} GiB ({usable / 2**30:.3g} GiB usable with --headroom " \
        f"{args.headroom:g})"
    if best is None:
        raise UserError(f"no plan fits {where}: the smallest needs {smallest.peak_bytes / 2**30:.2f} GiB per GPU, "
                        f"with {' '.join(smallest.overrides(it)) or 'the configured settings'}.")
    overrides = best.overrides(it)
    if args.json:
        print(json.dumps({"fits": True, "overrides": overrides, "predicted_seconds_per_iteration": best.seconds,
                          "gpu_memory_bytes": args.gpu_memory, "usable_bytes": usable, **whole}))
        return 0
    print(f"fastest plan that fits {where} (predicted at {args.peak_tflops:g} TFLOP/s x {args.mfu:g} MFU; "
          f"{NOT_SIMULATED}):\n  {best.describe()}; whole simulation: peak {whole['peak_bytes']['total'] / 2**30:.2f} "
          f"GiB in the {whole['peak_phase']}\n  overrides: {' '.join(overrides) or '(none: the config as it is)'}")
    return 0


def template_text(cfg=None) -> str:
    """The commented template of `cfg` (default: the tiny-world defaults)."""
    from ..config import config_template, load_config

    title = ("udm-grpo run configuration: every key, with the tiny-world values `udm-grpo train` starts from.\n"
             "Copy it, edit it and run `udm-grpo train --config my_run.yaml`. " + LAYERS + "\n"
             "'(paper: X)' marks the paper's URSA-1.7B recipe where it differs.\n"
             "Regenerate: udm-grpo train --print-template > configs/template.yaml")
    return config_template(cfg or load_config(DEFAULT_CONFIG), title)


def resolve_config(args):
    """(Config, checkpoint folder to resume or None) from the layers, -o, --steps and --resume."""
    from ..config import load_config
    from ..errors import UserError
    from ..grpo.checkpoint import resolve_checkpoint, run_folder_of
    from ..recipes import run_config

    if args.output is not None and not args.output.strip():
        raise UserError("-o/--output must name a folder.")
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"experiment.output_dir={args.output}")
    if args.steps is not None:
        overrides.append(f"training.max_steps={args.steps}")
    cfg = run_config(args.config, overrides)
    if not args.resume:
        return cfg, None
    ckpt = resolve_checkpoint(args.resume, Path(cfg.experiment.output_dir))
    run = run_folder_of(ckpt)
    if run is not None and not args.output:
        overrides.append(f"experiment.output_dir={run}")
    if run is None or args.config or not (run / "config.yaml").is_file():
        return run_config(args.config, overrides), ckpt
    return load_config(run / "config.yaml", overrides), ckpt


def check(cfg, processes: int | None = None, args=None) -> int:
    """Every check a training start makes (`preflight.check_start`, no weights loaded), then the world layout,
    the batch plan and the memory estimate for `processes` (default: the launcher's). 1 when the estimate fits
    no GPU."""
    import os

    from ..grpo.engine import world_layout
    from ..grpo.memory import GPU_PRESETS, fitting_gpus
    from ..grpo.preflight import check_start

    if int(os.environ.get("RANK", 0)) != 0:  # under a launcher: the main process reports for all
        return 0
    world = processes or int(os.environ.get("WORLD_SIZE", 1))
    start = check_start(cfg, world)
    if start.folder is not None:
        from ..grpo.simulate import shape_configs

        shape_configs(start.folder)  # before printing anything: every shape key is there
    if args is not None and args.fit:
        return fit_report(cfg, start, args)
    if args is not None and args.simulate:
        text, fits = simulate_text(cfg, start, args)
        if args.json:
            print(text)
            return 0 if fits else 1
    print(world_layout(world, start.spec, {} if processes else None))
    print(start.plan.describe())
    estimate, total = memory_text(cfg, start.folder, start.index, start.spec, start.plan)
    print(estimate)
    if args is not None and args.simulate:
        print(text)
        if not fits:
            print("check failed: the simulated peak does not fit --gpu-memory.")
            return 1
    fits = fitting_gpus(total)
    if not fits:
        largest, size = next(iter(GPU_PRESETS.items()))
        print(f"check failed: the config, reward, model folder and prompt files are usable, but {total:,.1f} GiB per "
              f"GPU fits no GPU (the largest, {largest}, has {size} GiB); use more processes with ZeRO-3 or FSDP, "
              "gradient checkpointing, smaller micro-batches or LoRA.")
        return 1
    print(f"check passed: the config, reward, model folder and prompt files are usable, and {total:,.2f} GiB per "
          f"GPU fits {', '.join(fits)}.")
    return 0


def memory_text(cfg, folder: Path, index: dict, spec, plan) -> tuple[str, float]:
    """The memory estimate for the model in `folder` (its parsed model_index.json is `index`) and its total
    in GiB."""
    from ..grpo.memory import Shape, describe, estimate
    from ..grpo.simulate import shape_configs
    from ..models.pipeline import DEFAULT_PROMPT_LENGTH
    from ..models.transformer import URSAConfig
    from ..models.vae import vae_geometry

    data, _ = shape_configs(folder)
    path = folder / "transformer" / "config.json"
    shape = Shape.from_config(URSAConfig.from_dict(data, str(path)))
    stride, _ = vae_geometry(folder / "vae")
    r = cfg.sampling.rollout
    text = int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH))
    gib = estimate(shape, spec.kind, spec.zero_stage, plan.num_processes, cfg.bf16, cfg.reward.kl_beta > 0,
                   cfg.model.gradient_checkpointing, plan.micro_batch_size, r.batch_size or plan.images_per_process,
                   text, (r.height // stride) * (r.width // stride), r.guidance_scale != 1.0,
                   cfg.model.lora is not None)
    return describe(gib, shape), gib["total"]


def run(args) -> int:
    from ..errors import UserError

    if args.print_template:
        if args.resume or args.check or args.force or args.processes is not None:
            raise UserError("--print-template prints a config and exits; it takes --config, -o, --steps and "
                            "KEY=VALUE overrides (whose values it shows), not --resume, --check, --force or "
                            "--processes.")
        print(template_text(resolve_config(args)[0]), end="")
        return 0
    if args.processes is not None and not args.check:
        raise UserError("--processes only plans a --check (a real run takes the number of processes from its "
                        "launcher, e.g. accelerate launch --num_processes N).")
    cfg, ckpt = resolve_config(args)
    if args.simulate and not args.check or (args.codebook or args.json or args.fit) and not args.simulate or \
            args.fit_lora and not args.fit:
        raise UserError("--simulate goes with --check, --codebook, --json and --fit with --simulate, and --fit-lora "
                        "with --fit (udm-grpo train --check --simulate [--fit [--fit-lora]] [--codebook K] [--json]).")
    if args.check:
        return check(cfg, args.processes, args)
    from ..errors import TrainingError
    from ..grpo.logger import read_jsonl
    from ..grpo.run_folder import check_run_dir
    from ..grpo.trainer import UDMGRPOTrainer
    from .verdict import verdict

    check_run_dir(Path(cfg.experiment.output_dir), ckpt, args.force, [cfg.model.path])  # before loading anything
    start = time.time()
    trainer = UDMGRPOTrainer(cfg)
    try:
        result = trainer.train(resume=ckpt, force=args.force)
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
