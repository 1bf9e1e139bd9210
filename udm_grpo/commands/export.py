"""`udm-grpo export`: a training checkpoint -> a complete pipeline folder, optionally in bf16/fp16.

Checkpoints keep float32 master weights (exact resume); exporting to a lower precision is this
separate, explicit step. A LoRA checkpoint's adapter is merged into its base's transformer (W + B A * scale, in
float32, by peft's `merge_and_unload`), so the folder is a full pipeline in the official layout.
"""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..outputs import atomic_folder, check_output
from .common import add_model_argument, load_pipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("-o", "--output", required=True, help="pipeline folder to write (official URSA layout)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="transformer weights on disk (default bfloat16)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    import torch

    from .common import read_sources

    if not args.checkpoint:
        raise UserError("give the training run or checkpoint to export with --checkpoint.")
    out = check_output(args.output, "folder", args.force, sources=read_sources(args.model, args.checkpoint, run=True))
    pipe = load_pipeline(args.model, args.device, args.checkpoint)
    pipe.transformer.to(getattr(torch, args.dtype))
    with atomic_folder(out) as partial:
        pipe.save_pretrained(partial)
    print(f"wrote {out} ({args.dtype} transformer); sample with: udm-grpo sample \"...\" --model {out}")
    return 0
