"""Memory per GPU of the paper's recipes at the URSA-1.7B shape: `memory.estimate` (formulas, what `train --check`
prints) beside `simulate.simulate_iteration` (fake tensors at the real shape, what `train --check --simulate`
prints) for DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 on N processes, with the ratio estimate / simulation.

The second table splits the transient memory: the estimate's training items (activations, logits and
temporaries) beside the simulation's activations + temporaries + buffers in the training step, its rollout item
beside the rollout step's, and its path tables beside the simulation's tokenizer weights and path tables. Both
sides share the engine's stored bytes (`memory.engine_state`); what the simulation leaves out (reward models,
communication buffers beyond the engines' buckets, allocator fragmentation, CUDA workspaces) neither counts.
The transient measurement depends only on `simulate_phases`' arguments (the engines differ only in the dtype
of the module the forwards read), so its results are cached by argument within the run.

    python benchmarks/compare_memory.py [--codebook 131072] [--processes 8] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ROOT / "udm_grpo" / "configs" / "shapes" / "ursa-1.7b-ibq512"
RECIPES = ("geneval_ursa_1.7b", "pickscore_ursa_1.7b", "ocr_ursa_1.7b")
ENGINES = {"DDP": ("ddp", None), "ZeRO-1": ("deepspeed", 1), "ZeRO-2": ("deepspeed", 2),
           "ZeRO-3": ("deepspeed", 3), "FSDP2": ("fsdp", None)}
GIB = 2**30


def prompt_files(folder: Path) -> dict[str, Path]:
    """Reward name -> a prompt file it can score: GenEval records from `udm-grpo data geneval`, plain prompts for
    PickScore and prompts quoting a text for OCR."""
    from udm_grpo.cli import main

    files = {"geneval": folder / "geneval.jsonl", "pickscore": folder / "pickscore.txt", "ocr": folder / "ocr.txt"}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        if main(["data", "geneval", "-o", str(files["geneval"]), "-n", "2000"]) != 0:
            raise SystemExit(f"udm-grpo data geneval failed: {err.getvalue()}")
    files["pickscore"].write_text("".join(f"a photo of a red fox number {i} in the snow\n" for i in range(2000)))
    files["ocr"].write_text("".join(f'a shop sign that says "open {i}"\n' for i in range(2000)))
    return files


def cached_simulation():
    """Replace `simulate.simulate_phases` with a version cached on the repr of its arguments; returns the cache's
    statistics (calls, simulations, seconds)."""
    from udm_grpo.grpo import simulate

    original, cache, stats = simulate.simulate_phases, {}, {"calls": 0, "simulations": 0, "seconds": 0.0}

    def cached(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        stats["calls"] += 1
        if key not in cache:
            start = time.perf_counter()
            cache[key] = original(*args, **kwargs)
            stats["simulations"] += 1
            stats["seconds"] += time.perf_counter() - start
        return cache[key]

    simulate.simulate_phases = cached
    return stats


def model_sizes(cfg, folder: Path, index: dict, codebook: int | None):
    """(URSAConfig with `codebook` as K, text tokens, token grid) of the model folder, as the simulation reads
    them."""
    from udm_grpo.models.io import read_config
    from udm_grpo.models.pipeline import DEFAULT_PROMPT_LENGTH, token_grid
    from udm_grpo.models.transformer import URSAConfig
    from udm_grpo.models.vae import vae_geometry

    data, path = read_config(folder / "transformer", "transformer/")
    if codebook:
        data = {**data, "lm_head_size": codebook, "vocab_size": data["lm_vocab_size"] + codebook}
    r = cfg.sampling.rollout
    return (URSAConfig.from_dict(data, str(path)), int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH)),
            token_grid(r.height, r.width, *vae_geometry(folder / "vae")))


def compare(recipe: str, engine: str, stage: int | None, files: dict[str, Path], processes: int,
            codebook: int | None) -> dict:
    """One row: the estimate's items and total, the simulation's peak, peak phase and transient bytes (GiB)."""
    from udm_grpo.grpo.memory import Shape, estimate
    from udm_grpo.grpo.preflight import check_start
    from udm_grpo.grpo.simulate import simulate_iteration
    from udm_grpo.recipes import run_config

    task = recipe.split("_")[0]
    overrides = [f"model.path={SHAPE}", f"data.train={files[task]}", f"data.test={files[task]}",
                 f"training.engine={engine}"] + ([f"training.zero_stage={stage}"] if stage else [])
    cfg = run_config(recipe, overrides)
    start = check_start(cfg, processes)
    plan, spec = start.plan, start.spec
    config, text, grid = model_sizes(cfg, start.folder, start.index, codebook)
    r = cfg.sampling.rollout
    est = estimate(Shape.from_config(config), spec.kind, spec.zero_stage, plan.num_processes, cfg.bf16,
                   cfg.reward.kl_beta > 0, cfg.model.gradient_checkpointing, plan.micro_batch_size,
                   r.batch_size or plan.images_per_process, text, grid[0] * grid[1], r.guidance_scale != 1.0,
                   cfg.model.lora is not None)
    sim = simulate_iteration(cfg, start.folder, start.index, plan, spec, codebook)

    def transient(phase):
        peak = sim["phases"][phase]["peak_bytes"]
        return sum(peak.get(k, 0) for k in ("activations", "temporaries", "buffers")) / GIB

    def items(prefix):  # the estimate's items by their leading word, so that renamed items still add up
        return sum(v for k, v in est.items() if k.startswith(prefix))

    return {"micro": plan.micro_batch_size, "rollout batch": r.batch_size or plan.images_per_process,
            "estimate": est["total"], "simulated": sim["peak_bytes"]["total"] / GIB, "phase": sim["peak_phase"],
            "est train": items("training"), "sim train": transient("training step"), "est rollout": items("rollout"),
            "sim rollout": transient("rollout step"), "est path": items("path"),
            "sim path": sim["phases"]["training step"]["peak_bytes"].get("tokenizer and path", 0) / GIB,
            "codebook": config.lm_head_size}


def tables(rows: dict, markdown: bool) -> str:
    head1 = ["recipe", "engine", "micro-batch", "simulated peak GiB", "peak phase", "estimate GiB", "estimate / sim"]
    body1 = [[recipe.removesuffix("_ursa_1.7b"), engine, str(r["micro"]), f"{r['simulated']:.2f}", r["phase"],
              f"{r['estimate']:.2f}", f"{r['estimate'] / r['simulated']:.2f}"] for (recipe, engine), r in rows.items()]
    head2 = ["recipe", "engine", "est. training step", "sim. training step", "ratio", "est. rollout step",
             "sim. rollout step", "ratio", "est. path tables", "sim. tokenizer and path"]
    body2 = [[recipe.removesuffix("_ursa_1.7b"), engine, f"{r['est train']:.2f}", f"{r['sim train']:.2f}",
              f"{r['est train'] / r['sim train']:.2f}", f"{r['est rollout']:.2f}", f"{r['sim rollout']:.2f}",
              f"{r['est rollout'] / r['sim rollout']:.2f}", f"{r['est path']:.2f}", f"{r['sim path']:.2f}"]
             for (recipe, engine), r in rows.items()]
    return render(head1, body1, markdown) + "\n\nTransient memory by phase, GiB: the estimate's training items " \
        "(activations, logits and temporaries) and rollout item beside the simulation's activations + temporaries " \
        "+ buffers of the phase; the path tables (and the simulation's tokenizer weights) apart:\n\n" \
        + render(head2, body2, markdown)


def render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codebook", type=int, default=None, help="K instead of the shape folder's (131,072)")
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--markdown", action="store_true", help="markdown tables")
    args = ap.parse_args()
    stats = cached_simulation()
    began = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        files = prompt_files(Path(folder))
        for recipe in RECIPES:
            for name, (engine, stage) in ENGINES.items():
                rows[recipe, name] = compare(recipe, engine, stage, files, args.processes, args.codebook)
    k = next(iter(rows.values()))["codebook"]
    command = shlex.join(["python", "benchmarks/compare_memory.py", *sys.argv[1:]])
    print(f"Command: `{command}` ({time.perf_counter() - began:.0f} s; {stats['simulations']} simulations for "
          f"{stats['calls']} rows, {stats['seconds']:.0f} s)\n")
    print(f"URSA-1.7B shape (K = {k:,}), {args.processes} processes, bf16, checkpointing level 1, per GPU:\n")
    print(tables(rows, args.markdown))


if __name__ == "__main__":
    main()
