"""Rewards: `reward(images uint8 [B, H, W, 3], prompts, metadata) -> RewardOutput(scores, values)`."""

from __future__ import annotations

from ..errors import ConfigError

REWARDS = {
    "shapeeval": ("udm_grpo.rewards.shapeeval", "ShapeEvalReward"),
}


def _reward_class(name: str):
    import importlib

    if name not in REWARDS:
        raise ConfigError(f"config key 'reward.name' is '{name}', which is not a known reward; "
                          f"known rewards: {', '.join(sorted(REWARDS))}.")
    module, cls = REWARDS[name]
    return getattr(importlib.import_module(module), cls)


def check_reward(name: str, params: dict | None = None) -> None:
    """ConfigError unless `name` is known and `params` fit its constructor (nothing is loaded)."""
    import inspect

    try:
        inspect.signature(_reward_class(name)).bind(**(params or {}))
    except TypeError as e:
        raise ConfigError(f"config key 'reward.params' does not fit reward '{name}': {e}.") from None


def build_reward(name: str, params: dict | None = None):
    """Instantiate a reward by its config name (reward.name) with keyword arguments (reward.params)."""
    check_reward(name, params)
    return _reward_class(name)(**(params or {}))
