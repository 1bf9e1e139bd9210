"""Model folder I/O shared by `transformer/` and `vae/` (diffusers layout), and config field checks.

A folder holds `config.json` and one of, in order of preference:

* `diffusion_pytorch_model.safetensors`,
* `diffusion_pytorch_model.safetensors.index.json` ({"weight_map": {key: shard file}}) + its shards,
* the legacy pickled `diffusion_pytorch_model.bin` (or its `.index.json`), read only with
  `torch.load(weights_only=True)`.

Safetensors are read and cast tensor by tensor, so a stored copy of the whole model is never held
next to the cast one. Every unreadable or corrupt weight file raises CheckpointError naming the file.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..textfiles import read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
INDEX_SUFFIX = ".index.json"
DIFFUSERS_VERSION = "0.32.2"

Cast = Callable[[torch.Tensor], torch.Tensor]


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None -> float32; 'float16' / torch.float16 -> torch.float16. Raises ConfigError otherwise."""
    out = getattr(torch, dtype, None) if isinstance(dtype, str) else (dtype or torch.float32)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype, got {dtype!r}.")
    return out


def read_config(folder: Path, kind: str = "model", name: str = CONFIG_NAME) -> tuple[dict[str, Any], Path]:
    """(parsed `name`, default config.json, its path): every JSON file of a model folder is read here.
    CheckpointError if absent (asking whether `folder` is a `kind` folder, e.g. "vae/"), ConfigError if not
    valid JSON or not a JSON object."""
    path = Path(folder) / name
    if not path.exists():
        raise CheckpointError(f"{folder}: no {name} found (is this a {kind} folder?).")
    data = read_json(path, "file", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data, path


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    """One sentence naming the file. torch's weights-only refusal (a pickle of anything but tensors and plain
    containers, or not a pickle at all) is reduced to its reason: its own text suggests weights_only=False,
    which this package never uses."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, pickle.UnpicklingError) and lines and lines[0].startswith("Weights only load failed"):
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reason = next((ln for ln in lines if not ln.startswith(skip)), "not a tensor state dict").rstrip(".")
        return CheckpointError(f"{path}: cannot be read as a weight file (refused by torch.load(weights_only=True), "
                               f"which loads only tensors and plain containers: {reason}).")
    return CheckpointError(f"{path}: cannot be read as a weight file ({type(e).__name__}: "
                           f"{lines[0] if lines else ''}).")


def _get_tensor(handle: Any, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as e:  # corrupt tensor data
        raise _unreadable(path, e) from e


def read_weight_file(path: Path, cast: Cast | None = None) -> dict[str, torch.Tensor]:
    """One weight file as {key: cast(tensor)}: `.safetensors` (read and cast tensor by tensor), anything
    else a pickled flat dict of tensors via torch.load(weights_only=True). CheckpointError names the file."""
    from safetensors import safe_open

    cast = cast or (lambda t: t)
    if path.name.endswith(".safetensors"):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # corrupt or truncated file
            raise _unreadable(path, e) from e
        with handle:
            return {k: cast(_get_tensor(handle, k, path)) for k in handle.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that needs more than tensors
        raise _unreadable(path, e) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a flat dict of tensors.")
    return {k: cast(state.pop(k)) for k in list(state)}


def read_weights(folder: Path, cast: Cast | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `folder`, each tensor passed through `cast` (default: as stored, on the CPU).

    Tries safetensors, its index, legacy .bin, its index, in that order (see the module docstring).
    """
    names = (WEIGHTS_NAME, WEIGHTS_NAME + INDEX_SUFFIX, LEGACY_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME + INDEX_SUFFIX)
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(INDEX_SUFFIX):
            return read_weight_file(path, cast)
        try:
            weight_map = read_json(path, "weight index", CheckpointError)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid index (needs a 'weight_map' object).") from e
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or not (folder / shard).is_file():
                raise CheckpointError(f"{path}: shard {shard!r} is not a file in {folder}.")
            state.update(read_weight_file(folder / shard, cast))
        return state
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: holds a LoRA adapter, not full weights; load the base model first.")
    raise CheckpointError(f"{folder}: no weights found (expected {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME}).")


def check_state(folder: Path, state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError naming `folder` and the first missing, unexpected or misshaped key of `state`."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{folder}: weights lack key '{missing[0]}' ({len(missing)} missing).")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{folder}: weights hold unexpected key '{unexpected[0]}'.")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            got, want = list(state[k].shape), list(shape)
            raise CheckpointError(f"{folder}: weight '{k}' has shape {got}, the config implies {want}.")


def load_weights(
    model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device | str | None = None
) -> nn.Module:
    """Fill `model` (built on any device, meta included) from `folder`'s weights: floating tensors are
    cast to `dtype`, all placed on `device` (default CPU) as they are read. Keys checked by `check_state`."""
    device = device or "cpu"
    state = read_weights(folder, lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype))
    check_state(folder, state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_folder(folder: str | Path, config: dict[str, Any], model: nn.Module | None = None,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json (sorted keys) and diffusion_pytorch_model.safetensors (CPU, contiguous) of `model`,
    or of a `state` dict gathered elsewhere (e.g. from sharded parameters)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = state if state is not None else model.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def check_int(value: Any, name: str, source: str, minimum: int = 1) -> int:
    """`value` if it is an int >= minimum (bools refused), else ConfigError naming source and field."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{source}: field '{name}' must be an integer >= {minimum}, got {value!r}.")
    return value


def check_size(value: Any, name: str, source: str) -> int | tuple[int, int]:
    """A positive int, or a pair of positive ints (height, width)."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ConfigError(f"{source}: field '{name}' must be an integer or [height, width], got {value!r}.")
        return tuple(check_int(v, name, source) for v in value)  # type: ignore[return-value]
    return check_int(value, name, source)


def share_files(folder: Path) -> None:
    """Give every file under `folder` the mode the umask allows (safetensors writes 0600, which hides
    weights from the group on a shared cluster)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)
