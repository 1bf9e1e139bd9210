"""Training checkpoints: written atomically, resumed exactly.

Layout of `<run>/checkpoints/step-<N>/`:

    transformer/          the policy in the official layout (or adapter/ with peft's files for LoRA)
    optimizer.safetensors optimizer state tensors, keys "state.<param index>.<name>"
    trainer_state.json    step, data cursor, LR-schedule state, optimizer scalars and param groups,
                          counters, the reference model's fingerprint
    rng.rank<r>.safetensors  each process's generator state and torch's global RNG state

A checkpoint is first written to a temporary sibling folder and renamed into place; `latest` is
then replaced atomically. A process killed during a save leaves the previous checkpoint and
`latest` untouched (the stray temporary folder is removed by the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-able scalars."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str, checkpoints: Path) -> Path:
    """'latest' -> the newest complete checkpoint; otherwise a checkpoint folder path."""
    if spec == "latest":
        pointer = checkpoints / "latest"
        if pointer.is_file() and (checkpoints / pointer.read_text().strip()).is_dir():
            return checkpoints / pointer.read_text().strip()
        found = list_checkpoints(checkpoints)
        if not found:
            raise UserError(f"--resume latest: no checkpoint in {checkpoints}.")
        return found[-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {spec}: not a checkpoint folder (no trainer_state.json).")
    return path


def begin_checkpoint(checkpoints: Path, step: int) -> Path:
    """Create the temporary folder of checkpoint `step` (removing stray ones of killed saves)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    for stray in checkpoints.glob("*.tmp"):
        shutil.rmtree(stray, ignore_errors=True)
    tmp = checkpoints / f"step-{step:06d}.tmp"
    tmp.mkdir()
    return tmp


def write_rng(tmp: Path, rank: int, rng: dict[str, torch.Tensor]) -> None:
    """Each process writes its own RNG states (generators differ per rank)."""
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng.rank{rank}.safetensors"))


def commit_checkpoint(tmp: Path, write_model, optimizer_state: dict, trainer_state: dict,
                      keep: int | None = None) -> Path:
    """Write the model, optimizer and state into `tmp`, then rename it into place and move `latest`."""
    write_model(tmp)
    tensors, meta = optimizer_to_flat(optimizer_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "optimizer": meta}, indent=1))
    _fsync_tree(tmp)
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, final.parent / "latest")
    if keep:
        for old in list_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, rank: int = 0) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(optimizer state_dict, trainer state, this rank's rng tensors)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    optimizer = optimizer_from_flat(load_file(str(folder / "optimizer.safetensors")), state.pop("optimizer"))
    rng_file = folder / f"rng.rank{rank}.safetensors"
    if not rng_file.is_file():
        raise UserError(f"{folder}: no RNG state for process {rank}; resume with the same number of processes.")
    return optimizer, state, load_file(str(rng_file))


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
