"""`load_vae`: open a pipeline's `vae/` folder as the image tokenizer its config.json names.

Two classes share one API (`encode`, `decode`, `num_embeddings`, `spatial_stride`, `codebook`,
`save_pretrained`, `from_pretrained`): `AutoencoderVQ` (URSA's IBQ conv autoencoder, `vq.py`) and
`PatchVQ` (the tiny-world patch tokenizer, `patch_vq.py`). The folder layout and its readers are in `io.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .io import read_config
from .patch_vq import PatchVQ, PatchVQConfig
from .vq import AutoencoderVQ, VQConfig

VAE_CLASSES: dict[str, type[AutoencoderVQ] | type[PatchVQ]] = {"AutoencoderVQ": AutoencoderVQ, "PatchVQ": PatchVQ}


def vae_geometry(folder: str | Path) -> tuple[int, int | tuple[int, int] | None]:
    """(pixels per token side, native `sample_size`) of a `vae/` folder from its config.json alone (no
    weights): PatchVQ's `patch_size`; AutoencoderVQ's 2^(L-1) for L levels, as its `spatial_stride`."""
    data, path = read_config(Path(folder), "vae/")
    if data.get("_class_name") == "PatchVQ":
        cfg = PatchVQConfig.from_dict(data, str(path))
        return cfg.patch_size, cfg.sample_size
    cfg = VQConfig.from_dict(data, str(path))
    return 2 ** (len(cfg.block_out_channels) - 1), cfg.sample_size


def load_vae(
    folder: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a `vae/` folder as `AutoencoderVQ` or `PatchVQ`, chosen by config.json `_class_name`.

    Raises CheckpointError when config.json is missing or names another class.
    """
    folder = Path(folder)
    data, path = read_config(folder, "vae/")
    name = data.get("_class_name")
    if name not in VAE_CLASSES:
        raise CheckpointError(f"{path}: '_class_name' is {name!r}, expected one of {', '.join(VAE_CLASSES)}.")
    return VAE_CLASSES[name].from_pretrained(folder, dtype=dtype, device=device)
