"""The policy's phases at the URSA-1.7B shape on fake tensors (no memory, no GPU): FLOPs and the peak of live
bytes by MemTracker category per phase, for one process computing with float32 masters under autocast, without the
engine's sharding (`udm_grpo.grpo.simulate.simulate_phases`; `udm-grpo train --check --simulate` adds the engine's
stored bytes for a run config and process count).

    python benchmarks/simulate_shape.py [--micro-batch 4] [--rollout-batch 8] [--codebook 131072] [--fp32]
"""

import argparse
import json
import time
from pathlib import Path

from gpu_check import URSA_1_7B

from udm_grpo.grpo.simulate import simulate_phases
from udm_grpo.models.transformer import URSAConfig

GIB = 2**30
SHAPE = Path(__file__).resolve().parents[1] / "udm_grpo" / "configs" / "shapes" / "ursa-1.7b-ibq512"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rollout-batch", type=int, default=8)
    ap.add_argument("--codebook", type=int, default=URSA_1_7B["lm_head_size"], help="K (not confirmed: 131,072)")
    ap.add_argument("--checkpointing", type=int, default=1, help="gradient checkpointing level 0-3")
    ap.add_argument("--fp32", action="store_true", help="float32 compute instead of bf16 autocast")
    args = ap.parse_args()
    k = args.codebook
    config = URSAConfig.from_dict({**URSA_1_7B, "lm_head_size": k, "vocab_size": URSA_1_7B["lm_vocab_size"] + k})
    start = time.perf_counter()
    vae = json.loads((SHAPE / "vae" / "config.json").read_text())
    phases = simulate_phases(config, args.micro_batch, args.rollout_batch, 320, (32, 32), bf16=not args.fp32,
                             gradient_checkpointing=args.checkpointing, reference=True,
                             vae={**vae, "num_vq_embeddings": k})
    print(f"URSA-1.7B shape, K = {k:,}, 320 text + 1,024 image tokens, micro-batch {args.micro_batch}, rollout "
          f"batch {args.rollout_batch}, {'fp32' if args.fp32 else 'bf16 autocast'}, checkpointing level "
          f"{args.checkpointing}: simulated in {time.perf_counter() - start:.1f} s")
    for name, fig in phases.items():
        parts = ", ".join(f"{cat} {b / GIB:.2f}" for cat, b in fig.peak_bytes.items() if cat != "total")
        print(f"  {name:18s} {fig.flops / 1e12:8.2f} TFLOP  peak {fig.peak_bytes['total'] / GIB:7.2f} GiB ({parts})")


if __name__ == "__main__":
    main()
