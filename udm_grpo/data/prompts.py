"""Prompt sets and a resumable, seeded prompt stream.

A prompt set is a list of records `{"prompt": str, ...}` (GenEval-schema records carry tag /
include / exclude for rule-based rewards). Sources: `shapes:train` / `shapes:test` (the tiny world),
a `.jsonl` file (one JSON object with a "prompt" key per line) or a `.txt` file (one prompt per line).
Files are read one line at a time; the line number of every record is kept (for the last few files
read) so that `prompt_location` names FILE:LINE without reading the file again. `shard` splits a list
over processes.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import UserError
from ..textfiles import check_input_file, iter_lines, parse_json

T = TypeVar("T")


def parse_jsonl_line(text: str, where: str) -> dict:
    """One JSON object with a string 'prompt'; UserError naming `where` (FILE:LINE) otherwise."""
    rec = parse_json(text, where)
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        raise UserError(f"{where}: each line must be a JSON object with a string 'prompt'.")
    return rec


def load_prompts(source: str) -> list[dict]:
    """The records of a prompt source (see the module docstring); UserError naming FILE:LINE of a bad line."""
    if source.startswith("shapes:"):
        from .shapes import generate_records

        split = source.split(":", 1)[1]
        if split not in ("train", "test"):
            raise UserError(f"prompt source '{source}': the tiny world's splits are 'shapes:train' and 'shapes:test'.")
        records = generate_records(split, None, 0)
        return balance_tags(records) if split == "train" else records
    path = check_input_file(source, "prompt file")
    key, jsonl = _file_key(path), path.suffix == ".jsonl"
    records: list[dict] = []
    lines = array("L")
    for n, text in iter_lines(path, "prompt file"):
        records.append(parse_jsonl_line(text, f"{path}:{n}") if jsonl else {"prompt": text})
        lines.append(n)
    if not records:
        raise UserError(f"prompt file {path} holds no prompts.")
    _remember(key, lines)
    return records


# record line numbers of recently loaded files, keyed by (resolved path, mtime_ns, size)
_LINES: OrderedDict[tuple[str, int, int], array] = OrderedDict()
_LINES_KEPT = 8


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _remember(key: tuple[str, int, int], lines: array) -> None:
    _LINES[key] = lines
    _LINES.move_to_end(key)
    while len(_LINES) > _LINES_KEPT:
        _LINES.popitem(last=False)


def record_lines(path: Path) -> Sequence[int]:
    """Line numbers of a .txt/.jsonl file's records (its non-blank lines): those `load_prompts` recorded
    while reading the unchanged file, else one streaming pass."""
    key = _file_key(path)
    if key not in _LINES:
        _remember(key, array("L", (n for n, _ in iter_lines(path))))
    return _LINES[key]


def prompt_location(source: str, index: int) -> str:
    """'FILE:LINE' of record `index` of a .txt/.jsonl prompt source (records are its non-blank lines), or
    'SOURCE prompt N' for a built-in set."""
    path = Path(source)
    if not path.is_file():
        return f"{source} prompt {index + 1}"
    lines = record_lines(path)
    return f"{path}:{lines[index]}" if 0 <= index < len(lines) else f"{path} prompt {index + 1}"


def shard(items: Sequence[T], rank: int, world: int) -> Sequence[T]:
    """Process `rank`'s share of `items` among `world` processes: items[rank::world]. Interleaved, so the
    shares differ in size by at most one and together hold every item exactly once."""
    _check_rank(rank, world)
    return items[rank::world]


def shard_range(n: int, rank: int, world: int) -> range:
    """The indices `shard(range(n), rank, world)` takes: rank, rank + world, ... below n."""
    _check_rank(rank, world)
    return range(rank, n, world)


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")


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

    `next(n, weight)` instead draws n distinct records with probabilities proportional to `weight(record)`
    (a curriculum), from (seed, number of weighted draws so far). `state()` / `load_state()` give the data
    cursor (epoch, position, weighted draws) for exact resume.
    """

    def __init__(self, records: list[dict], seed: int, shuffle: bool = True):
        self.records, self.seed, self.shuffle = records, seed, shuffle
        self.epoch, self.position, self.draws = 0, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.records))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next(self, n: int, weight=None) -> list[dict]:
        if weight is not None:
            return self._weighted(n, weight)
        out = []
        while len(out) < n:
            if self.position == len(self.records):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    def _weighted(self, n: int, weight) -> list[dict]:
        w = np.array([weight(r) for r in self.records], dtype=np.float64)
        rng = np.random.default_rng([self.seed, 1, self.draws])
        self.draws += 1
        pick = rng.choice(len(self.records), size=n, replace=n > len(self.records), p=w / w.sum())
        return [self.records[i] for i in pick]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "draws": self.draws}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.draws = int(state.get("draws", 0))
        self._order = self._permutation()
