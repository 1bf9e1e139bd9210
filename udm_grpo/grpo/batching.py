"""Batch planner: from prompts per step, group size and process count to micro-batches and accumulation.

One optimiser step trains on P prompts x G images = P * G rollouts, split evenly over W processes.
Each process cuts its images into micro-batches of `micro_batch_size` and runs every micro-batch at each
of the `train_steps` trained timesteps, so

    images_per_process   = P * G / W                       (must be an integer)
    micro_batches        = images_per_process / micro_batch_size   (must be an integer)
    grad_accum_steps     = micro_batches * train_steps     (backward passes per optimiser update)
    pairs_per_update     = P * G * train_steps             ((sample, timestep) pairs per update)

Every mismatch raises ConfigError with one sentence that names the key and suggests valid values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    num_prompts: int
    group_size: int
    num_processes: int
    micro_batch_size: int
    train_steps: int
    updates_per_rollout: int = 1

    @property
    def images_per_step(self) -> int:
        return self.num_prompts * self.group_size

    @property
    def images_per_process(self) -> int:
        return self.images_per_step // self.num_processes

    @property
    def micro_batches_per_process(self) -> int:
        """Micro-batches per process for one trained timestep."""
        return self.images_per_process // self.micro_batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.micro_batches_per_process * self.train_steps

    @property
    def pairs_per_update(self) -> int:
        return self.images_per_step * self.train_steps

    def describe(self) -> str:
        """One-line summary for logs."""
        reuse = f", {self.updates_per_rollout} updates per rollout" if self.updates_per_rollout > 1 else ""
        procs = f"{self.num_processes} process" + ("es" if self.num_processes > 1 else "")
        return (
            f"{self.images_per_step} images/step ({self.num_prompts} prompts x {self.group_size}) over {procs} = "
            f"{self.images_per_process} per process; micro-batch {self.micro_batch_size}: "
            f"{self.micro_batches_per_process} per timestep x {self.train_steps} timesteps = "
            f"{self.grad_accum_steps} accumulation steps; {self.pairs_per_update} (sample, timestep) pairs per "
            f"update{reuse}"
        )


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def _near_multiples(value: int, step: int) -> list[int]:
    lo, hi = (value // step) * step, (value // step + 1) * step
    return [v for v in (lo, hi) if v > 0]


def _near_divisors(value: int, target: int) -> list[int]:
    divisors = [d for d in range(1, value + 1) if value % d == 0]
    below = [d for d in divisors if d < target]
    above = [d for d in divisors if d > target]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def plan_batches(
    num_prompts_per_step: int,
    group_size: int,
    num_processes: int,
    micro_batch_size: int | None,
    train_steps: int,
    updates_per_rollout: int = 1,
) -> BatchPlan:
    """Derive the per-process batch layout; micro_batch_size None = all of a process's images at once."""
    _positive("sampling.num_prompts_per_step", num_prompts_per_step)
    _positive("sampling.num_images_per_prompt", group_size)
    _positive("the number of processes", num_processes)
    _positive("sampling.train_steps", train_steps)
    _positive("training.updates_per_rollout", updates_per_rollout)
    images = num_prompts_per_step * group_size
    if images % num_processes:
        step = num_processes // math.gcd(group_size, num_processes)
        options = " or ".join(str(v) for v in _near_multiples(num_prompts_per_step, step))
        raise ConfigError(
            f"{num_prompts_per_step} prompts x {group_size} images = {images} images cannot be split over "
            f"{num_processes} processes; use a prompt count divisible by {step} such as {options} "
            f"(sampling.num_prompts_per_step) or a different number of processes."
        )
    per_process = images // num_processes
    if micro_batch_size is None:
        micro_batch_size = per_process
    _positive("training.micro_batch_size", micro_batch_size)
    if per_process % micro_batch_size:
        options = " or ".join(str(v) for v in _near_divisors(per_process, micro_batch_size))
        raise ConfigError(
            f"training.micro_batch_size {micro_batch_size} does not divide the {per_process} images each of the "
            f"{num_processes} process(es) trains ({images} images/step); use a divisor of {per_process} such as "
            f"{options}."
        )
    return BatchPlan(
        num_prompts_per_step, group_size, num_processes, micro_batch_size, train_steps, updates_per_rollout
    )


def plan_from_config(config, num_processes: int) -> BatchPlan:
    """`plan_batches` from a `udm_grpo.config.Config` (sampling.* and training.* keys)."""
    return plan_batches(
        config.sampling.num_prompts_per_step,
        config.sampling.num_images_per_prompt,
        num_processes,
        config.training.micro_batch_size,
        config.sampling.train_steps,
        config.training.updates_per_rollout,
    )
