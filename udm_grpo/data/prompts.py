"""Prompt sets and a resumable, seeded prompt stream.

A prompt set is a list of records `{"prompt": str, ...}` (GenEval-schema records carry tag /
include / exclude for rule-based rewards). Sources: `shapes:train` / `shapes:test` (the tiny world),
a `.jsonl` file (one JSON object with a "prompt" key per line) or a `.txt` file (one prompt per line).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError


def load_prompts(source: str) -> list[dict]:
    if source.startswith("shapes:"):
        from .shapes import generate_records

        split = source.split(":", 1)[1]
        if split not in ("train", "test"):
            raise UserError(f"prompt source '{source}': the tiny world's splits are 'shapes:train' and 'shapes:test'.")
        records = generate_records(split, None, 0)
        return balance_tags(records) if split == "train" else records
    path = Path(source)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist.")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise UserError(f"{path}:{n}: each line must be a JSON object with a string 'prompt'.")
            records.append(rec)
    else:
        records = [{"prompt": ln.strip()} for ln in path.read_text().splitlines() if ln.strip()]
    if not records:
        raise UserError(f"prompt file {path} holds no prompts.")
    return records


def prompt_location(source: str, index: int) -> str:
    """'FILE:LINE' of record `index` of a .txt/.jsonl prompt source (records are its non-blank lines), or
    'SOURCE prompt N' for a built-in set."""
    path = Path(source)
    if not path.is_file():
        return f"{source} prompt {index + 1}"
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    return f"{path}:{lines[index]}" if index < len(lines) else f"{path} prompt {index + 1}"


def balance_tags(records: list[dict], size: int | None = None) -> list[dict]:
    """Exactly `size` records per tag (default: the largest tag's count), cycling through each tag's
    records in order: small tags repeat prompts, large tags keep their first `size`."""
    by_tag: dict[str, list[dict]] = {}
    for r in records:
        by_tag.setdefault(r.get("tag", ""), []).append(r)
    size = size or max(len(group) for group in by_tag.values())
    return [group[i % len(group)] for group in by_tag.values() for i in range(size)]


class PromptStream:
    """Endless stream of prompt records, reshuffled every epoch from (seed, epoch).

    `state()` / `load_state()` give the data cursor (epoch, position) for exact resume.
    """

    def __init__(self, records: list[dict], seed: int, shuffle: bool = True):
        self.records, self.seed, self.shuffle = records, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.records))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.position == len(self.records):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
