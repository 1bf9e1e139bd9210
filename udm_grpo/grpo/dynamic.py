"""Dynamic sampling (DAPO, `sampling.dynamic_sampling`): a group whose G rewards are all equal has zero
advantage and teaches nothing, so the step draws more prompts until each process holds its share of groups
with differing rewards, or the cap of extra rollout images is reached; groups of equal rewards then fill
what is left, so every step trains the same number of samples.

Rounds: the step's P prompts, then refills of W x m prompts, m = the most groups any process still lacks,
shrunk (in steps of W prompts) to stay within the cap. Process r owns the r-th contiguous W-th of every
round's groups (P and the refills are multiples of W), and takes its first P / W informative groups in
draw order, then its first uninformative ones. Every process computes every process's choice from the
gathered scores, so no extra communication is needed.
"""

from __future__ import annotations

import torch

from .advantages import group_rows


def informative(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool[n]: the groups of flat prompt-major scores Float[n * G] whose rewards differ."""
    grouped = group_rows(scores, group_size)
    return grouped.amax(1) != grouped.amin(1)


def _owned(flags: list[torch.Tensor], rank: int, world: int) -> list[tuple[int, int, bool]]:
    """(round, group, informative) of the groups process `rank` drew, in draw order."""
    out = []
    for i, f in enumerate(flags):
        per = len(f) // world
        out += [(i, g, bool(f[g])) for g in range(rank * per, (rank + 1) * per)]
    return out


def choose(flags: list[torch.Tensor], rank: int, world: int, need: int) -> list[tuple[int, int]]:
    """Process `rank`'s groups as (round, group index within that round), at most `need` of them: its informative
    groups in draw order, then its uninformative ones. flags[i]: Bool[n_i] per round (n_i a multiple of `world`)."""
    owned = _owned(flags, rank, world)
    return [(i, g) for i, g, ok in owned if ok][:need] + [(i, g) for i, g, ok in owned if not ok][:max(0, need - sum(
        ok for *_, ok in owned))]


def lacking(flags: list[torch.Tensor], world: int, need: int) -> int:
    """The most informative groups any process still lacks (0 when every process has `need`)."""
    return max(max(0, need - sum(ok for *_, ok in _owned(flags, r, world))) for r in range(world))


def refill_size(lack: int, world: int, group_size: int, drawn_extra: int, cap: int) -> int:
    """Prompts of the next refill round: world x lack, shrunk by `world` at a time to keep the extra rollout
    images within `cap`; 0 = stop."""
    n = world * lack
    while n > 0 and drawn_extra + n * group_size > cap:
        n -= world
    return n
