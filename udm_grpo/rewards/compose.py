"""A weighted sum of rewards: `reward.name: [pickscore, clipscore]` with `reward.weights: [1.0, 0.5]`.

    score = sum_i w_i * f_i(score_i),  f_i = identity, or with `normalize` the standardisation
            (s - mean(s)) / (std(s) + 1e-6) over the images of the call

Every component's values are kept, named `COMPONENT` for a value named like the component and
`COMPONENT/VALUE` otherwise, plus `COMPONENT/score` (its own score), so the trainer logs them all as
`reward/...`. Each component keeps its own device, batch size and lazy loading.
"""

from __future__ import annotations

import torch

from .base import RewardOutput


class ComposedReward:
    """components: name -> reward; weights: one per component (default 1)."""

    def __init__(self, components: dict, weights: list[float] | None = None, normalize: bool = False):
        if not components:
            raise ValueError("a composed reward needs at least one component")
        weights = [1.0] * len(components) if weights is None else [float(w) for w in weights]
        if len(weights) != len(components):
            raise ValueError(f"{len(weights)} weights for {len(components)} rewards")
        self.components, self.weights, self.normalize = dict(components), weights, normalize

    def __call__(self, images, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        total = None
        values: dict[str, torch.Tensor] = {}
        for (name, reward), w in zip(self.components.items(), self.weights):
            out = reward(images, prompts, metadata)
            s = out.scores
            if self.normalize and len(s) > 1:
                s = (s - s.mean()) / (s.std(unbiased=False) + 1e-6)
            total = w * s if total is None else total + w * s
            values[f"{name}/score"] = out.scores
            values.update({(name if k == name else f"{name}/{k}"): v for k, v in out.values.items()})
        return RewardOutput(total, values)
