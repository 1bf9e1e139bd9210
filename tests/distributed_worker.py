"""Run by tests/test_distributed.py under torchrun: a few UDM-GRPO steps on the tiny random pipeline.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.distributed_worker OUT

Rollouts are made independent of the process layout (each image drawn with its own generator seeded
by its global index and the step), so that a run on N processes must reproduce the single-process
update: the same images, the same group advantages (gathered over processes), the same averaged
gradient.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from udm_grpo.grpo import trainer as trainer_mod
from udm_grpo.grpo.rollout import Rollout, rollout

from .test_trainer import Brightness, make_config, trainer


def layout_free_rollout():
    calls = {"n": 0}

    def run(pipe, model, prompts, metadata, steps, scale, trunc, height, width, generator, batch_size=None):
        rank, per = int(os.environ.get("RANK", 0)), len(prompts)
        parts = []
        for i in range(per):
            gen = torch.Generator().manual_seed(10_000 * calls["n"] + rank * per + i)
            parts.append(rollout(pipe, model, prompts[i:i + 1], metadata[i:i + 1], steps, scale, trunc, height,
                                 width, gen))
        calls["n"] += 1
        first = parts[0]
        return Rollout(prompts, metadata, torch.cat([p.text_ids for p in parts]), None, first.grid,
                       torch.cat([p.final for p in parts]), torch.cat([p.states for p in parts], 1),
                       torch.cat([p.predictions for p in parts], 1), first.t, np.concatenate([p.images for p in parts]))

    return run


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer_mod.rollout = layout_free_rollout()
    # train_start [0, 1] and the rollout's own states: no per-process randomness in the update.
    cfg = make_config(out, **{"sampling.train_start": [0, 1], "sampling.forward_process": False,
                              "training.max_steps": 2, "experiment.save_every": 0, "training.lr": 1e-3})
    tr = trainer(cfg, Brightness())
    tr.train()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
