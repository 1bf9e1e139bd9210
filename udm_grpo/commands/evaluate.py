"""`udm-grpo eval`: ShapeEval on the tiny world (`shapes`), and the benchmarks `geneval`, `pickscore` and `ocr`
(sampled into GenEval's folder layout, resumable, split over processes; see `udm_grpo.eval_suites`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..outputs import check_output, empty_folder, write_text_atomic
from .common import (
    add_model_argument,
    load_pipeline,
    positive_int,
    read_sources,
    sampling_arguments,
    sampling_from_args,
    warn_unknown_words,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    s = sub.add_parser("shapes", help="ShapeEval (tiny world, GenEval rules, exact detector)",
                       description="Sample N images per prompt and score them with ShapeEval; writes "
                       "results.json (strict accuracy and mean score per tag and overall) and grid.png.")
    s.add_argument("--split", choices=["train", "test"], default="test")
    s.add_argument("--metadata", help="GenEval-schema JSONL file to evaluate instead of a split")
    s.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N prompts")
    s.add_argument("-n", "--images-per-prompt", type=positive_int, default=None, help="images per prompt (default 4)")
    s.add_argument("--per-tag", type=positive_int, default=None, metavar="N",
                   help="instead of -n: N images per tag, cycling through each tag's prompts (balances the "
                   "noise of small tags)")
    s.add_argument("-o", "--output", default="eval-shapes", help="output folder (default eval-shapes)")
    s.add_argument("--force", action="store_true", help="replace the results of an earlier evaluation in the folder")
    s.add_argument("--batch-size", type=positive_int, default=64, help="images per pipeline call (default 64)")
    add_model_argument(s)
    sampling_arguments(s)
    for name, (help_text, description) in SUITES.items():
        suite_arguments(sub.add_parser(name, help=help_text, description=description), name)


def run(args) -> int:
    return run_shapes(args) if args.benchmark == "shapes" else run_suite(args)


def run_shapes(args) -> int:
    from .. import eval_suites as es
    from ..data.prompts import balance_tags
    from ..data.shapes import generate_records, read_metadata_jsonl
    from ..images import grouped_grid, save_png
    from ..tinyworld import evaluate_shapes

    if args.per_tag is not None and args.images_per_prompt is not None:
        raise UserError("--per-tag and -n/--images-per-prompt exclude each other (--per-tag samples one image per "
                        "prompt); give only one of them.")
    if args.images_per_prompt is None:
        args.images_per_prompt = 4
    if args.metadata:
        records = read_metadata_jsonl(args.metadata, world=True)
    else:
        records = generate_records(args.split, None, 0)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise UserError("no prompts to evaluate.")
    if args.per_tag is not None:
        if not all("tag" in r for r in records):
            raise UserError("--per-tag needs a 'tag' in every metadata record.")
        records, args.images_per_prompt = balance_tags(records, args.per_tag), 1
    sampling = sampling_from_args(args)
    checkpoint, checkpoint_step = scored_checkpoint(args.checkpoint)
    settings = {
        "model": args.model or "shipped tiny-world model",
        "checkpoint": checkpoint,
        "checkpoint_step": checkpoint_step,
        "source": args.metadata or f"split:{args.split}",
        "prompts": len(records),
        "images_per_prompt": args.images_per_prompt,
        "images_per_tag": args.per_tag,
        "seed": args.seed,
        "sampling": sampling.steps_and_guidance,
    }
    out = check_output(args.output, "folder", sources=read_sources(args.model, args.checkpoint), exists_ok=True)
    config = json.loads(json.dumps({"benchmark": "shapes", "sampling": settings, "scoring": {"reward": "shapeeval"}}))
    clear = es.check_suite_output(out, config, args.force, rescore=False)  # a rerun with other settings is refused
    pipe = load_pipeline(args.model, args.device, args.checkpoint)
    warn_unknown_words(pipe, [r["prompt"] for r in records], "eval")
    summary, images = evaluate_shapes(pipe, records, args.images_per_prompt, args.seed, sampling,
                                      args.batch_size, progress=True)
    if clear:
        empty_folder(out)
    write_text_atomic(out / es.CONFIG, json.dumps(config, indent=2) + "\n")
    write_text_atomic(out / "results.json", json.dumps({**settings, **summary}, indent=2) + "\n")
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
    o = summary["overall"]
    print(f"clean shapes   {o['clean_fraction']:.3f} +-{o['clean_ci95']:.3f} of the {o['blobs']} blobs drawn "
          "(the rest: fused, multi-coloured, ragged or implausible)")
    print(f"shapes drawn   {o['blobs_per_image']:.2f} +-{o['blobs_per_image_ci95']:.2f} per image for "
          f"{o['named_per_image']:.2f} named (GenEval's at-least rule accepts more than named)")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return 0


def scored_checkpoint(checkpoint: str | None) -> tuple[str | None, int | None]:
    """The checkpoint folder `--checkpoint` names, resolved as `load_pipeline` does (a run folder: its latest
    checkpoint; a bare transformer folder: itself), and the step its trainer_state.json records; (None, None)
    without --checkpoint."""
    if not checkpoint:
        return None, None
    from ..grpo.checkpoint import checkpoint_folder

    folder = checkpoint_folder(checkpoint)
    try:
        step = json.loads((folder / "trainer_state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    return str(folder), step if isinstance(step, int) and not isinstance(step, bool) else None


# ---- geneval, pickscore, ocr ---------------------------------------------------------------------------
SUITES = {  # name -> (help, description)
    "geneval": ("GenEval: GenEval-schema prompts, strict accuracy per tag (official layout and rule)",
                "Sample N images per prompt of a GenEval metadata file into GenEval's folder layout (OUT/<index>/"
                "metadata.jsonl, OUT/<index>/samples/<k>.png), score them with the GenEval reward (or --reward "
                "shapeeval for the tiny world) and write results.json (strict accuracy per tag with 95% intervals, "
                "overall = mean over tags) and grid.png. Resumable; under torchrun each process takes every "
                "WORLD_SIZE-th prompt."),
    "pickscore": ("PickScore: mean raw PickScore of a prompt file",
                  "Sample images for a prompt file (one prompt per line) in GenEval's folder layout, score them with "
                  "PickScore and write results.json (mean raw PickScore with its 95% interval), pickscore.json (the "
                  "reference's {\"pickscore\": [mean, [...]]} file) and grid.png. Resumable, like geneval."),
    "ocr": ("OCR: mean OCR reward and exact-match rate of quoted-text prompts",
            "Sample images for a prompt file whose prompts quote the text to render, score them with the OCR reward "
            "and write results.json (mean reward and exact-match rate with 95% intervals) and grid.png. "
            "Resumable, like geneval."),
}
DEFAULTS = {"geneval": (4, "geneval", "strict"), "pickscore": (1, "pickscore", "pickscore"), "ocr": (1, "ocr", "ocr")}


def suite_arguments(s: argparse.ArgumentParser, name: str) -> None:
    images, reward, _ = DEFAULTS[name]
    if name == "geneval":
        s.add_argument("--metadata", required=True, help="GenEval-schema JSONL file (e.g. GenEval's "
                       "evaluation_metadata.jsonl, 553 prompts)")
    else:
        s.add_argument("--prompts", required=True, help="prompt file: .txt (one prompt per line) or .jsonl")
    s.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N prompts")
    s.add_argument("-n", "--images-per-prompt", type=positive_int, default=images,
                   help=f"images per prompt (default {images})")
    s.add_argument("-o", "--output", default=f"eval-{name}", help=f"output folder (default eval-{name})")
    s.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per pipeline call (default: all images of one prompt; part of the settings)")
    s.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's native size)")
    s.add_argument("--width", type=positive_int, default=None, help="image width (default: the model's native size)")
    s.add_argument("--reward", default=reward, help=f"reward name (default {reward})")
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a reward keyword argument, e.g. -p detector=/path/to/mask2former; repeatable")
    s.add_argument("--rescore", action="store_true", help="score every image again (also after changing -p/--reward)")
    s.add_argument("--force", action="store_true", help="empty the output folder first")
    add_model_argument(s)
    for action in s._actions:  # several processes: one device each
        if action.dest == "device":
            action.default = "auto"
            action.help = "torch device; auto (default): cuda:LOCAL_RANK when CUDA is available, else cpu"
    sampling_arguments(s)
    s.set_defaults(steps=25)


def suite_records(args) -> list[dict]:
    """The prompt records of a suite command (checked, --limit applied)."""
    if args.benchmark == "geneval":
        from ..data.shapes import read_metadata_jsonl

        records = read_metadata_jsonl(args.metadata, world=args.reward == "shapeeval")
    else:
        from ..data.prompts import load_prompts

        records = load_prompts(args.prompts)
    if args.limit is not None:
        records = records[: args.limit]
    return records


def reward_params(name: str, params: dict, device: str) -> dict:
    """`params` with device = the sampling device when the reward takes one and -p does not set it."""
    from ..rewards import check_reward

    if "device" in params:
        return params
    try:
        check_reward(name, {**params, "device": device})
    except UserError:
        return params
    return {**params, "device": device}


def run_suite(args) -> int:
    import gc

    import torch

    from .. import eval_suites as es
    from ..images import save_png
    from ..rewards import build_reward, check_prompt_source, check_reward
    from ..tinyworld import SHIPPED_MODEL
    from .score import parse_params

    records = suite_records(args)
    source = args.metadata if args.benchmark == "geneval" else args.prompts
    params = parse_params(args.param)
    check_reward(args.reward, params)
    check_prompt_source(args.reward, records, source)
    sampling, n = sampling_from_args(args), args.images_per_prompt
    out = check_output(args.output, "folder", sources=[*read_sources(args.model, args.checkpoint), source],
                       exists_ok=True)
    procs = es.Processes.from_env()
    device = procs.device(args.device)
    pipe = load_pipeline(args.model, device, args.checkpoint)
    if procs.is_main:
        warn_unknown_words(pipe, [r["prompt"] for r in records], "eval")
    h, w = pipe.grid(args.height, args.width)
    stride = pipe.vae.spatial_stride
    suite = sampling.replace(height=h * stride, width=w * stride, batch_size=args.batch_size)
    checkpoint, checkpoint_step = scored_checkpoint(args.checkpoint)
    model = Path(args.model) if args.model else SHIPPED_MODEL
    config = json.loads(json.dumps({
        "benchmark": args.benchmark,
        "sampling": {"model": str(model.resolve()) if model.exists() else args.model, "checkpoint": checkpoint,
                     "prompts": len(records), "prompts_sha256": es.records_digest(records), "images_per_prompt": n,
                     "seed": args.seed, "batch_size": min(args.batch_size or n, n), **es.sampling_record(suite)},
        "scoring": {"reward": args.reward, "params": params},
    }, default=str))
    with es.prepare_output(out, config, args.force, args.rescore, procs):
        sampled = es.sample_to_folder(pipe, records, out, n, args.seed, suite, procs.rank, procs.world,
                                      progress=procs.is_main)
        del pipe  # the reward's models get the memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        run_params = reward_params(args.reward, params, device)
        scored = es.score_folder(lambda: build_reward(args.reward, run_params), records, out, n, config["scoring"],
                                 procs.rank, procs.world, args.rescore, progress=procs.is_main)
        procs.barrier()
        if not procs.is_main:
            return 0
        table, rows = es.summarise(records, out, n)
        result = {"benchmark": args.benchmark, "model": args.model or "shipped tiny-world model",
                  "checkpoint": checkpoint, "checkpoint_step": checkpoint_step, "source": source,
                  "prompts": len(records), "images_per_prompt": n, "seed": args.seed,
                  "sampling": es.sampling_record(suite),
                  "reward": args.reward, "reward_params": params, "intervals": es.INTERVALS, **table}
        write_text_atomic(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
        written = [out / "results.json"]
        names = list(rows[0]["values"]) if rows else []
        if "pickscore" in names:
            write_text_atomic(out / "pickscore.json", json.dumps(es.pickscore_reference(rows, out)) + "\n")
            written.append(out / "pickscore.json")
        headline = DEFAULTS[args.benchmark][2]
        grid = es.grid_image(records, out, n, rows, headline if headline in names else (names or [None])[0])
        written.append(save_png(grid, out / "grid.png"))
        mine = len(range(procs.rank, len(records), procs.world))
        print(f"{len(records)} prompts x {n} images; this process sampled {sampled} and scored {scored} of its "
              f"{mine} prompts (the others were complete)")
        print("\n".join(es.table_lines(table)))
        print(f"wrote {', '.join(map(str, written))}")
        return 0
