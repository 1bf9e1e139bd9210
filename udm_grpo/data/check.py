"""Validation of training prompt files (`udm-grpo data check`): per-task schema, duplicates, overlap with
an evaluation set, counts per tag and prompt lengths.

Tasks and what a record must be:

- geneval: a GenEval metadata record (.jsonl): string prompt, a tag of `TAGS`, a non-empty include list
  of {class of the 80 COCO classes, count int >= 1, optional color of the 10, optional position
  [relation, index of an earlier clause]}, optional exclude list of such clauses (without position)
- pickscore: a non-blank prompt (.txt, one per line; or .jsonl records with a string "prompt")
- ocr: as pickscore, and the prompt quotes a target (`rewards.ocr.ocr_target`)

The rewards that score GenEval-schema records use the same rules (`geneval_record_error`) with their own
classes and colours (`Vocabulary`): GenEval's 80 classes and 10 colours, or the tiny world's for ShapeEval.

Prompts are compared (duplicates, overlap) by `prompt_key`: GenEval's phrasing of the record when the
prompt is one of the GenEval grammar (so "two sheep" meets "two sheeps"), else its lower-cased text
with single spaces. Schema errors are fatal (UserError: the first, and how many more); duplicates and
overlap are warnings.
"""

from __future__ import annotations

import json
import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from ..textfiles import check_input_file, iter_lines
from .geneval_prompts import COCO_CLASSES, COLORS, TAGS, canonical_prompt, normalise_prompt
from .prompts import load_prompts, prompt_location

TASKS: tuple[str, ...] = ("geneval", "pickscore", "ocr")
SHOWN = 3  # example locations listed per warning


def prompt_key(text: str) -> str:
    """What two prompts share when they ask for the same image (see the module docstring)."""
    return canonical_prompt(text) or normalise_prompt(text)


class Vocabulary(NamedTuple):
    """What a GenEval-schema record may ask for: `classes` (named in errors as `classes_text`) and `colors`."""

    classes_text: str
    classes: frozenset[str]
    colors: tuple[str, ...]


GENEVAL_VOCABULARY = Vocabulary("the 80 COCO classes", frozenset(COCO_CLASSES), COLORS)


@lru_cache(maxsize=1)
def world_vocabulary() -> Vocabulary:
    """The tiny world's vocabulary (`data.shapes.CLASSES`, `data.shapes.COLORS`), for ShapeEval."""
    from . import shapes

    return Vocabulary(f"the tiny world's classes ({', '.join(shapes.CLASSES)})", frozenset(shapes.CLASSES),
                      tuple(shapes.COLORS))


def _geneval_error(rec: dict, where: str, vocabulary: Vocabulary = GENEVAL_VOCABULARY) -> str | None:
    from .shapes import _check_record  # the GenEval schema's structure (keys, types, position indices)

    try:
        _check_record(rec, where)
    except UserError as e:
        return str(e)
    if rec["tag"] not in TAGS:
        return f"{where}: tag {rec['tag']!r} is not one of GenEval's tags ({', '.join(TAGS)})."
    if not rec["include"]:
        return f"{where}: 'include' is empty; a record asks for at least one object."
    for part in ("include", "exclude"):
        for j, c in enumerate(rec.get(part, [])):
            if c["class"] not in vocabulary.classes:
                return f"{where}: {part}[{j}] has class {c['class']!r}, which is not one of {vocabulary.classes_text}."
            if "color" in c and c["color"] not in vocabulary.colors:
                return (f"{where}: {part}[{j}] has colour {c['color']!r}, which is not one of "
                        f"{', '.join(vocabulary.colors)}.")
    return None


def geneval_record_error(rec: object, where: str, vocabulary: Vocabulary = GENEVAL_VOCABULARY) -> str | None:
    """The first problem of a GenEval-schema record (`data check --task geneval`'s rules, with the classes
    and colours of `vocabulary`), as one sentence naming `where`; None when it is valid."""
    return _prompt_error(rec, where) or _geneval_error(rec, where, vocabulary)


def _prompt_error(rec: object, where: str) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        return f"{where}: each record must be a JSON object with a string 'prompt'."
    if not rec["prompt"].strip():
        return f"{where}: the prompt is blank."
    return None


def record_error(rec: object, task: str, where: str) -> str | None:
    """The first problem of one record for `task`, as one sentence naming `where`; None when it is valid."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    if task == "geneval":
        return geneval_record_error(rec, where)
    if error := _prompt_error(rec, where):
        return error
    if task == "ocr":
        from ..rewards.ocr import ocr_target

        if ocr_target(rec["prompt"]) is None:
            return (f'{where}: the prompt {rec["prompt"]!r} quotes no text for the OCR reward to find '
                    '(e.g. a sign that says "open").')
    return None


def _with_more(first: str, more: int) -> str:
    if not more:
        return first
    return f"{first.rstrip('.')} (and {more} more line{'s' if more > 1 else ''} with errors)."


def validate_records(records: list, task: str, source: str) -> None:
    """UserError naming the location (`prompt_location(source, i)`) of the first record `record_error`
    refuses, and how many others it refuses."""
    bad = [i for i, r in enumerate(records) if record_error(r, task, "") is not None]
    if bad:
        first = record_error(records[bad[0]], task, prompt_location(source, bad[0]))
        raise UserError(_with_more(first, len(bad) - 1))


@dataclass
class Report:
    """What `check_file` found in a schema-valid file."""

    path: Path
    task: str
    prompts: int = 0
    tags: Counter = field(default_factory=Counter)
    words: array = field(default_factory=lambda: array("L"))
    chars: array = field(default_factory=lambda: array("L"))
    duplicates: int = 0
    duplicate_examples: list[tuple[int, int]] = field(default_factory=list)  # (line, line it repeats)
    eval_path: Path | None = None
    overlap: int = 0
    overlap_examples: list[tuple[int, str]] = field(default_factory=list)  # (line, evaluation location)

    @property
    def warnings(self) -> int:
        return int(self.duplicates > 0) + int(self.overlap > 0)


def _eval_keys(eval_path: Path) -> dict[str, int]:
    """prompt_key -> index of its first record in an evaluation file (.jsonl or .txt)."""
    keys: dict[str, int] = {}
    for i, r in enumerate(load_prompts(str(eval_path))):
        keys.setdefault(prompt_key(r["prompt"]), i)
    return keys


def check_file(path: str | Path, task: str, eval_path: str | Path | None = None) -> Report:
    """Stream a prompt file once; UserError for a missing file, a wrong suffix or schema errors."""
    if task not in TASKS:
        raise UserError(f"--task {task}: the tasks are {', '.join(TASKS)}.")
    path = check_input_file(path, "prompt file")
    jsonl = path.suffix == ".jsonl"
    if task == "geneval" and not jsonl:
        raise UserError(f"{path}: GenEval prompts are metadata records, one JSON object per line in a .jsonl file.")
    report = Report(path, task, eval_path=Path(eval_path) if eval_path else None)
    eval_keys = _eval_keys(report.eval_path) if report.eval_path else {}
    seen: dict[str, int] = {}
    first_error, errors = None, 0
    for n, text in iter_lines(path):
        where = f"{path}:{n}"
        try:
            rec = json.loads(text) if jsonl else {"prompt": text}
        except json.JSONDecodeError as e:
            rec, problem = None, f"{where}: not valid JSON ({e.msg})."
        else:
            problem = record_error(rec, task, where)
        if problem:
            first_error, errors = first_error or problem, errors + 1
            continue
        prompt = rec["prompt"].strip()
        report.prompts += 1
        report.words.append(len(prompt.split()))
        report.chars.append(len(prompt))
        if task == "geneval":
            report.tags[rec["tag"]] += 1
        key = prompt_key(prompt)
        if key in seen:
            report.duplicates += 1
            if len(report.duplicate_examples) < SHOWN:
                report.duplicate_examples.append((n, seen[key]))
        else:
            seen[key] = n
        if key in eval_keys:
            report.overlap += 1
            if len(report.overlap_examples) < SHOWN:
                report.overlap_examples.append((n, prompt_location(str(report.eval_path), eval_keys[key])))
    if errors:
        raise UserError(_with_more(first_error, errors - 1))
    if not report.prompts:
        raise UserError(f"prompt file {path} holds no prompts.")
    return report


def _stats(values: array, median: bool = True) -> str:
    parts = [f"min {min(values)}"]
    if median:
        parts.append(f"median {statistics.median(values):g}")
    parts += [f"mean {sum(values) / len(values):.1f}", f"max {max(values)}"]
    return ", ".join(parts)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def format_report(r: Report) -> str:
    """A few readable lines: counts, tags, lengths, duplicates, overlap, warnings."""
    lines = [f"{r.path}: {r.prompts} prompts, valid for the {r.task} task"]
    if r.task == "geneval":
        lines.append("  tags: " + ", ".join(f"{t} {r.tags[t]} ({100 * r.tags[t] / r.prompts:.1f}%)" for t in TAGS))
    lines.append(f"  words per prompt: {_stats(r.words)}; characters: {_stats(r.chars, median=False)}")
    if r.duplicates:
        shown = ", ".join(f"{r.path}:{n} repeats line {m}" for n, m in r.duplicate_examples)
        more = ", ..." if r.duplicates > SHOWN else ""
        lines.append(f"  duplicates: {_count(r.duplicates, 'line repeats', 'lines repeat')} an earlier prompt "
                     f"({shown}{more})")
    else:
        lines.append("  duplicates: none")
    if r.eval_path is None:
        lines.append("  overlap with an evaluation set: not checked (pass --eval FILE)")
    elif r.overlap:
        shown = ", ".join(f"{r.path}:{n} = {loc}" for n, loc in r.overlap_examples)
        more = ", ..." if r.overlap > SHOWN else ""
        lines.append(f"  overlap with {r.eval_path}: {_count(r.overlap, 'prompt is an', 'prompts are')} evaluation "
                     f"prompt{'s' if r.overlap > 1 else ''} ({shown}{more})")
    else:
        lines.append(f"  overlap with {r.eval_path}: none")
    lines.append(_count(r.warnings, "warning", "warnings") if r.warnings else "no warnings")
    return "\n".join(lines)
