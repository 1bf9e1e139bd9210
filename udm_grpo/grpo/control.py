"""Run control shared by all processes: collective decisions, the run folder, and Ctrl-C."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import torch

from ..errors import UserError


def all_processes(acc, flag: bool) -> bool:
    """True when `flag` holds on every process (one all-reduce), so that all take the same branch and
    none waits alone in a collective."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=acc.device)
    return acc.reduce(t, "sum").item() == acc.num_processes


def check_run_dir(run_dir: Path, resume_folder: Path | None, force: bool) -> bool:
    """Whether `run_dir` must be emptied first (it holds files, `force` is given and the run does not
    resume one of its own checkpoints); UserError when it holds files and neither is given."""
    same = resume_folder is not None and resume_folder.resolve().parent.parent == run_dir.resolve()
    if not (run_dir.exists() and any(run_dir.iterdir())) or same:
        return False
    if not force:
        raise UserError(f"run folder {run_dir} already holds a run; continue it with --resume latest, replace it "
                        "with --force, or choose another folder with -o.")
    return True


def prepare_run_dir(acc, run_dir: Path, resume_folder: Path | None, force: bool) -> None:
    """`check_run_dir`, then the main process empties the folder when needed. Every process sees the same
    folder, so all decide alike."""
    clear = check_run_dir(run_dir, resume_folder, force)
    acc.wait_for_everyone()
    if clear and acc.is_main_process:
        shutil.rmtree(run_dir)
    acc.wait_for_everyone()


class StopOnSigint:
    """The first Ctrl-C (SIGINT) only sets `requested`; a second one interrupts at once. Inactive
    outside the main thread."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nudm-grpo: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
