"""`udm-grpo pretrain`: build and pretrain a tiny-world URSA model from scratch (deterministic per seed)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import UserError
from ..outputs import atomic_folder, check_output, write_text_atomic
from ..recipes import recipes_help, resolve_config_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=500")
    p.add_argument("--config", metavar="FILE|RECIPE",
                   help=f"keys of TinyWorldConfig: {recipes_help('pretrain')} (the shipped model's)")
    p.add_argument("-o", "--output", default="tiny-world", help="pipeline folder to write (default tiny-world)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--rescore", action="store_true", help="only re-record base_eval.json of the existing model "
                   "folder -o with the current code (after a change to the sampler or ShapeEval)")


def run(args) -> int:
    import torch

    from ..config import load_config, save_resolved
    from ..models.pipeline import URSAPipeline
    from ..tinyworld import TinyWorldConfig, build_pipeline, pretrain, record_base_eval

    out = Path(args.output)
    if args.rescore:
        return rescore(out)
    cfg = load_config(resolve_config_path(args.config, "pretrain"), args.overrides, schema=TinyWorldConfig)
    check_output(out, "folder", args.force)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    print("building the tiny world (rendering scenes, fitting the patch codebook)...", flush=True)
    pipe = build_pipeline(cfg)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"transformer: {n_params / 1e6:.2f} M parameters; training {cfg.steps} steps", flush=True)
    history = pretrain(pipe, cfg, log=lambda line: print(line, flush=True))
    wall = round(time.time() - start, 1)
    pipe.transformer.to(getattr(torch, cfg.save_dtype))
    with atomic_folder(out) as partial:
        pipe.save_pretrained(partial)
        save_resolved(cfg, partial / "pretrain_config.yaml")
        if cfg.final_images_per_tag:
            print("recording the final accuracy on the test split (base_eval.json)...", flush=True)
            saved = URSAPipeline.from_pretrained(partial)  # what users will load
            base_eval = record_base_eval(saved, cfg.sampling.options(), cfg.final_images_per_tag)
            write_text_atomic(partial / "base_eval.json", json.dumps(base_eval, indent=2) + "\n")
        record = {"wall_seconds": wall, "parameters": n_params, "history": history}
        write_text_atomic(partial / "pretrain_log.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} in {record['wall_seconds']} s")
    return 0


def rescore(folder: Path) -> int:
    """Re-record `folder/base_eval.json` with the settings of its pretrain_config.yaml."""
    from ..config import load_config
    from ..models.pipeline import URSAPipeline
    from ..tinyworld import TinyWorldConfig, record_base_eval

    settings = folder / "pretrain_config.yaml"
    if not settings.is_file():
        raise UserError(f"--rescore: {settings} does not exist (not a tiny-world model folder written by pretrain).")
    cfg = load_config(settings, schema=TinyWorldConfig)
    check_output(folder / "base_eval.json", "file", force=True, flag="--rescore")
    base_eval = record_base_eval(URSAPipeline.from_pretrained(folder), cfg.sampling.options(),
                                 cfg.final_images_per_tag or 64)
    write_text_atomic(folder / "base_eval.json", json.dumps(base_eval, indent=2) + "\n")
    o = base_eval["full"]["overall"]
    print(f"wrote {folder / 'base_eval.json'}: strict {o['strict']:.3f}, score {o['score']:.3f} "
          f"({base_eval['full']['images_per_tag']} images per tag)")
    return 0
