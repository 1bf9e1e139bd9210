"""The one gate for what a command writes: checked before any work, written whole or not at all, never over
its own source, and never by two processes at once.

- `check_output` runs before any work. It refuses, in one sentence naming the flag and path: an output that
  is, contains or lies inside one of the command's sources (whatever --force says); a file where a folder is
  wanted or the reverse; a path under a file; a place where nothing can be created (tried by creating and
  removing a probe file in the nearest existing folder); and an existing output unless `force` (callers that
  resume or merge pass `exists_ok`).
- `atomic_file` / `atomic_folder` write to a hidden temporary sibling that is renamed into place when the
  write succeeds and removed when it fails, so a failed write leaves nothing half-written behind.
- `FolderLock` marks a folder as in use by this process (`flock` on FOLDER/.udm-grpo.lock, which holds the
  process id). The kernel drops the lock when the process ends, however it ends (kill -9 too), so a lock file
  left behind never blocks a later run. Where `fcntl` is missing (Windows) folders are not locked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".udm-grpo.lock"


def _relation(out: Path, source: Path) -> str | None:
    o, s = out.resolve(), source.resolve()
    if o == s:
        return "is"
    if s.is_relative_to(o):
        return "contains"
    if o.is_relative_to(s):
        return "lies inside"
    return None


def holds_files(folder: Path) -> bool:
    """Whether `folder` exists and holds anything but a lock file."""
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def empty_folder(folder: Path) -> None:
    """Remove everything in `folder` but a lock file."""
    for item in folder.iterdir():
        if item.name != LOCK_NAME:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def check_output(path: str | Path, kind: str = "file", force: bool = False, flag: str = "-o",
                 sources: Iterable[str | Path | None] = (), exists_ok: bool = False) -> Path:
    """`path` as a Path when the command may write it (see the module docstring); UserError otherwise.
    `kind` is "file" or "folder"; `sources` are what the command reads (None entries are skipped)."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    path = Path(path)
    what = f"{flag} {path}"
    if not str(path).strip():
        raise UserError(f"{flag} must name a {kind}.")
    for source in sources:
        if source is not None and Path(source).exists() and (rel := _relation(path, Path(source))):
            read = f"is what this command reads ({source})" if rel == "is" else \
                f"{rel} {source}, which this command reads"
            raise UserError(f"{what} {read}; choose an output outside it.")
    if path.exists() or path.is_symlink():
        if kind == "folder" and not path.is_dir():
            raise UserError(f"{what} is a file, not a folder; choose a folder.")
        if kind == "file" and path.is_dir():
            raise UserError(f"{what} is a folder; name a file.")
        if kind == "file" and not path.is_file():
            raise UserError(f"{what} is not a regular file (a device, pipe or socket); name a file.")
        taken = path.is_file() or holds_files(path)
        if taken and not (force or exists_ok):
            held = "already exists" if kind == "file" else "already holds files"
            raise UserError(f"{what} {held}; pass --force to replace it, or choose another {kind}.")
    parent = path if kind == "folder" and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} lies under {parent}, which is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".udm-grpo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} cannot be written: nothing can be created in {parent} "
                        f"({e.strerror or type(e).__name__}).") from None
    return path


def _write_error(path: Path, e: OSError) -> UserError:
    return UserError(f"{path} could not be written ({e.strerror or type(e).__name__}); nothing was left behind.")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed onto `path` when the block succeeds, removed otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) written to `path` through `atomic_file`."""
    return write_lines_atomic(path, [text], end="")


def write_lines_atomic(path: str | Path, lines: Iterable[str], end: str = "\n") -> Path:
    """Each of `lines` followed by `end`, streamed (UTF-8, '\n' newlines) to `path` through `atomic_file`."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + end)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields a new empty temporary folder beside `path`; when the block succeeds it replaces `path` (an
    existing folder is removed only then), otherwise it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise _write_error(path, e) from None
    old = tmp.with_name(tmp.name[: -len(".partial")] + ".old")
    try:
        yield tmp
        if path.exists():
            path.replace(old)
        tmp.replace(path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG at `path`, through `atomic_file`."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FolderLock:
    """Exclusive use of `folder` by this process; re-entrant within it. `acquire` creates the folder when
    missing (`created` says so) and raises UserError naming the process that holds it."""

    _held: dict[str, FolderLock] = {}

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.created, self._fd, self._depth, self._outer = False, None, 0, None

    @property
    def file(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> FolderLock:
        key = str(self.folder.resolve())
        held = FolderLock._held.get(key)
        if held is not None:  # this process holds it already: count this use on the holder
            held._depth += 1
            self._outer, self.created = held, held.created
            return self
        if fcntl is not None:
            try:
                self.created = not self.folder.exists()
                self.folder.mkdir(parents=True, exist_ok=True)
                self._fd = self._lock()
            except OSError as e:
                raise UserError(f"{self.folder} cannot be used ({e.strerror or type(e).__name__}).") from None
        self._depth = 1
        FolderLock._held[key] = self
        return self

    def _lock(self) -> int:
        while True:  # the holder may remove the file between our open and our lock: then lock the new one
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _in_use(self.folder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def release(self) -> None:
        if self._outer is not None:
            self._outer, outer = None, self._outer
            return outer.release()
        self._depth -= 1
        if self._depth > 0:
            return
        FolderLock._held.pop(str(self.folder.resolve()), None)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.file.unlink()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def owner(folder: Path) -> int | None:
    """The process id a lock file in `folder` names, if any."""
    try:
        return int((Path(folder) / LOCK_NAME).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _in_use(folder: Path) -> UserError:
    return UserError(f"run folder {folder} is in use by process {owner(folder) or '?'}; wait for it to finish or "
                     "stop it first.")


def check_not_in_use(folder: str | Path) -> None:
    """UserError when another process holds `folder`'s lock (read-only: nothing is created)."""
    folder = Path(folder)
    if fcntl is None or not (folder / LOCK_NAME).is_file() or str(folder.resolve()) in FolderLock._held:
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder) from None
    finally:
        os.close(fd)
