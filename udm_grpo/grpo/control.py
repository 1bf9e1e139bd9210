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


def prepare_run_dir(acc, run_dir: Path, resume_folder: Path | None, force: bool) -> None:
    """Refuse a run folder that already holds files unless resuming one of its own checkpoints, or
    `force` (which empties it first). Every process sees the same folder, so all decide alike."""
    same = resume_folder is not None and resume_folder.resolve().parent.parent == run_dir.resolve()
    if run_dir.exists() and any(run_dir.iterdir()) and not same:
        if not force:
            raise UserError(f"run folder {run_dir} already holds a run; continue it with --resume latest, replace "
                            "it with --force, or choose another folder with -o.")
        acc.wait_for_everyone()
        if acc.is_main_process:
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
