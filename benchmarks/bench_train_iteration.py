"""One UDM-GRPO training iteration split into phases, against pure model forward/backward time.

Runs the default `udm-grpo train` config (tiny world, shipped model) for a few iterations, reads the
per-phase times the trainer records (rollout, reward, states, update), then times the same transformer work
alone: the rollout's no-grad forwards, and the training micro-batches' forward + backward plus the
reference forwards, on random tokens of the same shapes. Overhead = (iteration - pure) / pure.

    python benchmarks/bench_train_iteration.py [--iters 3] [KEY=VALUE overrides]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def pure_model_time(trainer, cfg) -> float:
    """Seconds of transformer compute alone for one iteration of `cfg`."""
    model = trainer.acc.unwrap_model(trainer.policy).model
    pipe, plan = trainer.pipe, trainer.plan
    grid = pipe.grid(cfg.sampling.rollout.height, cfg.sampling.rollout.width)
    n_tok, k = grid[0] * grid[1], pipe.scheduler.num_embeddings
    per = plan.images_per_process
    rb = cfg.sampling.rollout.batch_size or per
    text = pipe.encode_prompt(["a photo of a red circle"] * per)
    ids = torch.randint(0, k, (per, n_tok))
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(cfg.sampling.rollout.num_inference_steps):
            for i in range(0, per, rb):
                model.image_logits(text[i:i + rb], ids[i:i + rb], grid)
    mb = plan.micro_batch_size
    for _ in range(cfg.sampling.train_steps):
        for i in range(0, per, mb):
            if trainer.reference is not None:
                with torch.no_grad():
                    trainer.reference.image_logits(text[i:i + mb], ids[i:i + mb], grid)
            logits = model.image_logits(text[i:i + mb], ids[i:i + mb], grid)
            logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    from udm_grpo import UDMGRPOTrainer, run_config

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(overrides=[*args.overrides, f"experiment.output_dir={out}"])
        trainer = UDMGRPOTrainer(cfg, progress=False)
        trainer.train_step()  # warm-up
        phases = {"rollout": [], "reward": [], "states": [], "update": []}
        totals, pures = [], []
        for _ in range(args.iters):  # each iteration next to its own pure-model timing: the machine drifts
            start = time.perf_counter()
            m = trainer.train_step()
            totals.append(time.perf_counter() - start)
            pures.append(pure_model_time(trainer, cfg))
            for p in phases:
                phases[p].append(m[f"time/{p}"])
    total, pure = statistics.median(totals), statistics.median(pures)
    ratios = sorted((t - q) / q for t, q in zip(totals, pures, strict=True))
    print(f"UDM-GRPO iteration, tiny world defaults ({trainer.plan.describe()})")
    for p, v in phases.items():
        print(f"  {p:8s} {statistics.median(v):7.3f} s")
    print(f"  total    {total:7.3f} s   (prompt sampling, advantages, states and logging included)")
    print(f"  pure transformer forward/backward {pure:.3f} s")
    print(f"  overhead (sampler + reward + bookkeeping) = {statistics.median(ratios):.1%} of pure model time "
          f"(median of {len(ratios)} paired iterations, range {ratios[0]:.1%} to {ratios[-1]:.1%}; issue 11's "
          "target <= 10%)")


if __name__ == "__main__":
    main()
