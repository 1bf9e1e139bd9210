"""`udm-grpo sample`: prompts -> a captioned PNG grid (one row per prompt, or 8 captioned images per row)."""

from __future__ import annotations

import argparse
import time

from ..data.prompts import load_prompts
from ..errors import UserError
from ..outputs import check_output
from .common import (
    add_model_argument,
    load_pipeline,
    positive_int,
    sampling_arguments,
    sampling_from_args,
    warn_unknown_words,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", help="prompt file: .txt (one prompt per line) or .jsonl (records with a 'prompt')")
    p.add_argument("-n", "--images-per-prompt", type=positive_int, default=4)
    p.add_argument("-o", "--output", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    add_model_argument(p)
    sampling_arguments(p)


def run(args) -> int:
    import torch

    from ..images import grouped_grid, save_png

    for i, prompt in enumerate(args.prompts, 1):
        if not prompt.strip():
            raise UserError(f"prompt {i} is blank; give each prompt some words, e.g. \"a photo of a red circle\".")
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += [r["prompt"] for r in load_prompts(args.prompts_file)]
    if not prompts:
        raise UserError("give at least one prompt (as arguments or with --prompts-file).")
    sampling = sampling_from_args(args)
    out = check_output(args.output, "file", args.force, sources=[args.prompts_file])
    pipe = load_pipeline(args.model, args.device, args.checkpoint)
    warn_unknown_words(pipe, prompts, "sample")
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    start = time.perf_counter()
    result = pipe(prompts, sampling, num_images_per_prompt=args.images_per_prompt, generator=gen)
    seconds = time.perf_counter() - start
    per = args.images_per_prompt
    if per == 1:  # one caption per image, up to 8 per row
        grid = grouped_grid(result.images, [("", range(len(prompts)))], captions=prompts)
    else:  # one row (or more, 8 per row) per prompt, labelled with it
        grid = grouped_grid(result.images, [(p, range(i * per, (i + 1) * per)) for i, p in enumerate(prompts)])
    save_png(grid, out)
    n = len(result.images)
    print(f"wrote {out}: {n} images in {seconds:.2f} s ({n / seconds:.1f} images/s)")
    return 0
