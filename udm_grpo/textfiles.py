"""The one reader of text files a user names (prompts, metadata, configs, tokens, model and checkpoint JSON).

Every refusal is one sentence naming the file, and the line where the file is not UTF-8:

- a path that does not exist, a folder, or something other than a regular file (a device such as /dev/null,
  a pipe, a socket) is named as such, never as "does not exist";
- bytes that are not UTF-8 give `FILE:LINE: not UTF-8 text.`; a UTF-8 byte-order mark is dropped;
- `read_json` adds `FILE: not valid JSON (reason at line N).`, `iter_jsonl` `FILE:LINE: not valid JSON (reason).`

`error` chooses the UserError subclass raised (ConfigError for config files, CheckpointError for model
folders), so callers keep their error types.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


def check_input_file(path: str | Path, what: str = "file", error: type[UserError] = UserError) -> Path:
    """`path` as a Path when it is a readable regular file; `error` naming it (as `what`) otherwise."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist.")
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file.")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file (a device, pipe or socket); name a file.")
    return path


def _decode(raw: bytes, path: Path, first_line: int = 1, error: type[UserError] = UserError) -> str:
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise error(f"{path}:{line}: not UTF-8 text.") from None


def read_text(path: str | Path, what: str = "file", error: type[UserError] = UserError) -> str:
    """The whole text of a UTF-8 file (see the module docstring for the refusals)."""
    path = check_input_file(path, what, error)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or type(e).__name__}).") from None
    return _decode(raw, path, error=error)


def iter_lines(path: str | Path, what: str = "file", error: type[UserError] = UserError) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line, read one line at a time (lines end at '\\n'; a
    trailing '\\r' is stripped with the other whitespace)."""
    path = check_input_file(path, what, error)
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if text := _decode(raw, path, n, error).strip():
                yield n, text


def parse_json(text: str, where: str, error: type[UserError] = UserError) -> Any:
    """`json.loads(text)`; `error` "WHERE: not valid JSON (reason)." otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno}" if e.lineno > 1 else ""
        raise error(f"{where}: not valid JSON ({e.msg}{at}).") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply).") from None


def read_json(path: str | Path, what: str = "file", error: type[UserError] = UserError) -> Any:
    """The parsed JSON of a UTF-8 file."""
    return parse_json(read_text(path, what, error), str(path), error)


def iter_jsonl(path: str | Path, what: str = "file", error: type[UserError] = UserError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) of each non-blank line of a JSON-lines file."""
    for n, text in iter_lines(path, what, error):
        yield n, parse_json(text, f"{path}:{n}", error)
