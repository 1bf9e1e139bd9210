"""Image tokenizers of a pipeline's `vae/` folder, and the disk helpers both of them share.

Two classes share one API (`encode`, `decode`, `num_embeddings`, `spatial_stride`, `codebook`,
`save_pretrained`, `from_pretrained`): `AutoencoderVQ` (URSA's IBQ conv autoencoder, `vq.py`) and
`PatchVQ` (the tiny-world patch tokenizer, `patch_vq.py`). `load_vae` picks one from the
`_class_name` of `vae/config.json`.

Folder layout (diffusers style): `config.json` + `diffusion_pytorch_model.safetensors`, or the
legacy pickled `diffusion_pytorch_model.bin` (read with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
DIFFUSERS_VERSION = "0.32.2"
VAE_CLASSES = ("AutoencoderVQ", "PatchVQ")


def load_vae(
    folder: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a `vae/` folder as `AutoencoderVQ` or `PatchVQ`, chosen by config.json `_class_name`.

    Raises CheckpointError when config.json is missing or names another class.
    """
    from .patch_vq import PatchVQ
    from .vq import AutoencoderVQ

    folder = Path(folder)
    data, path = read_config(folder)
    name = data.get("_class_name")
    classes = {"AutoencoderVQ": AutoencoderVQ, "PatchVQ": PatchVQ}
    if name not in classes:
        raise CheckpointError(f"{path}: '_class_name' is {name!r}, expected one of {', '.join(VAE_CLASSES)}.")
    return classes[name].from_pretrained(folder, dtype=dtype, device=device)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None -> float32; 'float16' / torch.float16 -> torch.float16. Raises ConfigError otherwise."""
    out = getattr(torch, dtype, None) if isinstance(dtype, str) else (dtype or torch.float32)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype, got {dtype!r}.")
    return out


def read_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """(parsed config.json, its path). CheckpointError if absent, ConfigError if not a JSON object."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} found (is this a vae/ folder?).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data, path


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of `folder` on the CPU, as stored (safetensors preferred, else legacy .bin)."""
    from safetensors.torch import load_file

    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name == WEIGHTS_NAME:
                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt file, or a pickle that needs more than tensors
            msg = f"{path}: cannot be read as a weight file ({type(e).__name__}: {e})."
            raise CheckpointError(msg) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: does not hold a flat dict of tensors.")
        return state
    raise CheckpointError(f"{folder}: no weights found (expected {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME}).")


def load_weights(
    model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device | str | None = None
) -> nn.Module:
    """Fill `model` (built on any device, meta included) from `folder`'s weights, cast to `dtype` on
    `device`. Missing, unexpected or misshaped keys raise CheckpointError naming folder and key."""
    state = read_weights(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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
    device = device or "cpu"
    state = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_folder(folder: str | Path, config: dict[str, Any], model: nn.Module) -> None:
    """Write config.json (sorted keys) and diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
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
            raise ConfigError(f"{source}: field '{name}' must be an integer or [height, width], "
                              f"got {value!r}.")
        return tuple(check_int(v, name, source) for v in value)  # type: ignore[return-value]
    return check_int(value, name, source)
