"""Training checkpoints: written atomically, resumed exactly.

Layout of `<run>/checkpoints/step-<N>/`:

    transformer/          the policy's float32 master weights in the official layout (or, for LoRA,
                          adapter/: PEFT's adapter_config.json + adapter_model.safetensors, `models.lora`)
    optimizer.safetensors optimizer state tensors, keys "state.<param index>.<name>"
    trainer_state.json    step, prompt-stream cursor, skip counters, number of processes, and the
                          optimizer's scalars and param groups (its lr is a function of the step)
    rng.rank<r>.safetensors  each process's generator state and torch's global RNG state

A checkpoint is first written to a temporary sibling folder and renamed into place; `latest` is
then replaced atomically. A process killed during a save leaves the previous checkpoint and
`latest` untouched (the stray temporary folder is removed by the next save). Retention never
deletes the checkpoint just written, so `latest` always names an existing folder. Files are
written readable by the group and others as the umask allows (safetensors alone writes 0600).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, UserError
from ..models.io import share_files
from ..textfiles import read_text

STEP_DIR = re.compile(r"^step-(\d+)$")
REFERENCE_DIR = re.compile(r"^checkpoint-(\d+)$")  # the reference trainer's <out>/checkpoints/checkpoint-<step>


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
    """Complete checkpoint folders `step-N` of `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The folder `latest` names, else the newest complete one; None when there is none."""
    pointer = checkpoints / "latest"
    if pointer.is_file():
        named = checkpoints / read_text(pointer, "checkpoint pointer", CheckpointError).strip()
        if (named / "trainer_state.json").is_file():
            return named
    found = [p for p in list_checkpoints(checkpoints) if (p / "trainer_state.json").is_file()]
    return found[-1] if found else None


def resolve_checkpoint(spec: str | Path, run_dir: Path | None = None, flag: str = "--resume") -> Path:
    """A checkpoint folder from 'latest' (the newest of `run_dir`), a run folder (its newest) or a
    checkpoint folder. UserError naming `flag` otherwise."""
    if spec == "latest":
        if run_dir is None:
            raise UserError(f"{flag} latest needs a run folder.")
        path, what = Path(run_dir), f"{flag} latest"
    else:
        path, what = Path(spec), f"{flag} {spec}"
        if not path.exists():
            raise UserError(f"{what}: no such folder.")
        if (path / "trainer_state.json").is_file():
            return path
        if not (path / "checkpoints").is_dir():
            raise UserError(f"{what}: neither a run folder (with checkpoints/) nor a checkpoint folder "
                            "(with trainer_state.json).")
    found = latest_checkpoint(path / "checkpoints")
    if found is None:
        raise UserError(f"{what}: no checkpoint in {path / 'checkpoints'}.")
    return found


def resolve_transformer(spec: str, flag: str = "--checkpoint") -> Path:
    """The transformer folder of a checkpoint for evaluation: ours (a run folder: its latest; `step-N`) or
    the reference trainer's (an output folder: its highest `checkpoint-N`; `checkpoint-N`), or a bare
    transformer folder (config.json + weights). A LoRA checkpoint gives its adapter folder (PEFT's
    adapter_config.json + weights; `models.lora.is_adapter`), which the caller applies to a base model.
    UserError naming `flag` otherwise."""
    path, what = Path(spec), f"{flag} {spec}"
    if not path.exists():
        raise UserError(f"{what}: no such folder.")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path  # a bare transformer (or adapter) folder
    ckpt = path
    if (path / "checkpoints").is_dir() and not (path / "transformer").is_dir():
        ours = list_checkpoints(path / "checkpoints")
        theirs = [(int(m.group(1)), p) for p in (path / "checkpoints").iterdir()
                  if (m := REFERENCE_DIR.match(p.name)) and p.is_dir()]
        if ours or not theirs:
            ckpt = resolve_checkpoint(spec, flag=flag)
        else:
            ckpt = max(theirs)[1]
    elif not any((path / name).exists() for name in ("transformer", "adapter", "trainer_state.json")):
        raise UserError(f"{what}: neither a run folder (with checkpoints/), a checkpoint folder (with "
                        "transformer/ or adapter/) nor a transformer folder (with config.json).")
    for name in ("transformer", "adapter"):
        if (ckpt / name).is_dir():
            return ckpt / name
    raise UserError(f"{what}: {ckpt} holds no transformer/ or adapter/ folder, so it cannot be evaluated.")


def checkpoint_folder(spec: str, flag: str = "--checkpoint") -> Path:
    """The checkpoint folder `resolve_transformer` reads for `spec` (a bare transformer folder: itself)."""
    transformer = resolve_transformer(spec, flag)
    return transformer.parent if transformer.name in ("transformer", "adapter") else transformer


def run_folder_of(checkpoint: Path) -> Path | None:
    """RUN for RUN/checkpoints/step-N, else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


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
    _finish_files(tmp)
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, final.parent / "latest")
    if keep:
        others = [p for p in list_checkpoints(final.parent) if p != final]
        for old in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, rank: int = 0) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(optimizer state_dict, trainer state, this rank's rng tensors). A damaged file raises
    CheckpointError naming it."""
    state_file, opt_file = folder / "trainer_state.json", folder / "optimizer.safetensors"
    rng_file = folder / f"rng.rank{rank}.safetensors"
    if not rng_file.is_file() and state_file.is_file():
        raise UserError(f"{folder}: no RNG state for process {rank}; resume with the same number of processes.")
    try:
        state = json.loads(state_file.read_text())
        optimizer = optimizer_from_flat(_read_tensors(opt_file), state.pop("optimizer"))
        rng = _read_tensors(rng_file)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: damaged checkpoint ({type(e).__name__}: {e}); resume from another "
                              "one with --resume PATH.") from None
    return optimizer, state, rng


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete.") from None
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged, "
                              "resume from another one with --resume PATH.") from None


def _finish_files(folder: Path) -> None:
    """Modes as the umask allows (safetensors writes 0600), then fsync every file."""
    share_files(folder)
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
