"""LoRA adapters in PEFT's format: a folder with `adapter_config.json` and `adapter_model.safetensors` (or a
legacy `adapter_model.bin`, read with `torch.load(weights_only=True)`), loadable by
`peft.PeftModel.from_pretrained(transformer, folder)`.

The trainer writes a LoRA checkpoint's `adapter/` from gathered weights (`save_adapter`, any engine) and reads it
back by parameter name (`read_adapter_params`); evaluation and export apply an adapter to its base transformer
and merge it (`merge_adapter`). `base_model_name_or_path` in adapter_config.json names the pipeline folder (or
hub id) the adapter was trained on. Faults are one sentence naming the file (CheckpointError).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..textfiles import read_json
from .io import read_weight_file, share_files

ADAPTER_NAME = "default"  # peft's name of the one adapter; PEFT files store keys without it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(folder: Path) -> bool:
    """True for a PEFT adapter folder (adapter_config.json and no full model config.json)."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base_named(folder: Path) -> str | None:
    """`base_model_name_or_path` of the adapter (None when it names none)."""
    base = _read_config(folder).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def adapter_base_name(model_path: str | None, loaded: Path | None) -> str | None:
    """What a LoRA run records as its adapters' base: `model.path` (a folder, made absolute, or a hub id), else
    the folder the trainer loaded (the shipped tiny world); None for a pipeline built in code."""
    if model_path:
        return str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
    return str(Path(loaded).resolve()) if loaded is not None else None


def _read_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    data = read_json(path, "adapter config", CheckpointError)
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a PEFT LoRA adapter config (needs \"peft_type\": \"LORA\").")
    return data


def read_adapter(folder: Path):
    """(peft LoraConfig, {PEFT key: tensor}) of an adapter folder."""
    from peft import LoraConfig

    data = _read_config(folder)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        config = LoraConfig(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a valid LoRA config ({e}).") from None
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return config, read_weight_file(folder / name)
    raise CheckpointError(f"{folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")


def file_keys(model, names: list[str]) -> dict[str, str]:
    """{PEFT file key: parameter name} for the adapter parameters `names` of the peft `model`, as peft's own
    `get_peft_model_state_dict` renames them (adapter name dropped)."""
    from peft import get_peft_model_state_dict

    marked = {n: torch.tensor(float(i)) for i, n in enumerate(names)}
    saved = get_peft_model_state_dict(model, state_dict=marked, save_embedding_layers=False)
    return {key: names[int(v)] for key, v in saved.items()}


def save_adapter(model, folder: Path, weights: dict[str, torch.Tensor], base: str | None) -> None:
    """Write `weights` (the adapter parameters of the peft `model` by name, e.g. gathered from an engine's
    shards) as PEFT adapter files in `folder`; `base` is recorded as `base_model_name_or_path`."""
    from safetensors.torch import save_file

    keys = file_keys(model, list(weights))
    config = dataclasses.replace(model.peft_config[ADAPTER_NAME], base_model_name_or_path=base,
                                 inference_mode=True)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({key: weights[name].contiguous() for key, name in keys.items()},
              str(folder / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    share_files(folder)


def read_adapter_params(model, folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The adapter weights of `folder` keyed by the parameter names `names` of the peft `model` (a resume)."""
    _, saved = read_adapter(folder)
    keys = file_keys(model, names)
    _check_keys(folder, saved, {k: None for k in keys})
    return {name: saved[key] for key, name in keys.items()}


def _check_keys(folder: Path, saved: dict, expected: dict) -> None:
    missing, extra = [k for k in expected if k not in saved], sorted(set(saved) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model does not have"
        raise CheckpointError(f"{folder}: the adapter does not fit the base model: it {what} ({len(missing)} missing, "
                              f"{len(extra)} unexpected).")


def load_adapter(transformer: torch.nn.Module, folder: Path):
    """`transformer` wrapped with the adapter of `folder` (a peft model, in eval mode)."""
    from peft import get_peft_model

    config, saved = read_adapter(folder)
    config.base_model_name_or_path = None  # the base is given; peft would warn that it "renamed" it
    try:
        model = get_peft_model(transformer, config)
    except ValueError as e:
        targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: its target modules {json.dumps(targets)} do not fit the "
                              f"base model ({first.rstrip('.')}).") from None
    params = dict(model.named_parameters())
    keys = file_keys(model, [n for n in params if f".{ADAPTER_NAME}." in n])
    _check_keys(folder, saved, keys)
    with torch.no_grad():
        for key, name in keys.items():
            p = params[name]
            if saved[key].shape != p.shape:
                raise CheckpointError(f"{folder}: the adapter does not fit the base model: {key} has shape "
                                      f"{tuple(saved[key].shape)}, the model's {tuple(p.shape)}.")
            p.copy_(saved[key])
    return model.eval()


def merge_adapter(transformer: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """`transformer` with the adapter of `folder` merged into its weights (W + B A * scale), as a plain model."""
    return load_adapter(transformer, folder).merge_and_unload()
