"""Health signals of a rollout: how the sampler moves tokens, and how varied the final samples are.

Logged per step as `health/*` (plotted in curves.png, read by the end-of-run verdict); all computed on
this process's images (multi-process runs log the mean over the processes where a value is defined).

    flip rate at step k      = mean over images and positions of [x_{k+1} != x_k]   (x_S = the final sample)
    codebook entropy         = -sum_v q_v log q_v, q = histogram of the final samples' tokens (nats)
    within-group diversity   = mean over groups and over pairs g != g' of (1/N) sum_n [a_g,n != a_g',n]

A policy that collapses onto one image per prompt drives the diversity to 0 (GRPO's groups then carry no
signal); one that collapses onto a few codes lowers the entropy; a sampler that stops moving tokens early
(or moves them all at the last step) shows in the flip rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def flip_rates(states: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Float[S]: the share of tokens changed by each of the S sampling steps. states: Long[S, B, N] (the state
    fed at each step), final: Long[B, N]."""
    if states.shape[0] == 0 or final.shape[0] == 0:
        return torch.zeros(states.shape[0])
    after = torch.cat([states[1:], final[None]])
    return (after != states).float().mean(dim=(1, 2)).cpu()


def codebook_entropy(final: torch.Tensor, codebook_size: int) -> float:
    """Entropy (nats) of the token histogram of `final` Long[B, N] over `codebook_size` codes (at most
    log min(K, B * N))."""
    if final.numel() == 0:
        return math.nan
    q = torch.bincount(final.reshape(-1).cpu(), minlength=codebook_size).double()
    q = q[q > 0] / q.sum()
    return float(-(q * q.log()).sum())


def group_diversity(final: torch.Tensor, group_size: int, offset: int = 0) -> float:
    """Mean pairwise Hamming fraction within the complete groups of `final` Long[B, N] (prompt-major rows;
    row i is global sample offset + i, groups start at multiples of `group_size`). NaN without a complete group."""
    start = (-offset) % group_size
    count = (final.shape[0] - start) // group_size
    if count < 1 or group_size < 2:
        return math.nan
    groups = final[start: start + count * group_size].reshape(count, group_size, -1)
    differ = (groups[:, :, None, :] != groups[:, None, :, :]).float().mean(-1)  # [count, G, G], diagonal 0
    return float(differ.sum() / (count * group_size * (group_size - 1)))


def rollout_health(states: torch.Tensor, final: torch.Tensor, codebook_size: int, group_size: int,
                   offset: int = 0) -> dict[str, float]:
    """`health/*` metrics of one rollout: flip_rate (mean over steps), flip/kNN per step, codebook_entropy,
    group_diversity."""
    flips = flip_rates(states, final)
    out = {"health/flip_rate": flips.mean().item() if len(flips) else math.nan}
    out.update({f"health/flip/k{k:02d}": v for k, v in enumerate(flips.tolist())})
    out["health/codebook_entropy"] = codebook_entropy(final, codebook_size)
    out["health/group_diversity"] = group_diversity(final, group_size, offset)
    return out


def mean_where_known(values: dict[str, float], sum_over_processes: Callable[[torch.Tensor], torch.Tensor]
                     ) -> dict[str, float]:
    """Each value's mean over the processes where it is not NaN (a process may hold no complete group), NaN
    where all are NaN. `sum_over_processes` is an all-reduce sum of a Float64[2, K] tensor."""
    v = torch.tensor(list(values.values()), dtype=torch.float64)
    total, count = sum_over_processes(torch.stack([v.nan_to_num(), (~v.isnan()).double()])).unbind()
    return dict(zip(values, (total / count).tolist(), strict=True))
