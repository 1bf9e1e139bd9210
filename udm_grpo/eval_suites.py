"""Benchmark evaluations (GenEval, PickScore, OCR) in the official GenEval folder layout.

    OUT/eval_config.json                 the settings; a rerun with other settings is refused
    OUT/<index:05d>/metadata.jsonl       the prompt's record, one JSON line (GenEval's evaluator json.loads it)
    OUT/<index:05d>/samples/<k:05d>.png  its images
    OUT/<index:05d>/done.json            written after the last image: the prompt is complete
    OUT/<index:05d>/scores.json          per-image reward score and values, with the scoring settings
    OUT/results.json, OUT/grid.png       the summary (main process)

Image names have five digits, as GenEval's own `generation/diffusers_generate.py` writes them
(`f"{sample_count:05}.png"`) and as the UDM-GRPO reference does; GenEval's `evaluate_images.py` reads every
`samples/<digits>.png` of every all-digit folder, so the folder can be scored by the official evaluator as
is. Temporary files are written beside `samples/` (never inside it) and renamed into place.

Prompt `index` is sampled with its own generator seeded `seed + index`, all its images in calls of at most
`batch_size`, so the images depend neither on the number of processes nor on what was sampled before:
resuming redoes exactly the prompts without a completion marker or with a missing image, and gives the
same bytes. Process `rank` of `world` takes prompts `rank::world`, and scores them (one reward call per
prompt); the main process summarises from the per-prompt files, so no tensors are gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .diffusion.sampler import SamplingOptions
from .errors import UserError
from .outputs import FolderLock, check_output, empty_folder, holds_files, write_text_atomic
from .stats import half_width, mean_of_groups_half_width

CONFIG, DONE, SCORES, META = "eval_config.json", "done.json", "scores.json", "metadata.jsonl"
INTERVALS = ("95% intervals: Agresti-Coull for 0/1 values, normal otherwise; with tags, overall = mean over "
             "tags (half-width sqrt(sum h_t^2) / T), *_images = mean over images")


def sampling_record(options: SamplingOptions) -> dict:
    """What eval_config.json and results.json record of the sampling: steps, guidance, truncation, size."""
    return {**options.steps_and_guidance, "height": options.height, "width": options.width}


@dataclass
class Processes:
    """This process's place among the launched ones (torchrun / accelerate launch set WORLD_SIZE, RANK,
    LOCAL_RANK); the process group is started only when there are several."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    state: object | None = None

    @classmethod
    def from_env(cls) -> Processes:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            return cls()
        from accelerate import PartialState

        s = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, nccl on CUDA
        return cls(s.process_index, s.num_processes, s.local_process_index, s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def device(self, requested: str | None) -> str:
        """'auto' (or None): cuda:LOCAL_RANK when CUDA is available, else cpu; with several processes a bare
        'cuda' also means cuda:LOCAL_RANK."""
        if requested in (None, "auto"):
            return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        return f"cuda:{self.local_rank}" if requested == "cuda" and self.world > 1 else requested


# ---- paths ----------------------------------------------------------------------------------------
def prompt_dir(out: Path, index: int) -> Path:
    return out / f"{index:05d}"


def image_name(k: int) -> str:
    return f"{k:05d}.png"


def records_digest(records: list[dict]) -> str:
    """sha256 of the records as canonical JSON (which prompts, in which order)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- the output folder ------------------------------------------------------------------------------
def check_suite_output(out: Path, config: dict, force: bool, rescore: bool) -> bool:
    """Whether `out` must be emptied first (it holds files and `force` is given). UserError (one sentence)
    when it holds files that are not an evaluation with the same sampling settings, or that were scored
    with other settings and `rescore` is not given. Read-only, so every process can run it."""
    check_output(out, "folder", exists_ok=True)
    if not holds_files(out):
        return False
    if force:
        return True
    old = _read_json(out / CONFIG)
    if not isinstance(old, dict):
        raise UserError(f"output folder {out} already holds files but no readable {CONFIG}; choose another "
                        "folder with -o or add --force to empty it.")
    new_s, old_s = config["sampling"], old.get("sampling") or {}
    if old.get("benchmark") != config["benchmark"] or old_s != new_s:
        key = next((k for k in new_s if old_s.get(k) != new_s[k]), "benchmark")
        was, now = (old.get(key), config.get(key)) if key == "benchmark" else (old_s.get(key), new_s[key])
        what = "other prompts" if key.startswith("prompts") else f"{key} {was!r}, now {now!r}"
        raise UserError(f"{out / CONFIG} records another evaluation ({what}); rerun with the same settings to "
                        "resume or repeat it, choose another folder with -o, or add --force to empty it.")
    if old.get("scoring") != config["scoring"] and not rescore:
        raise UserError(f"{out / CONFIG} records other reward settings ({old.get('scoring')}, now "
                        f"{config['scoring']}); add --rescore to score its images again, or --force to start over.")
    return False


@contextlib.contextmanager
def prepare_output(out: Path, config: dict, force: bool, rescore: bool, procs: Processes):
    """Context manager: `check_suite_output` on every process, then the main process locks the folder
    (`FolderLock`, held until the block ends), empties it when needed (keeping the lock) and records `config`;
    the others wait for it."""
    clear = check_suite_output(out, config, force, rescore)
    procs.barrier()
    with FolderLock(out) if procs.is_main else contextlib.nullcontext():
        if procs.is_main:
            if clear:
                empty_folder(out)
            write_text_atomic(out / CONFIG, json.dumps(config, indent=2) + "\n")
        procs.barrier()
        yield


# ---- sampling ---------------------------------------------------------------------------------------
def prompt_complete(folder: Path, record: dict, images_per_prompt: int) -> bool:
    """The prompt's metadata line is `record`, its completion marker is there and so is every image."""
    done = _read_json(folder / DONE)
    return (isinstance(done, dict) and done.get("images") == images_per_prompt
            and _read_json(folder / META) == record
            and all((folder / "samples" / image_name(k)).is_file() for k in range(images_per_prompt)))


def _reset_prompt(folder: Path) -> None:
    """Remove what a previous, unfinished attempt at this prompt left (marker first, then scores, images)."""
    for name in (DONE, SCORES):
        (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink()
    if (folder / "samples").is_dir():
        shutil.rmtree(folder / "samples")


def sample_to_folder(pipe, records: list[dict], out: Path, images_per_prompt: int, seed: int,
                     sampling: SamplingOptions, rank: int = 0, world: int = 1, progress: bool = False) -> int:
    """Sample this process's prompts (`rank::world`) that are not complete, `sampling.batch_size` images per
    pipeline call (default: all of a prompt's), each call's images saved before the next; returns how many
    prompts were sampled."""
    from PIL import Image
    from tqdm.auto import tqdm

    batch = min(sampling.batch_size or images_per_prompt, images_per_prompt)
    todo = [i for i in range(rank, len(records), world)
            if not prompt_complete(prompt_dir(out, i), records[i], images_per_prompt)]
    for i in tqdm(todo, desc="sample", disable=not progress, leave=False):
        folder = prompt_dir(out, i)
        folder.mkdir(parents=True, exist_ok=True)
        _reset_prompt(folder)
        write_text_atomic(folder / META, json.dumps(records[i]) + "\n")
        (folder / "samples").mkdir()
        gen = torch.Generator(device=pipe.device).manual_seed(seed + i)
        k = 0
        while k < images_per_prompt:
            n = min(batch, images_per_prompt - k)
            images = pipe.generate([records[i]["prompt"]] * n, sampling, gen).images
            for im in images:
                tmp = folder / f".{image_name(k)}.tmp"
                Image.fromarray(im).save(tmp, format="PNG")
                tmp.replace(folder / "samples" / image_name(k))
                k += 1
        write_text_atomic(folder / DONE, json.dumps({"images": images_per_prompt, "seed": seed + i}) + "\n")
    return len(todo)


def read_images(folder: Path, images_per_prompt: int) -> np.ndarray:
    """uint8 [n, H, W, 3] of one prompt folder (through `images.decode_image`, like every image read)."""
    from .images import decode_image

    return np.stack([decode_image(path, what=str(path)) for path in
                     (folder / "samples" / image_name(k) for k in range(images_per_prompt))])


# ---- scoring ----------------------------------------------------------------------------------------
def scores_cached(folder: Path, scoring: dict, images_per_prompt: int) -> bool:
    s = _read_json(folder / SCORES)
    return isinstance(s, dict) and s.get("scoring") == scoring and len(s.get("images", [])) == images_per_prompt


def score_folder(make_reward, records: list[dict], out: Path, images_per_prompt: int, scoring: dict,
                 rank: int = 0, world: int = 1, rescore: bool = False, progress: bool = False) -> int:
    """Score this process's prompts (one reward call per prompt) into OUT/<index>/scores.json, skipping those
    already scored with `scoring` unless `rescore`. `make_reward()` builds the reward, only when needed.
    Returns how many prompts were scored."""
    from tqdm.auto import tqdm

    todo = [i for i in range(rank, len(records), world)
            if rescore or not scores_cached(prompt_dir(out, i), scoring, images_per_prompt)]
    reward = make_reward() if todo else None
    for i in tqdm(todo, desc="score", disable=not progress, leave=False):
        folder = prompt_dir(out, i)
        result = reward(read_images(folder, images_per_prompt), [records[i]["prompt"]] * images_per_prompt,
                        [records[i]] * images_per_prompt)
        values = result.values or {"score": result.scores}
        rows = [{"file": f"samples/{image_name(k)}", "score": result.scores[k].item(),
                 "values": {name: v[k].item() for name, v in values.items()}} for k in range(images_per_prompt)]
        write_text_atomic(folder / SCORES, json.dumps({"scoring": scoring, "images": rows}, indent=1) + "\n")
    return len(todo)


# ---- summary ----------------------------------------------------------------------------------------
def _row(values: dict[str, np.ndarray]) -> dict:
    row: dict = {}
    for name, v in values.items():
        row[name], row[f"{name}_ci95"] = float(v.mean()), half_width(v)
    row["n"] = len(next(iter(values.values())))
    return row


def summarise(records: list[dict], out: Path, images_per_prompt: int) -> tuple[dict, list[dict]]:
    """(table, per-image rows) from the score files of all prompts. Table: "overall" {NAME, NAME_ci95, n} per
    reward value; with a tag on every record also "per_tag" {tag: the same} and overall = the mean over tags
    (GenEval's overall) plus NAME_images = the mean over images. Rows: index, file, prompt, score, values."""
    rows = []
    for i, record in enumerate(records):
        data = _read_json(prompt_dir(out, i) / SCORES)
        if not isinstance(data, dict):
            raise UserError(f"{prompt_dir(out, i) / SCORES} is missing or unreadable; rerun the command to score it.")
        rows += [{"index": i, "prompt": record["prompt"], "tag": record.get("tag"), **r} for r in data["images"]]
    names = list(rows[0]["values"]) if rows else []
    values = {n: np.array([r["values"][n] for r in rows], dtype=np.float64) for n in names}
    tags = [r["tag"] for r in rows]
    if not (rows and all(tags)):
        return {"overall": _row(values)}, rows
    per_tag = {}
    for tag in dict.fromkeys(tags):
        idx = [j for j, t in enumerate(tags) if t == tag]
        per_tag[tag] = _row({n: v[idx] for n, v in values.items()})
    overall: dict = {}
    for n, v in values.items():
        overall[n] = sum(row[n] for row in per_tag.values()) / len(per_tag)
        overall[f"{n}_ci95"] = mean_of_groups_half_width([row[f"{n}_ci95"] for row in per_tag.values()])
        overall[f"{n}_images"] = float(v.mean())
    overall["n"] = len(rows)
    return {"per_tag": per_tag, "overall": overall}, rows


def table_lines(table: dict) -> list[str]:
    """The summary table as printable lines (one per tag, then overall)."""
    lines = [INTERVALS]
    for tag, row in [*table.get("per_tag", {}).items(), ("overall", table["overall"])]:
        cells = [f"{k} {row[k]:.3f} +-{row[f'{k}_ci95']:.3f}" for k in row
                 if f"{k}_ci95" in row and not math.isnan(row[k])]
        lines.append(f"{tag:14s} " + "  ".join(cells) + f"  (n={row['n']})")
    return lines


def grid_image(records: list[dict], out: Path, images_per_prompt: int, rows: list[dict], value: str | None,
               max_prompts: int = 16, max_images: int = 8, tile: int = 256):
    """A PIL grid: one row per prompt (the first `max_prompts`), up to `max_images` of its images, each
    captioned with its `value`; tiles larger than `tile` px are shrunk, small ones doubled."""
    from PIL import Image

    from .images import grouped_grid

    shown = min(images_per_prompt, max_images)
    images, captions, groups = [], [], []
    lookup = {(r["index"], r["file"]): r for r in rows}
    for i, record in enumerate(records[:max_prompts]):
        start = len(images)
        for k, im in enumerate(read_images(prompt_dir(out, i), shown)):
            if max(im.shape[:2]) > tile:
                pil = Image.fromarray(im)
                pil.thumbnail((tile, tile), Image.LANCZOS)
                im = np.asarray(pil)
            images.append(im)
            r = lookup.get((i, f"samples/{image_name(k)}"))
            captions.append(f"{value} {r['values'][value]:.2f}" if r and value in r["values"] else "")
        label = f"{record['tag']}: {record['prompt']}" if record.get("tag") else record["prompt"]
        groups.append((label, range(start, len(images))))
    scale = 2 if max(images[0].shape[:2]) <= tile // 2 else 1
    return grouped_grid(images, groups, captions=captions, ncol=shown, scale=scale)


def pickscore_reference(rows: list[dict], out: Path, value: str = "pickscore") -> dict:
    """The reference's `pickscore/evaluate.py` output: {"pickscore": [mean, [{image_path, prompt, score}]]}."""
    items = [{"image_path": str(prompt_dir(out, r["index"]) / r["file"]), "prompt": r["prompt"],
              "score": r["values"][value]} for r in rows]
    mean = sum(x["score"] for x in items) / len(items) if items else math.nan
    return {"pickscore": [mean, items]}
