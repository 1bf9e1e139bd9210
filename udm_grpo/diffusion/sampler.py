"""The URSA sampler: uniform noise -> n CTMC Euler steps -> clean image tokens.

At step k the model sees x_{t_k} and gives logits for the clean tokens; with classifier-free
guidance (scale s > 1, only while t_k < guidance_trunc) the logits are u + s (c - u), from the
conditional (c) and unconditional (u, empty prompt) branches run as one batch. The scheduler then
draws x1_hat and jumps. The last step's draw is the final sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .categorical import draw_device
from .scheduler import KineticOptimalScheduler


class ImageLogitsModel(Protocol):
    def image_logits(self, text_ids: torch.Tensor, image_ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Float[B, N, K] clean-token logits for image tokens Long[B, N] given text Long[B, L]."""
        ...


@dataclass
class Trajectory:
    """What a rollout saw, per step k: the model input x_{t_k} and the sampled x1_hat^{(k)}.

    `states[k]`, `predictions[k]`: Long[B, N]; `t[k]` = t_k. `predictions[-1]` is the final sample.
    """

    t: list[float] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)
    predictions: list[torch.Tensor] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        return self.predictions[-1]


def guided_logits(
    model: ImageLogitsModel,
    text_ids: torch.Tensor,
    x: torch.Tensor,
    grid: tuple[int, int],
    guidance_scale: float,
    uncond_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Float[B, N, K] logits at state x, mixed u + s (c - u) when s != 1."""
    if guidance_scale == 1.0 or uncond_ids is None:
        return model.image_logits(text_ids, x, grid)
    both = model.image_logits(torch.cat([text_ids, uncond_ids]), torch.cat([x, x]), grid)
    cond, uncond = both.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_tokens(
    model: ImageLogitsModel,
    scheduler: KineticOptimalScheduler,
    text_ids: torch.Tensor,
    grid: tuple[int, int],
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    guidance_trunc: float = 0.9,
    uncond_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    record: bool = False,
    x_init: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Sample image tokens Long[B, H*W] for text Long[B, L] (and Trajectory when record=True).

    `uncond_ids` Long[B, L] (the empty prompt) is required when guidance_scale != 1.
    """
    if guidance_scale != 1.0 and uncond_ids is None:
        raise ValueError("guidance_scale != 1 needs uncond_ids (the tokenised empty prompt)")
    batch, n_tokens = text_ids.shape[0], grid[0] * grid[1]
    device = text_ids.device
    scheduler.set_timesteps(num_inference_steps)
    if x_init is None:
        dev = draw_device(generator, device)
        x = torch.randint(0, scheduler.num_embeddings, (batch, n_tokens), generator=generator, device=dev).to(device)
    else:
        x = x_init.clone()
    traj = Trajectory()
    for k in scheduler.timesteps:
        t = scheduler.t_of(k)
        scale = guidance_scale if t < guidance_trunc else 1.0
        logits = guided_logits(model, text_ids, x, grid, scale, uncond_ids)
        x_next, x1_hat = scheduler.step(logits, k, x, generator)
        if record:
            traj.t.append(t)
            traj.states.append(x)
            traj.predictions.append(x1_hat)
        x = x_next
    return (x, traj) if record else x
