"""Per-prompt statistics over the last `window` groups of each prompt, for two uses:

- Flow-GRPO's per-prompt baselines (`reward.per_prompt_stats`): a group's advantages are centred (and
  scaled) on its scores pooled with the prompt's scores at earlier steps, so a group whose G images all
  pass after earlier failures still gets a positive advantage (`advantages.group_advantages(history=...)`);
- the curriculum (`data.curriculum`): a prompt whose remembered images all passed or all failed (pass rate
  0 or 1) is drawn with weight `floor`, every other prompt (and one never drawn) with weight 1.

"Pass" is the per-image value the reward names in its attribute `pass_value` (default `strict`: GenEval;
ShapeEval's `exact` when it trains exact counts) when it reports one, else the score: a pass rate of 0 or 1
then means that every remembered score was equal.
"""

from __future__ import annotations

from collections import deque

import torch


class PromptStats:
    """Scores and pass values of each prompt's last `window` groups, keyed by prompt text."""

    def __init__(self, window: int):
        self.window = window
        self.scores: dict[str, deque[list[float]]] = {}
        self.passes: dict[str, deque[list[float]]] = {}

    def history(self, prompts: list[str]) -> list[list[float]]:
        """The earlier scores of each prompt (one flat list per prompt, [] if never seen)."""
        return [[s for group in self.scores.get(p, ()) for s in group] for p in prompts]

    def update(self, prompts: list[str], scores: torch.Tensor, passes: torch.Tensor | None = None) -> None:
        """Remember one step's groups: scores / passes Float[P, G] for `prompts` (one per group)."""
        passes = scores if passes is None else passes
        for p, row, ok in zip(prompts, scores.tolist(), passes.tolist(), strict=True):
            self.scores.setdefault(p, deque(maxlen=self.window)).append(row)
            self.passes.setdefault(p, deque(maxlen=self.window)).append(ok)

    def decided(self, prompt: str) -> bool:
        """True when the prompt was seen and its remembered pass values are all equal (pass rate 0 or 1)."""
        values = [v for group in self.passes.get(prompt, ()) for v in group]
        return bool(values) and max(values) == min(values)

    def weight(self, record: dict, floor: float) -> float:
        """Curriculum weight of a prompt record."""
        return floor if self.decided(record["prompt"]) else 1.0

    def state(self) -> dict:
        return {"window": self.window, "scores": {p: list(d) for p, d in self.scores.items()},
                "passes": {p: list(d) for p, d in self.passes.items()}}

    def load_state(self, state: dict) -> None:
        self.scores = {p: deque(v, maxlen=self.window) for p, v in state.get("scores", {}).items()}
        self.passes = {p: deque(v, maxlen=self.window) for p, v in state.get("passes", {}).items()}
