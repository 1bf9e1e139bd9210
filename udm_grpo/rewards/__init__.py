"""Rewards: `reward(images uint8 [B, H, W, 3], prompts, metadata) -> RewardOutput(scores, values)`."""

from __future__ import annotations

from ..errors import ConfigError, UserError

__all__ = ["REWARDS", "build_reward", "check_prompt_source", "check_reward", "records_problem"]

REWARDS = {
    "shapeeval": ("udm_grpo.rewards.shapeeval", "ShapeEvalReward"),
    "clipscore": ("udm_grpo.rewards.clip_score", "CLIPReward"),
    "pickscore": ("udm_grpo.rewards.clip_score", "PickScoreReward"),
    "ocr": ("udm_grpo.rewards.ocr", "OCRReward"),
    "geneval": ("udm_grpo.rewards.geneval", "GenEvalReward"),
    "remote": ("udm_grpo.rewards.service", "RemoteReward"),
}


def _reward_class(name: str):
    import importlib

    if name not in REWARDS:
        raise ConfigError(f"config key 'reward.name' is '{name}', which is not a known reward; "
                          f"known rewards: {', '.join(sorted(REWARDS))}.")
    module, cls = REWARDS[name]
    return getattr(importlib.import_module(module), cls)


def _component_params(names: list[str], params: dict | None) -> dict[str, dict]:
    """reward.params of a composition: a mapping per component name (absent = defaults)."""
    params = params or {}
    extra = [k for k in params if k not in names]
    if extra or not all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"config key 'reward.params' of the composed reward {names} must map each reward name to "
                          f"its keyword arguments, e.g. {{{names[0]}: {{...}}}}" +
                          (f"; '{extra[0]}' is not one of them." if extra else "."))
    return {n: params.get(n, {}) for n in names}


def check_reward(name: str | list[str], params: dict | None = None) -> None:
    """ConfigError unless every reward name is known and its params fit its constructor (nothing is loaded)."""
    import inspect

    if isinstance(name, list):
        for n, p in _component_params(name, params).items():
            check_reward(n, p)
        return
    try:
        inspect.signature(_reward_class(name)).bind(**(params or {}))
    except TypeError as e:
        raise ConfigError(f"config key 'reward.params' does not fit reward '{name}': {e}.") from None


def build_reward(name: str | list[str], params: dict | None = None, weights: list[float] | None = None,
                 normalize: bool = False):
    """A reward from its config: one name (reward.name) with keyword arguments (reward.params), or a list
    of names composed as a weighted sum (reward.weights, reward.normalize; params keyed by name)."""
    check_reward(name, params)
    if isinstance(name, list):
        from .compose import ComposedReward

        parts = {n: build_reward(n, p) for n, p in _component_params(name, params).items()}
        return ComposedReward(parts, weights, normalize)
    return _reward_class(name)(**(params or {}))


def check_prompt_source(name: str | list[str], records: list[dict], source: str) -> None:
    """UserError naming file:line when a reward cannot score one of the records of `source`. Reward classes say
    so with optional static hooks returning the first (index, reason) or None: `check_prompts(prompts)` (e.g.
    the OCR reward and a prompt that quotes no text) and `check_records(records)` (e.g. ShapeEval and a record
    that is not a valid GenEval-schema record of its vocabulary, or a plain-text prompt)."""
    from ..data.prompts import prompt_location

    for n in name if isinstance(name, list) else [name]:
        cls = _reward_class(n)
        hook = getattr(cls, "check_prompts", None)
        if hook and (bad := hook([r["prompt"] for r in records])):
            raise UserError(f"{prompt_location(source, bad[0])}: the prompt {records[bad[0]]['prompt']!r} {bad[1]}.")
        hook = getattr(cls, "check_records", None)
        if hook and (bad := hook(records)):
            raise UserError(f"{prompt_location(source, bad[0])}: {bad[1]}")


def records_problem(reward, records: list) -> tuple[int, str] | None:
    """The first (index, reason) that the `check_records` hook of a built reward (of each component of a composed
    one) finds in `records`, or None."""
    parts = getattr(reward, "components", None)
    for part in parts.values() if isinstance(parts, dict) else [reward]:
        hook = getattr(part, "check_records", None)
        if hook and (bad := hook(records)):
            return bad
    return None
