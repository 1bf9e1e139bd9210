"""The fit table of docs/multinode.md: each paper recipe (GenEval, PickScore, OCR) x (full fine-tune, LoRA) x
(1 x 24 GiB, 1 x 48 GiB, 1 x 80 GiB, 8 x 80 GiB) at the URSA-1.7B shape, searched as `udm-grpo train --check
--simulate --fit` searches (`udm_grpo.grpo.fit`; 10% of each GPU kept free, its default --headroom): fits or not,
the overrides, the peak per GPU and the predicted seconds per iteration at 989 TFLOP/s x 40% MFU (H100 bf16).
One GPU starts from DDP, 8 GPUs from the paper's DeepSpeed ZeRO-2; the offloading engines are searched beside
them. LoRA is peft's r 16 on q, k, v, o.

    python benchmarks/fit_table.py [--codebook 131072] [--markdown]

The three recipes differ only in their batch (16 x 8 images for GenEval, 16 x 16 for PickScore and OCR), so one
set of simulations serves all cells (about 40 at the full shape: ~15 minutes on a 2-core CPU). The figures are the
search's batch-extrapolated predictions; `--simulate --fit` on a chosen cell also simulates the winner whole.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from udm_grpo.grpo.fit import DEFAULT_LORA, Scaling, candidates
from udm_grpo.grpo.preflight import check_start
from udm_grpo.grpo.simulate import Iteration
from udm_grpo.recipes import run_config

SHAPE = Path(__file__).resolve().parents[1] / "udm_grpo" / "configs" / "shapes" / "ursa-1.7b-ibq512"
RECIPES = ("geneval", "pickscore", "ocr")
SETUPS = ((1, 24), (1, 48), (1, 80), (8, 80))
PEAK_FLOPS = 989e12 * 0.4
HEADROOM = 0.1  # as --fit's default: kept free for reward models, fragmentation, workspaces


def prompt_files(folder: Path) -> dict[str, list[str]]:
    """data.train / data.test overrides per recipe, written into `folder`."""
    import json

    geneval = folder / "geneval.jsonl"
    geneval.write_text("".join(json.dumps({"prompt": "a photo of a cat", "tag": "single_object", "include":
                                           [{"class": "cat", "count": 1}]}) + "\n" for _ in range(64)))
    plain = folder / "prompts.txt"
    plain.write_text("a photo of a cat on a sofa\n" * 64)
    quoted = folder / "ocr.txt"
    quoted.write_text('a shop sign that says "open late"\n' * 64)
    return {name: [f"data.train={path}", f"data.test={path}"]
            for name, path in (("geneval", geneval), ("pickscore", plain), ("ocr", quoted))}


def iteration(recipe: str, data: list[str], processes: int, codebook: int | None) -> Iteration:
    engine = ["training.engine=deepspeed", "training.zero_stage=2"] if processes > 1 else ["training.engine=ddp"]
    cfg = run_config(f"{recipe}_ursa_1.7b", [f"model.path={SHAPE}", *data, *engine])
    start = check_start(cfg, processes)
    return Iteration.from_run(cfg, start.folder, start.index, start.plan, start.spec, codebook)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codebook", type=int, default=None, help="K (default the shape folder's, 131,072)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    scaling, rows, began = Scaling(), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = prompt_files(Path(tmp))
        for recipe in RECIPES:
            for lora in (None, DEFAULT_LORA):
                for processes, gib in SETUPS:
                    base = replace(iteration(recipe, data[recipe], processes, args.codebook), lora=lora)
                    ranked = candidates(base, PEAK_FLOPS, scaling)
                    fitting = [c for c in ranked if c.peak_bytes <= gib * 2**30 * (1 - HEADROOM)]
                    best = fitting[0] if fitting else min(ranked, key=lambda c: c.peak_bytes)
                    rows.append((recipe, "LoRA" if lora else "full", f"{processes} x {gib} GiB", bool(fitting),
                                 " ".join(best.overrides(base)) or "(as configured)", best.peak_bytes / 2**30,
                                 best.seconds))
                    print(f"{rows[-1][0]:9s} {rows[-1][1]:4s} {rows[-1][2]:11s} {'fits' if fitting else 'NO':4s} "
                          f"{best.peak_bytes / 2**30:6.1f} GiB {best.seconds:6.2f} s  {rows[-1][4]}", flush=True)
    print(f"({time.perf_counter() - began:.0f} s; the overrides of a row that does not fit are its smallest plan)")
    if args.markdown:
        print("\n| recipe | weights | GPUs | fits | peak per GPU | s / iteration | overrides |")
        print("|---|---|---|---|---|---|---|")
        for recipe, kind, setup, fits, overrides, peak, seconds in rows:
            print(f"| {recipe} | {kind} | {setup} | {'yes' if fits else 'no'} | {peak:.1f} GiB | "
                  f"{seconds:.2f} | `{overrides}` |")


if __name__ == "__main__":
    main()
