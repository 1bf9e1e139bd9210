"""UDM-GRPO on the tiny world through the Python API alone: a run config, the trainer, held-out strict accuracy
before and after.

    python examples/python_api.py [--steps 10] [-o runs/python-api]
"""

import argparse

from udm_grpo import UDMGRPOTrainer, run_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=10, help="optimiser steps (the main job runs 100)")
parser.add_argument("-o", "--output", default="runs/python-api", help="run folder (replaced if it exists)")
args = parser.parse_args()

# The tiny-world defaults (the shipped model, ShapeEval) with a few keys changed, as `udm-grpo train` would.
config = run_config(overrides=[f"training.max_steps={args.steps}", f"experiment.output_dir={args.output}",
                               f"experiment.eval_every={args.steps}"])
trainer = UDMGRPOTrainer(config)
result = trainer.train(force=True)  # evaluates the held-out prompts before the first step and after the last
before, after = result["first_eval"], result["eval"]
print(f"held-out strict accuracy: {before['eval/strict']:.3f} -> {after['eval/strict']:.3f} "
      f"(+-{after['eval/ci95/strict']:.3f}, {after['eval/images']} images) after {result['step']} steps; "
      f"run folder {args.output}")
