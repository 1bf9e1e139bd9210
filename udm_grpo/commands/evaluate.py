"""`udm-grpo eval shapes`: ShapeEval of a model on a split or a GenEval-schema metadata file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .common import add_model_argument, load_pipeline, sampling_arguments, sampling_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    s = sub.add_parser("shapes", help="ShapeEval (tiny world, GenEval rules, exact detector)",
                       description="Sample N images per prompt and score them with ShapeEval; writes "
                       "results.json (strict accuracy and mean score per tag and overall) and grid.png.")
    s.add_argument("--split", choices=["train", "test"], default="test")
    s.add_argument("--metadata", help="GenEval-schema JSONL file to evaluate instead of a split")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    s.add_argument("-n", "--images-per-prompt", type=int, default=4)
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
    from ..images import make_grid, save_png
    from ..tinyworld import evaluate_shapes

    if args.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}.")
    records = read_metadata_jsonl(args.metadata) if args.metadata else generate_records(args.split, None, 0)
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
    summary, images = evaluate_shapes(pipe, records, args.images_per_prompt, args.seed, sampling,
                                      args.batch_size, progress=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model or "shipped tiny-world model",
        "checkpoint": args.checkpoint,
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
    if args.per_tag is not None:  # one row per tag: its first four images
        tags = list(dict.fromkeys(r["tag"] for r in records))
        pick = [i for t in tags for i in [j for j, r in enumerate(records) if r["tag"] == t][:4]]
        grid = make_grid(images[pick], nrow=min(4, args.per_tag), labels=tags, scale=2)
    else:
        shown = min(len(records), 16)
        grid = make_grid(images[: shown * args.images_per_prompt], nrow=args.images_per_prompt,
                         labels=[r["prompt"] for r in records[:shown]], scale=2)
    save_png(grid, out / "grid.png")
    for tag, row in sorted(summary["per_tag"].items()):
        print(f"{tag:14s} strict {row['strict']:.3f}  score {row['score']:.3f}  (n={row['n']})")
    o = summary["overall"]
    print(f"{'overall':14s} strict {o['strict']:.3f}  score {o['score']:.3f}  (n={o['n']})")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return 0
