"""The URSA sampler: uniform noise -> n CTMC Euler steps -> clean image tokens.

At step k the model sees x_{t_k} and gives logits for the clean tokens; with classifier-free
guidance (scale s > 1, only while t_k < guidance_trunc) the logits are u + s (c - u), from the
conditional (c) and unconditional (u, empty prompt) branches run as one batch. The scheduler then
draws x1_hat and jumps. The last step's draw is the final sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .categorical import draw_device
from .scheduler import KineticOptimalScheduler


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample, for every sampler entry point (`sample_tokens`, `URSAPipeline`, the trainer's rollouts,
    the evaluations). The defaults are URSA's own: 25 CTMC steps, classifier-free guidance 7 while t < 0.9.

    num_inference_steps: CTMC steps; guidance_scale: s of u + s (c - u) (1 = CFG-free, no unconditional
    branch); guidance_trunc: guidance only while t < it; height / width: image size in pixels (None: the
    tokenizer's native size); batch_size: images per sampler call (None: all at once; the draws are the same
    either way, made in order from one generator).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 7.0
    guidance_trunc: float = 0.9
    height: int | None = None
    width: int | None = None
    batch_size: int | None = None

    def __post_init__(self):
        if self.num_inference_steps < 1 or not self.guidance_scale >= 1 or not 0 < self.guidance_trunc <= 1:
            raise ValueError(f"SamplingOptions needs num_inference_steps >= 1, guidance_scale >= 1 and "
                             f"guidance_trunc in (0, 1], got {self}")
        if any(v is not None and v < 1 for v in (self.height, self.width, self.batch_size)):
            raise ValueError(f"SamplingOptions sizes must be >= 1 or None, got {self}")

    def replace(self, **changes) -> SamplingOptions:
        """A copy with `changes` (field names of this class)."""
        return dataclasses.replace(self, **changes)

    @property
    def steps_and_guidance(self) -> dict:
        """The three settings that decide the draws (what evaluations record as their sampling)."""
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "guidance_trunc": self.guidance_trunc}


class ImageLogitsModel(Protocol):
    def image_logits(self, text_ids: torch.Tensor, image_ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Float[B, N, K] clean-token logits for image tokens Long[B, N] given text Long[B, L]."""
        ...


LogitsFn = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
"""What the sampler calls: (text_ids Long[B, L], image_ids Long[B, N], grid) -> Float[B, N, K] clean-token
logits, e.g. `transformer.image_logits` or a wrapped policy whose forward takes the same arguments."""


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

    @classmethod
    def concat(cls, parts: list[Trajectory]) -> Trajectory:
        """One trajectory of the batches `parts` sampled one after another (the same times)."""
        return cls(list(parts[0].t), [torch.cat(x) for x in zip(*(p.states for p in parts), strict=True)],
                   [torch.cat(x) for x in zip(*(p.predictions for p in parts), strict=True)])


def guided_logits(
    logits: LogitsFn,
    text_ids: torch.Tensor,
    x: torch.Tensor,
    grid: tuple[int, int],
    guidance_scale: float,
    uncond_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Float[B, N, K] logits at state x, mixed u + s (c - u) when s != 1."""
    if guidance_scale == 1.0 or uncond_ids is None:
        return logits(text_ids, x, grid)
    both = logits(torch.cat([text_ids, uncond_ids]), torch.cat([x, x]), grid)
    cond, uncond = both.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_tokens(
    logits_fn: LogitsFn,
    scheduler: KineticOptimalScheduler,
    text_ids: torch.Tensor,
    grid: tuple[int, int],
    options: SamplingOptions,
    uncond_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    record: bool = False,
    x_init: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Sample image tokens Long[B, H*W] for text Long[B, L] (and Trajectory when record=True).

    Uses the steps and guidance of `options` (not its sizes: the caller batches and sizes); `uncond_ids`
    Long[B, L] (the empty prompt) is required when its guidance_scale != 1.
    """
    if options.guidance_scale != 1.0 and uncond_ids is None:
        raise ValueError("guidance_scale != 1 needs uncond_ids (the tokenised empty prompt)")
    batch, n_tokens = text_ids.shape[0], grid[0] * grid[1]
    device = text_ids.device
    scheduler.set_timesteps(options.num_inference_steps)
    if x_init is None:
        dev = draw_device(generator, device)
        x = torch.randint(0, scheduler.num_embeddings, (batch, n_tokens), generator=generator, device=dev).to(device)
    else:
        x = x_init.clone()
    traj = Trajectory()
    for k in scheduler.timesteps:
        t = scheduler.t_of(k)
        scale = options.guidance_scale if t < options.guidance_trunc else 1.0
        logits = guided_logits(logits_fn, text_ids, x, grid, scale, uncond_ids)
        x_next, x1_hat = scheduler.step(logits, k, x, generator)
        if record:
            traj.t.append(t)
            traj.states.append(x)
            traj.predictions.append(x1_hat)
        x = x_next
    return (x, traj) if record else x
