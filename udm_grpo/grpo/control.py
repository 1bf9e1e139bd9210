"""Run control shared by all processes: collective decisions (`all_processes`) and Ctrl-C (`StopOnSigint`)."""

from __future__ import annotations

import signal
import threading

import torch


def all_processes(acc, flag: bool) -> bool:
    """True when `flag` holds on every process (one all-reduce), so that all take the same branch and
    none waits alone in a collective."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=acc.device)
    return acc.reduce(t, "sum").item() == acc.num_processes


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
