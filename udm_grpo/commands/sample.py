"""`udm-grpo sample`: prompts -> a captioned PNG grid (one row per prompt, or 8 captioned images per row)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UserError
from .common import add_model_argument, load_pipeline, sampling_arguments, sampling_from_args, warn_unknown_words


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("-n", "--images-per-prompt", type=int, default=4)
    p.add_argument("-o", "--output", default="samples.png", help="PNG grid to write (default samples.png)")
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
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: no such file.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one prompt (as arguments or with --prompts-file).")
    if args.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}.")
    sampling = sampling_from_args(args)
    pipe = load_pipeline(args.model, args.device, args.checkpoint)
    warn_unknown_words(pipe, prompts, "sample")
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    start = time.perf_counter()
    out = pipe(prompts, num_images_per_prompt=args.images_per_prompt, generator=gen,
               num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
               guidance_trunc=sampling.guidance_trunc)
    seconds = time.perf_counter() - start
    per = args.images_per_prompt
    if per == 1:  # one caption per image, up to 8 per row
        grid = grouped_grid(out.images, [("", range(len(prompts)))], captions=prompts)
    else:  # one row (or more, 8 per row) per prompt, labelled with it
        grid = grouped_grid(out.images, [(p, range(i * per, (i + 1) * per)) for i, p in enumerate(prompts)])
    save_png(grid, args.output)
    n = len(out.images)
    print(f"wrote {args.output}: {n} images in {seconds:.2f} s ({n / seconds:.1f} images/s)")
    return 0
