"""Which pipeline a model name means, decided in one place: `model_folder` (None: the shipped tiny world; an
`owner/name` hub id: its cached snapshot; else a folder) and `load_pipeline` (a model with a training
checkpoint's transformer in place of its own, on a checked device)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def model_folder(model: str | Path | None) -> Path:
    """The pipeline folder `model` names: the shipped tiny world when None (UserError when it is missing), a hub
    id's snapshot (see `models.pipeline.resolve_model`), or the folder itself."""
    from .models.pipeline import resolve_model
    from .tinyworld import SHIPPED_MODEL

    if model:
        return resolve_model(model)
    if not (SHIPPED_MODEL / "model_index.json").is_file():
        raise UserError(f"the shipped tiny-world model is missing at {SHIPPED_MODEL}; rebuild it with "
                        "`udm-grpo pretrain --output udm_grpo/assets/tiny-world`.")
    return SHIPPED_MODEL


def check_device(device: str) -> None:
    """UserError (one sentence) for a device string torch cannot parse or an accelerator this machine lacks."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device}: not a torch device (expected e.g. cpu, cuda or cuda:1).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available to this torch build or machine; "
                            "use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu.")


def load_pipeline(model: str | None, device: str = "cpu", checkpoint: str | None = None):
    """The pipeline `--model` names (a folder or a hub id; default the shipped tiny world), with the
    transformer of `--checkpoint` (ours or the reference trainer's, see `resolve_transformer`) if given."""
    import torch

    from .models.pipeline import URSAPipeline

    check_device(device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if model is None and checkpoint:
        model = run_model(checkpoint)
    transformer = None
    if checkpoint:
        from .grpo.checkpoint import resolve_transformer

        transformer = resolve_transformer(checkpoint, flag="--checkpoint")
    return URSAPipeline.from_pretrained(model_folder(model), device=device, transformer=transformer)


def run_model(checkpoint: str) -> str | None:
    """`model.path` of the udm-grpo run that `checkpoint` belongs to (from its config.yaml), so that
    `--checkpoint RUN` alone evaluates on the model the run trained; None for the tiny world or other layouts."""
    import yaml

    from .textfiles import read_text

    path = Path(checkpoint).resolve()
    for folder in (path, *path.parents[:3]):
        if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            try:
                data = yaml.safe_load(read_text(folder / "config.yaml")) or {}
                model = (data.get("model") or {}).get("path")
            except (UserError, yaml.YAMLError, AttributeError):
                return None
            return model if isinstance(model, str) and model else None
    return None
