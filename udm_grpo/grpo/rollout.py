"""Rollout: G images per prompt from the current policy, with the trajectory kept for training.

Layout is prompt-major: sample i = j * G + g is image g of prompt j (see `advantages.expand_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion.sampler import sample_tokens
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


@torch.no_grad()
def rollout(
    pipe: URSAPipeline,
    model,
    prompts: list[str],
    metadata: list,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_trunc: float,
    height: int,
    width: int,
    generator: torch.Generator,
    batch_size: int | None = None,
) -> Rollout:
    """Sample one image per entry of `prompts` (already repeated G times) with `model`, in batches.
    An empty `prompts` (a process with no share of the prompts) gives an empty Rollout."""
    grid = pipe.grid(height, width)
    if not prompts:
        none = torch.zeros(0, grid[0] * grid[1], dtype=torch.long, device=pipe.device)
        size = (grid[0] * pipe.vae.spatial_stride, grid[1] * pipe.vae.spatial_stride)
        return Rollout([], list(metadata), torch.zeros(0, pipe.max_prompt_length, dtype=torch.long), None, grid,
                       none, none[None], none[None], torch.zeros(0, dtype=torch.float64),
                       np.zeros((0, *size, 3), dtype=np.uint8))
    text = pipe.encode_prompt(prompts)
    uncond = pipe.encode_prompt([""] * len(prompts)) if guidance_scale != 1.0 else None
    batch_size = batch_size or len(prompts)
    finals, states, preds, images, t = [], [], [], [], None
    for i in range(0, len(prompts), batch_size):
        sl = slice(i, i + batch_size)
        x, traj = sample_tokens(model, pipe.scheduler, text[sl], grid, num_inference_steps, guidance_scale,
                                guidance_trunc, None if uncond is None else uncond[sl], generator, record=True)
        finals.append(x)
        states.append(torch.stack(traj.states))
        preds.append(torch.stack(traj.predictions))
        images.append(pipe.decode(x, grid))
        t = torch.tensor(traj.t, dtype=torch.float64)
    return Rollout(prompts, metadata, text, uncond, grid, torch.cat(finals), torch.cat(states, 1),
                   torch.cat(preds, 1), t, np.concatenate(images))
