"""The step's rollout: prompts -> images -> rewards, with dynamic sampling's refills (`dynamic`), reward
statistics and health signals (`health`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .advantages import group_rows, group_stats
from .dynamic import choose, informative, lacking, refill_size
from .health import rollout_health
from .rollout import Rollout


@dataclass
class Drawn:
    """One draw of prompts: `records` (one per group), this process's `rollout` of its share of them, and the
    scores Float[n * G] and reward values (name -> Float[n * G]) of all processes (prompt-major)."""

    records: list[dict]
    rollout: Rollout
    scores: torch.Tensor
    values: dict[str, torch.Tensor]

    def passes(self, group_size: int, key: str = "strict") -> torch.Tensor | None:
        """Float[n, G]: the per-image pass values (the reward's value `key`), None when it reports none."""
        return group_rows(self.values[key], group_size) if key in self.values else None


@dataclass
class Batch:
    """What a step trains: this process's `rollout`, the trained groups' `records` and scores Float[P * G] of
    all processes (None when a reward was not finite), the step's metrics, the rollout images drawn on all
    processes, and every draw (`rounds`, for the per-prompt statistics)."""

    rollout: Rollout | None
    scores: torch.Tensor | None
    records: list[dict]
    metrics: dict
    images: int
    rounds: list[Drawn] = field(default_factory=list)


def collect(draw: Callable[[list[dict]], Drawn], next_prompts: Callable[[int], list[dict]], sampling, rank: int,
            world: int, codebook_size: int, mean_over_processes: Callable[[dict], dict]) -> Batch:
    """P prompts from `next_prompts`, drawn with `draw`; with `sampling.dynamic_sampling`, refills (see
    `dynamic`) up to `sampling.max_extra_rollouts` extra images (null: P x G). `reward/*` and `health/*` describe
    the first P prompts (the policy's own draw); `train/zero_std_fraction` is the share of trained groups whose
    rewards are all equal and `train/extra_rollouts` the extra images drawn (with dynamic sampling)."""
    s = sampling
    G, P = s.num_images_per_prompt, s.num_prompts_per_step
    first = draw(next_prompts(P))
    rounds = [first]
    ro = first.rollout
    metrics = {f"reward/{name}": v.mean().item() for name, v in first.values.items()}
    metrics.update(mean_over_processes(rollout_health(ro.states, ro.final, codebook_size, G, rank * len(ro))))
    finite = lambda: all(bool(torch.isfinite(r.scores).all()) for r in rounds)  # noqa: E731
    extra, cap = 0, P * G if s.max_extra_rollouts is None else s.max_extra_rollouts
    while s.dynamic_sampling and finite():
        n = refill_size(lacking([informative(r.scores, G) for r in rounds], world, P // world), world, G, extra, cap)
        if not n:
            break
        rounds.append(draw(next_prompts(n)))
        extra += n * G
    if not finite():
        return Batch(None, None, [], metrics, P * G + extra)
    metrics.update({f"reward/{k}": v for k, v in group_stats(first.scores, G).items()})
    if not s.dynamic_sampling:
        return Batch(ro, first.scores, first.records, metrics, P * G, rounds)
    flags = [informative(r.scores, G) for r in rounds]
    picks = [choose(flags, q, world, P // world) for q in range(world)]
    local = []
    for i, g in picks[rank]:
        start = (g - rank * (len(flags[i]) // world)) * G  # the group's first row in this process's rollout
        local.append(rounds[i].rollout.select(list(range(start, start + G))))
    order = [(i, g) for pick in picks for i, g in pick]
    metrics["train/zero_std_fraction"] = 1 - sum(bool(flags[i][g]) for i, g in order) / len(order)
    metrics["train/extra_rollouts"] = extra
    return Batch(Rollout.cat(local), torch.cat([group_rows(rounds[i].scores, G)[g] for i, g in order]),
                 [rounds[i].records[g] for i, g in order], metrics, P * G + extra, rounds)
