"""`udm-grpo score`: score image files with a reward; one JSON object per image, then a summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .common import positive_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files, or folders (their images, sorted by name)")
    p.add_argument("--reward", required=True, help="reward name (reward.name), e.g. shapeeval, clipscore, pickscore")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a reward keyword argument (reward.params), e.g. -p model=/path/to/clip; repeatable")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt for every image")
    src.add_argument("--prompts-file", help="text file, one prompt per line, one line per image (in order)")
    src.add_argument("--metadata", help="JSONL file, one record with a 'prompt' per image (in order); "
                     "GenEval-schema records for rule-based rewards")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="refuse images with a side over this many px, read from the header before decoding "
                   "(default $UDM_GRPO_MAX_IMAGE_SIDE, else 4096)")


def image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder.")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item}: no such image file or folder.")
    return files


def parse_params(items: list[str]) -> dict:
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"-p {item!r} must look like key=value, e.g. -p batch_size=8.")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"-p {item!r}: the value cannot be parsed.") from None
    return params


def prompts_and_metadata(args, n: int) -> tuple[list[str], list[dict | None]]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is blank.")
        return [args.prompt] * n, [None] * n
    if args.prompts_file:
        from ..data.prompts import load_prompts

        records = load_prompts(str(Path(args.prompts_file)))
        meta: list[dict | None] = [None] * len(records)
    else:
        from ..data.shapes import read_metadata_jsonl

        records = read_metadata_jsonl(args.metadata)
        meta = list(records)
    source = args.prompts_file or args.metadata
    if len(records) != n:
        raise UserError(f"{source} holds {len(records)} prompts for {n} images; give one per image, in order.")
    from ..rewards import check_prompt_source

    check_prompt_source(args.reward, records, source)
    return [r["prompt"] for r in records], meta


def run(args) -> int:
    import numpy as np

    from ..images import decode_image
    from ..rewards import build_reward

    files = image_files(args.images)
    prompts, metadata = prompts_and_metadata(args, len(files))
    images = [decode_image(f, args.max_side, str(f)) for f in files]
    reward = build_reward(args.reward, parse_params(args.param))
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    rows: list[dict] = [{} for _ in files]
    for idx in by_shape.values():  # a reward call takes images of one size
        out = reward(np.stack([images[i] for i in idx]), [prompts[i] for i in idx], [metadata[i] for i in idx])
        for j, i in enumerate(idx):
            rows[i] = {"image": str(files[i]), "prompt": prompts[i], "score": out.scores[j].item(),
                       "values": {k: v[j].item() for k, v in out.values.items()}}
    for row in rows:
        print(json.dumps(row))
    names = list(rows[0]["values"])
    summary = {"summary": {"reward": args.reward, "images": len(rows),
                           "score": sum(r["score"] for r in rows) / len(rows),
                           **{f"mean {k}": sum(r["values"][k] for r in rows) / len(rows) for k in names}}}
    print(json.dumps(summary))
    return 0
