"""The reward contract: `reward(images, prompts, metadata) -> RewardOutput`.

`scores` is what GRPO optimises; `values` are logged (one float[B] per name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import UserError

if TYPE_CHECKING:
    from ..data.check import Vocabulary


@dataclass
class RewardOutput:
    """scores: Float32[B]; values: name -> Float32[B] (logged, not optimised)."""

    scores: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = _float_vector(self.scores, "scores")
        self.values = {k: _float_vector(v, f"values[{k!r}]") for k, v in self.values.items()}
        for k, v in self.values.items():
            if v.shape != self.scores.shape:
                raise ValueError(f"RewardOutput values[{k!r}] has shape {tuple(v.shape)}, "
                                 f"scores has {tuple(self.scores.shape)}.")


def _float_vector(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float32)
    if t.dim() != 1:
        raise ValueError(f"RewardOutput {name} must be a vector [B], got shape {tuple(t.shape)}.")
    return t


@runtime_checkable
class Reward(Protocol):
    """Anything callable as reward(images uint8 [B, H, W, 3], prompts, metadata) -> RewardOutput."""

    def __call__(self, images: torch.Tensor | np.ndarray, prompts: list[str],
                 metadata: list[dict | None]) -> RewardOutput: ...


def strict_weight(value: Any, reward: str) -> float:
    """The `strict` parameter of the GenEval-rule rewards: a weight w in [0, 1] (true = 1, false = 0) of
    strict correctness in the reward (1 - w) * score + w * strict."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and 0 <= value <= 1):
        return float(value)
    raise UserError(f"the {reward} reward's parameter 'strict' must be true, false or a weight in [0, 1], "
                    f"got {value!r}.")


def blend_strict(score: torch.Tensor, strict: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * score + weight * strict: Float[B] from partial credit and strict 0/1, both Float[B]."""
    return (1 - weight) * score + weight * strict


def to_uint8_images(images: Any) -> np.ndarray:
    """uint8 torch tensor / numpy array [B, H, W, 3] (or a list of HxWx3 images) -> numpy uint8."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    elif isinstance(images, list | tuple):
        images = np.stack([np.asarray(im) for im in images]) if images else np.zeros((0, 1, 1, 3), np.uint8)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"rewards take uint8 images [B, H, W, 3]; got {images.dtype} "
                        f"with shape {images.shape}.")
    return images


def check_batch(images: np.ndarray, prompts: list[str], metadata: list | None) -> None:
    """Raise UserError unless images, prompts and metadata have the same length."""
    n_meta = len(metadata) if metadata is not None else len(prompts)
    if not len(images) == len(prompts) == n_meta:
        raise UserError(f"reward batch mismatch: {len(images)} images, {len(prompts)} prompts, "
                        f"{n_meta} metadata records.")


def geneval_records_problem(records: list, reward: str, vocabulary: Vocabulary | None = None,
                            hint: str = "") -> tuple[int, str] | None:
    """(index, reason) of the first record that is not a valid GenEval-schema record for `reward` (the rules of
    `udm-grpo data check --task geneval`, with the classes and colours of `vocabulary`, default GenEval's),
    None when all are. The reason is one sentence without a location (the caller prefixes one); a record
    holding only a prompt is told that `reward` needs metadata records (`hint` says where to get them)."""
    from ..data.check import GENEVAL_VOCABULARY, geneval_record_error

    for i, r in enumerate(records):
        if r is None:
            return i, f"{reward} needs a GenEval-schema metadata record for every prompt; this prompt has none."
        if isinstance(r, dict) and set(r) == {"prompt"}:
            where = f" ({hint})" if hint else ""
            return i, f"{reward} needs GenEval-schema metadata records{where}, not plain prompts."
        if error := geneval_record_error(r, "@", vocabulary or GENEVAL_VOCABULARY):  # "@: reason"
            return i, error.removeprefix("@: ")
    return None


def require_geneval_records(records: list, reward: str, vocabulary: Vocabulary | None = None,
                            hint: str = "") -> list[dict]:
    """`records` when `geneval_records_problem` finds none; UserError "metadata[i]: reason" otherwise."""
    if bad := geneval_records_problem(records, reward, vocabulary, hint):
        raise UserError(f"metadata[{bad[0]}]: {bad[1]}")
    return records


class GenEvalRecordsReward:
    """Base of the rewards that score GenEval-schema metadata: `check_records` (the `check_prompt_source` and
    service hook) and `records` (inside a call) apply `geneval_records_problem` with the class's `reward_name`,
    `records_hint` and `vocabulary()` (None: GenEval's)."""

    reward_name: str = "this reward"
    records_hint: str = ""

    @staticmethod
    def vocabulary() -> Vocabulary | None:
        return None

    @classmethod
    def check_records(cls, records: list) -> tuple[int, str] | None:
        """(index, reason) of the first record this reward cannot score, or None."""
        return geneval_records_problem(records, cls.reward_name, cls.vocabulary(), cls.records_hint)

    @classmethod
    def records(cls, metadata: list | None, n: int) -> list[dict]:
        """The `n` metadata records of a call, validated (UserError "metadata[i]: reason")."""
        return require_geneval_records(list(metadata) if metadata is not None else [None] * n, cls.reward_name,
                                       cls.vocabulary(), cls.records_hint)
