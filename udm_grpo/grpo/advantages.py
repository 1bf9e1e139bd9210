"""Group-normalised GRPO advantages.

Layout (used everywhere in udm-grpo): a rollout of P prompts with G images each is kept **prompt-major**.

- flat order: index i = j * G + g is image g of prompt j, i.e. [p_1 x G, p_2 x G, ...]
  (`expand_prompts` builds the prompt list in this order);
- grouped view: Float[P, G], row j = prompt j's G images (`group_rows(flat, G)` is `flat.view(P, G)`).

Scores gathered from several processes in rank order keep the flat order when each process holds a
contiguous slice. The reference code instead repeats the whole prompt list G times (image-major,
index g * P + j, grouped as [G, P]); `group_rows(..., order="image-major")` converts that layout.

A_{j,g} = clip((s_{j,g} - mean_g s_{j,:}) / (std + eps), -clip, clip), with std the population (ddof 0)
std of row j ("group"), of all P * G scores ("batch") or 1 ("none", Dr. GRPO); optionally the row is pooled
with the prompt's scores at earlier steps (`history`). Groups whose pooled scores are all equal get A = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import torch

Order = Literal["prompt-major", "image-major"]
Scale = Literal["group", "batch", "none"]
T = TypeVar("T")


def expand_prompts(prompts: Sequence[T], group_size: int) -> list[T]:
    """[p_1, ..., p_P] -> [p_1 x G, ..., p_P x G] (prompt-major flat rollout order, length P * G)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [p for p in prompts for _ in range(group_size)]


def _as_float(scores) -> torch.Tensor:
    x = torch.as_tensor(scores)
    return x if x.is_floating_point() else x.to(torch.float32)


def group_rows(scores, group_size: int, order: Order = "prompt-major") -> torch.Tensor:
    """Flat scores Float[P * G] -> grouped Float[P, G] (row j = prompt j's group).

    order: "prompt-major" (udm-grpo, index j * G + g) or "image-major" (reference, index g * P + j).
    A 2-D input is taken as already grouped [P, G] and returned as is (after a shape check).
    """
    x = _as_float(scores)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.dim() == 2:
        if x.shape[1] != group_size:
            raise ValueError(f"grouped scores must have shape [P, {group_size}], got {list(x.shape)}")
        return x
    if x.dim() != 1 or x.numel() == 0 or x.numel() % group_size:
        raise ValueError(f"expected flat scores whose length is a multiple of {group_size}, got {list(x.shape)}")
    if order == "prompt-major":
        return x.view(-1, group_size)
    if order == "image-major":
        return x.view(group_size, -1).t()
    raise ValueError(f"order must be 'prompt-major' or 'image-major', got {order!r}")


def flat_from_groups(grouped: torch.Tensor, order: Order = "prompt-major") -> torch.Tensor:
    """Inverse of `group_rows`: Float[P, G] -> Float[P * G] in the given flat order."""
    if grouped.dim() != 2:
        raise ValueError(f"expected grouped scores [P, G], got {list(grouped.shape)}")
    if order == "prompt-major":
        return grouped.reshape(-1)
    if order == "image-major":
        return grouped.t().reshape(-1)
    raise ValueError(f"order must be 'prompt-major' or 'image-major', got {order!r}")


def group_advantages(
    scores,
    group_size: int,
    scale: Scale = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    history: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """Group-normalised advantages, same shape as `scores`.

    scores: Float[P * G] (prompt-major flat order) or Float[P, G] (grouped rows); tensor, array or list.
    Row j's pool is its G scores, plus `history[j]` (the prompt's scores at earlier steps, Flow-GRPO's
    per-prompt statistics) when given. A = (s - mean(pool)) / (spread + eps) with spread the population
    (ddof 0) std of the pool ("group"), of all P * G scores ("batch"), or A = s - mean(pool) ("none", Dr.
    GRPO); then clamped to [-clip, clip] unless clip is None. A pool of equal values gives exactly 0.
    Computed in float64, returned in the input's float dtype (float32 for integer input). Non-finite scores
    raise ValueError.
    """
    x = _as_float(scores)
    out_dtype = x.dtype
    grouped = group_rows(x, group_size).to(torch.float64)
    if not torch.isfinite(grouped).all():
        raise ValueError("scores contain NaN or infinite values; refusing to compute advantages")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if history is not None and len(history) != grouped.shape[0]:
        raise ValueError(f"history must hold one list per group ({grouped.shape[0]}), got {len(history)}")
    centre, spread, constant = [], [], []
    for j, row in enumerate(grouped):
        pool = row if history is None or not len(history[j]) else torch.cat(
            [row, torch.as_tensor(history[j], dtype=torch.float64)])
        centre.append(pool.mean())
        spread.append(pool.std(unbiased=False))
        constant.append(bool(pool.max() == pool.min()))  # the mean can differ from equal values by rounding
    centred = grouped - torch.stack(centre)[:, None]
    if scale == "group":
        centred = centred / (torch.stack(spread)[:, None] + eps)
    elif scale == "batch":
        centred = centred / (grouped.std(unbiased=False) + eps)
    adv = centred.masked_fill(torch.tensor(constant)[:, None], 0.0)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        adv = adv.clamp(-clip, clip)
    return adv.reshape(x.shape).to(out_dtype)


def group_stats(scores, group_size: int) -> dict[str, float]:
    """Reward statistics of one rollout (python floats).

    scores: Float[P * G] (prompt-major) or Float[P, G]. Keys: mean, std (population, over all
    scores), min, max, group_std_mean (mean over prompts of the within-group population std),
    zero_var_frac (fraction of groups whose G scores are all equal: they give zero advantage, no signal).
    """
    grouped = group_rows(scores, group_size).to(torch.float64)
    group_std = grouped.std(dim=1, unbiased=False)
    zero_var = (grouped.amax(dim=1) == grouped.amin(dim=1)).to(torch.float64)
    return {
        "mean": grouped.mean().item(),
        "std": grouped.std(unbiased=False).item(),
        "min": grouped.min().item(),
        "max": grouped.max().item(),
        "group_std_mean": group_std.mean().item(),
        "zero_var_frac": zero_var.mean().item(),
    }
