"""Rewards: `reward(images uint8 [B, H, W, 3], prompts, metadata) -> RewardOutput(scores, values)`."""

from __future__ import annotations

from ..errors import ConfigError

REWARDS = {
    "shapeeval": ("udm_grpo.rewards.shapeeval", "ShapeEvalReward"),
}


def build_reward(name: str, params: dict | None = None):
    """Instantiate a reward by its config name (reward.name) with keyword arguments (reward.params)."""
    import importlib

    if name not in REWARDS:
        raise ConfigError(f"config key 'reward.name' is '{name}', which is not a known reward; "
                          f"known rewards: {', '.join(sorted(REWARDS))}.")
    module, cls = REWARDS[name]
    try:
        return getattr(importlib.import_module(module), cls)(**(params or {}))
    except TypeError as e:
        raise ConfigError(f"config key 'reward.params' does not fit reward '{name}': {e}.") from None
