"""The run folder of a training start: checked before anything loads (`check_run_dir`: writable, not a file,
not a source of the run, not in use, not holding another run unless --force or --resume), locked while the run
works in it, and left as found when the start fails before its first step (`RunFolder`)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from ..outputs import FolderLock, check_not_in_use, check_output, empty_folder, holds_files


def check_run_dir(run_dir: Path, resume_folder: Path | None, force: bool, sources: Iterable = ()) -> bool:
    """Read-only checks of a run folder before anything is loaded: writable, not a file, not a source of the
    run (`sources`), not in use by another process. Returns whether it must be emptied first (it holds a run,
    `force` is given and the run does not resume one of its own checkpoints); UserError when it holds a run
    and neither is given."""
    check_output(run_dir, "folder", flag="run folder", sources=sources, exists_ok=True)
    check_not_in_use(run_dir)
    same = resume_folder is not None and resume_folder.resolve().parent.parent == run_dir.resolve()
    if not holds_files(run_dir) or same:
        return False
    if not force:
        raise UserError(f"run folder {run_dir} already holds a run; continue it with --resume latest, replace it "
                        "with --force, or choose another folder with -o.")
    return True


class RunFolder:
    """The run folder for one start of the trainer, as a context manager (every process enters it).

    The main process locks the folder (`FolderLock`), runs `check_run_dir` and empties the folder when it
    must (keeping the lock). When the block fails before `started()` is called, the folder is left as it was
    found: what the start created is removed (the whole folder if it did not exist) and a config.yaml it
    replaced is put back. The lock is released in every case."""

    def __init__(self, acc, run_dir: Path, resume_folder: Path | None, force: bool, sources: Iterable = ()):
        self.acc, self.run_dir, self.resume_folder, self.force = acc, Path(run_dir), resume_folder, force
        self.sources, self.lock, self.is_started = tuple(sources), None, False
        self._before: set[str] = set()
        self._config: bytes | None = None

    def __enter__(self) -> RunFolder:
        clear = check_run_dir(self.run_dir, self.resume_folder, self.force, self.sources)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.lock = FolderLock(self.run_dir).acquire()
            if clear:
                empty_folder(self.run_dir)
            self._before = {p.name for p in self.run_dir.iterdir()}
            config = self.run_dir / "config.yaml"
            self._config = config.read_bytes() if config.is_file() else None
        self.acc.wait_for_everyone()
        return self

    def started(self) -> None:
        """The start succeeded (its first step is done): from now on a failure keeps what the run wrote."""
        self.is_started = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.lock is None:
            return
        failed = exc_type is not None and not self.is_started
        try:
            if failed:
                self._restore()
        finally:
            self.lock.release()
            if failed and self.lock.created:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def _restore(self) -> None:
        for item in self.run_dir.iterdir():
            if item.name not in self._before:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        if self._config is not None:
            (self.run_dir / "config.yaml").write_bytes(self._config)
