"""`udm-grpo eval shapes`: ShapeEval of a model on a split or a GenEval-schema metadata file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .common import add_model_argument, load_pipeline, sampling_arguments, sampling_from_args, warn_unknown_words


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    s = sub.add_parser("shapes", help="ShapeEval (tiny world, GenEval rules, exact detector)",
                       description="Sample N images per prompt and score them with ShapeEval; writes "
                       "results.json (strict accuracy and mean score per tag and overall) and grid.png.")
    s.add_argument("--split", choices=["train", "test"], default="test")
    s.add_argument("--metadata", help="GenEval-schema JSONL file to evaluate instead of a split")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    s.add_argument("-n", "--images-per-prompt", type=int, default=None, help="images per prompt (default 4)")
    s.add_argument("--per-tag", type=int, default=None, metavar="N",
                   help="instead of -n: N images per tag, cycling through each tag's prompts (balances the "
                   "noise of small tags)")
    s.add_argument("-o", "--output", default="eval-shapes", help="output folder (default eval-shapes)")
    s.add_argument("--batch-size", type=int, default=64)
    add_model_argument(s)
    sampling_arguments(s)


def run(args) -> int:
    from ..data.prompts import balance_tags
    from ..data.shapes import generate_records, read_metadata_jsonl
    from ..images import grouped_grid, save_png
    from ..tinyworld import evaluate_shapes

    if args.per_tag is not None and args.images_per_prompt is not None:
        raise UserError("--per-tag and -n/--images-per-prompt exclude each other (--per-tag samples one image per "
                        "prompt); give only one of them.")
    if args.images_per_prompt is None:
        args.images_per_prompt = 4
    if args.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}.")
    if args.metadata:
        records = read_metadata_jsonl(args.metadata, world=True)
    else:
        records = generate_records(args.split, None, 0)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise UserError("no prompts to evaluate.")
    if args.per_tag is not None:
        if args.per_tag < 1 or not all("tag" in r for r in records):
            raise UserError("--per-tag needs a positive count and a 'tag' in every metadata record.")
        records, args.images_per_prompt = balance_tags(records, args.per_tag), 1
    sampling = sampling_from_args(args)
    pipe = load_pipeline(args.model, args.device, args.checkpoint)
    warn_unknown_words(pipe, [r["prompt"] for r in records], "eval")
    checkpoint, checkpoint_step = scored_checkpoint(args.checkpoint)
    summary, images = evaluate_shapes(pipe, records, args.images_per_prompt, args.seed, sampling,
                                      args.batch_size, progress=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model or "shipped tiny-world model",
        "checkpoint": checkpoint,
        "checkpoint_step": checkpoint_step,
        "source": args.metadata or f"split:{args.split}",
        "prompts": len(records),
        "images_per_prompt": args.images_per_prompt,
        "images_per_tag": args.per_tag,
        "seed": args.seed,
        "sampling": vars(sampling),
        **summary,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "results.json")
    per = args.images_per_prompt
    if per == 1:  # one row per tag: its first 8 images, each captioned with its prompt
        by_tag: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_tag.setdefault(r.get("tag", ""), []).append(i)
        grid = grouped_grid(images, [(t, idx[:8]) for t, idx in by_tag.items()],
                            captions=[r["prompt"] for r in records])
    else:  # one row per prompt (the first 16): up to 8 of its images
        grid = grouped_grid(images, [(f"{r.get('tag', '')}: {r['prompt']}", range(i * per, i * per + min(per, 8)))
                                     for i, r in enumerate(records[:16])])
    save_png(grid, out / "grid.png")
    print("95% intervals: Agresti-Coull per tag for strict, normal for score; overall = mean over tags")
    for tag, row in [*summary["per_tag"].items(), ("overall", summary["overall"])]:
        print(f"{tag:14s} strict {row['strict']:.3f} +-{row['strict_ci95']:.3f}  "
              f"score {row['score']:.3f} +-{row['score_ci95']:.3f}  (n={row['n']})")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return 0


def scored_checkpoint(checkpoint: str | None) -> tuple[str | None, int | None]:
    """The checkpoint folder `--checkpoint` names, resolved as `load_pipeline` does (a run folder: its latest
    checkpoint), and the step its trainer_state.json records; (None, None) without --checkpoint."""
    if not checkpoint:
        return None, None
    from ..grpo.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint, flag="--checkpoint")
    try:
        step = json.loads((folder / "trainer_state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    return str(folder), step if isinstance(step, int) and not isinstance(step, bool) else None
