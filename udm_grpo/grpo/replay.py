"""Rollout reuse (`training.reuse_rollouts` R): each step trains on its own rollout and on the stored
micro-batches of the previous R - 1 rollouts.

A stored micro-batch keeps its training states, actions, advantages, reference log-probs and the per-token
log-probs `old_logp` of the policy that drew it (computed when it was drawn, on the same states), so its
importance ratio r = exp(log p_theta - old_logp) is against that policy (objective.grpo_loss). Micro-batches
drawn more than `max_staleness` optimiser updates ago are dropped. The buffer is part of each process's
checkpoint state, so a resumed run trains on the same samples.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .policy import MicroBatch

_TENSORS = ("text", "uncond", "states", "actions", "advantages", "ref_logp", "old_logp")


class ReplayBuffer:
    """The micro-batches of the last `rollouts` rollouts with the optimiser update count when each was drawn."""

    def __init__(self, rollouts: int, max_staleness: int | None = None):
        self.rollouts, self.max_staleness = rollouts, max_staleness
        self.stored: list[tuple[int, list[MicroBatch]]] = []  # (update count when drawn, micro-batches), oldest first

    def reused(self, updates: int) -> list[MicroBatch]:
        """The stored micro-batches still within the staleness cap at update count `updates` (older first)."""
        cap = self.max_staleness
        return [m for drawn, micro in self.stored if cap is None or updates - drawn <= cap for m in micro]

    def add(self, micro: list[MicroBatch], updates: int) -> None:
        """Store one rollout's micro-batches (with `old_logp` set), keeping the newest `rollouts - 1`."""
        if self.rollouts < 2:
            return
        self.stored = [*self.stored, (updates, micro)][-(self.rollouts - 1):]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The buffer as named CPU tensors (for safetensors)."""
        out: dict[str, torch.Tensor] = {}
        for i, (drawn, micro) in enumerate(self.stored):
            for j, m in enumerate(micro):
                key = f"replay/{i}/{j}/"
                out[key + "meta"] = torch.tensor([drawn, m.grid[0], m.grid[1]], dtype=torch.long)
                out[key + "t"] = torch.tensor([m.t], dtype=torch.float64)
                for name in _TENSORS:
                    if getattr(m, name) is not None:
                        out[key + name] = getattr(m, name).detach().cpu().clone()  # micro-batches share storage
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore from `state_tensors` output (other keys are ignored)."""
        entries: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("replay/"):
                _, i, j, name = key.split("/")
                entries.setdefault((int(i), int(j)), {})[name] = value
        stored: dict[int, tuple[int, list[MicroBatch]]] = {}
        for (i, _j), e in sorted(entries.items()):
            drawn, h, w = e["meta"].tolist()
            kwargs = {f.name: e[f.name].to(device) if f.name in e else None for f in fields(MicroBatch)
                      if f.name in _TENSORS}
            stored.setdefault(i, (drawn, []))[1].append(MicroBatch(float(e["t"][0]), (h, w), **kwargs))
        self.stored = [stored[i] for i in sorted(stored)]
