"""Rollout: G images per prompt from the current policy, with the trajectory kept for training.

Layout is prompt-major: sample i = j * G + g is image g of prompt j (see `advantages.expand_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion.sampler import LogitsFn, SamplingOptions
from ..models.pipeline import URSAPipeline


@dataclass
class Rollout:
    """One process's rollouts.

    text_ids: Long[B, L]; final: Long[B, N] (the clean sample x1_hat, the UDM-GRPO action);
    states / predictions: Long[S, B, N] per sampling step (x_{t_k} fed to the model, and x1_hat^{(k)});
    t: Float64[S] the step times; images: uint8 [B, H, W, 3] for the reward.
    """

    prompts: list[str]
    metadata: list
    text_ids: torch.Tensor
    uncond_ids: torch.Tensor | None
    grid: tuple[int, int]
    final: torch.Tensor
    states: torch.Tensor
    predictions: torch.Tensor
    t: torch.Tensor
    images: np.ndarray

    def __len__(self) -> int:
        return self.final.shape[0]

    def select(self, rows: list[int]) -> Rollout:
        """The rollout of samples `rows` (in that order)."""
        idx = torch.tensor(rows, dtype=torch.long)
        pick = lambda x: x[idx.to(x.device)]  # noqa: E731
        return Rollout([self.prompts[i] for i in rows], [self.metadata[i] for i in rows], pick(self.text_ids),
                       None if self.uncond_ids is None else pick(self.uncond_ids), self.grid, pick(self.final),
                       self.states[:, idx.to(self.states.device)], self.predictions[:, idx.to(self.states.device)],
                       self.t, self.images[rows])

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """One rollout of the samples of `parts` (same grid and step times), in order."""
        first = parts[0]
        return Rollout([p for r in parts for p in r.prompts], [m for r in parts for m in r.metadata],
                       torch.cat([r.text_ids for r in parts]),
                       None if first.uncond_ids is None else torch.cat([r.uncond_ids for r in parts]), first.grid,
                       torch.cat([r.final for r in parts]), torch.cat([r.states for r in parts], 1),
                       torch.cat([r.predictions for r in parts], 1), first.t,
                       np.concatenate([r.images for r in parts]))


def rollout(pipe: URSAPipeline, logits: LogitsFn, prompts: list[str], metadata: list, options: SamplingOptions,
            generator: torch.Generator) -> Rollout:
    """One image per entry of `prompts` (already repeated G times) with the policy's `logits`, through
    `pipe.generate`, with the trajectory. An empty `prompts` (a process with no share of the prompts) gives an
    empty Rollout."""
    if not prompts:
        grid = pipe.grid(options.height, options.width)
        none = torch.zeros(0, grid[0] * grid[1], dtype=torch.long, device=pipe.device)
        size = (grid[0] * pipe.vae.spatial_stride, grid[1] * pipe.vae.spatial_stride)
        return Rollout([], list(metadata), torch.zeros(0, pipe.max_prompt_length, dtype=torch.long), None, grid,
                       none, none[None], none[None], torch.zeros(0, dtype=torch.float64),
                       np.zeros((0, *size, 3), dtype=np.uint8))
    out = pipe.generate(prompts, options, generator, logits=logits, record=True)
    traj = out.trajectory
    return Rollout(prompts, metadata, out.text_ids, out.uncond_ids, out.grid, out.ids, torch.stack(traj.states),
                   torch.stack(traj.predictions), torch.tensor(traj.t, dtype=torch.float64), out.images)
