"""Validation rules of config leaves: each `Rule` says what a value "must be" in one phrase, tests and
normalises it. `config.py` attaches one to every key."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A leaf-value check: `phrase` completes "must be ...", `test` accepts, `convert` normalises."""

    phrase: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda v: v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def int_rule(lo: int | None = None, hi: int | None = None) -> Rule:
    if hi is not None:
        phrase = f"an integer in [{lo}, {hi}]"
    else:
        phrase = {1: "a positive integer", 0: "a non-negative integer"}.get(lo, f"an integer >= {lo}")
    return Rule(phrase, lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def float_rule(phrase: str, ok: Callable[[float], bool] = lambda v: True) -> Rule:
    return Rule(phrase, lambda v: _is_num(v) and ok(float(v)), float)


def optional(rule: Rule) -> Rule:
    return Rule(
        f"{rule.phrase} or null", lambda v: v is None or rule.test(v), lambda v: None if v is None else rule.convert(v)
    )


def choice(*values: str) -> Rule:
    return Rule("one of " + ", ".join(repr(v) for v in values), lambda v: v in values)


POS_INT, NONNEG_INT = int_rule(1), int_rule(0)
# YAML reads a bare `no` as false; accept it as the "no" it was meant to be.
MIXED_PRECISION = Rule("one of 'no', 'bf16'", lambda v: v is False or v in ("no", "bf16"),
                       lambda v: "no" if v is False else v)
POS_FLOAT = float_rule("a positive number", lambda v: v > 0)
NONNEG_FLOAT = float_rule("a non-negative number", lambda v: v >= 0)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
MAPPING = Rule("a mapping", lambda v: isinstance(v, Mapping), dict)
INT_PAIR = Rule(
    "a list of two non-negative integers [lo, hi]",
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v),
    list,
)
REWARD_NAME = Rule(
    "a reward name or a list of distinct reward names",
    lambda v: (isinstance(v, str) and v != "") or (isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(x, str) and x for x in v) and len(set(v)) == len(v)),
    lambda v: v if isinstance(v, str) else list(v),
)
NUMBERS = Rule("a list of numbers", lambda v: isinstance(v, (list, tuple)) and all(_is_num(x) for x in v),
               lambda v: [float(x) for x in v])
BETAS = Rule(
    "a list of two numbers in [0, 1)",
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) and 0 <= x < 1 for x in v),
    lambda v: [float(x) for x in v],
)


def offload_problem(engine: str, zero_stage: int | None, offload_optimizer: bool, offload_param: bool) -> str | None:
    """The sentence refusing `training.offload_optimizer` / `training.offload_param` under `engine` (ddp, deepspeed,
    fsdp; 'auto' and an unset ZeRO stage are checked once the engine is known), else None. DeepSpeed offloads the
    optimizer at every ZeRO stage and parameters at stage 3; FSDP2's CPUOffloadPolicy moves parameters, gradients and
    so the AdamW step together (offload_param); DDP has no offload."""
    if engine == "ddp" and (offload_optimizer or offload_param):
        key = "offload_optimizer" if offload_optimizer else "offload_param"
        return (f"config key 'training.{key}' needs training.engine deepspeed or fsdp; DDP keeps every tensor on "
                "the GPU.")
    if engine == "deepspeed" and offload_param and zero_stage in (1, 2):
        return (f"config key 'training.offload_param' needs DeepSpeed ZeRO stage 3 (this run's is {zero_stage}, "
                "which keeps whole parameters on every GPU); set training.zero_stage: 3 or offload_optimizer only.")
    if engine == "fsdp" and offload_optimizer:
        return ("config key 'training.offload_optimizer' is DeepSpeed's; under FSDP2 set training.offload_param, "
                "whose CPUOffloadPolicy moves parameters, gradients and the AdamW step to the CPU together.")
    return None
