"""Training states and actions for the trained timesteps (UDM-GRPO's two insights as switches).

Reduced-Step: train `train_steps` consecutive sampling steps k = s, ..., s + train_steps - 1 with
s ~ UniformInt[lo, hi), drawn once per rollout.

For each trained step k at time t_k:
* state  = x_hat_{t_k} ~ p_{t_k}(. | x1_hat)   (`forward_process`, the paper's way: fresh forward
           noise around the final sample, independently per step)
         | the rollout's own x_{t_k}            (the naive way);
* action = the final clean sample x1_hat          (`clean_response`, the paper's way)
         | that step's own draw x1_hat^{(k)}      (the naive way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rollout import Rollout


@dataclass
class TrainingStates:
    """states / actions: Long[B, N] for one trained step k at time t."""

    k: int
    t: float
    states: torch.Tensor
    actions: torch.Tensor


def pick_train_steps(train_start: list[int], train_steps: int, generator: torch.Generator) -> list[int]:
    lo, hi = train_start
    start = int(torch.randint(lo, hi, (1,), generator=generator, device=generator.device))
    return list(range(start, start + train_steps))


def training_states(
    rollout: Rollout,
    steps: list[int],
    path,
    forward_process: bool = True,
    clean_response: bool = True,
    generator: torch.Generator | None = None,
) -> list[TrainingStates]:
    out = []
    for k in steps:
        t = float(rollout.t[k])
        states = path.add_noise(rollout.final, t, generator) if forward_process else rollout.states[k]
        actions = rollout.final if clean_response else rollout.predictions[k]
        out.append(TrainingStates(k, t, states, actions))
    return out
