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
    transformer of `--checkpoint` (ours or the reference trainer's, see `resolve_transformer`) if given; a LoRA
    checkpoint's adapter is merged into its base's transformer (`adapter_base` finds the base)."""
    import torch

    from .models.lora import is_adapter, merge_adapter
    from .models.pipeline import URSAPipeline

    check_device(device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    transformer = None
    if checkpoint:
        from .grpo.checkpoint import resolve_transformer

        transformer = resolve_transformer(checkpoint, flag="--checkpoint")
        if is_adapter(transformer):
            pipe = URSAPipeline.from_pretrained(adapter_base(transformer, model, checkpoint), device=device)
            pipe.transformer = merge_adapter(pipe.transformer, transformer)
            return pipe
    if model is None and checkpoint:
        model = run_model(checkpoint)
    return URSAPipeline.from_pretrained(model_folder(model), device=device, transformer=transformer)


def adapter_base(adapter: Path, model: str | None, checkpoint: str) -> Path:
    """The pipeline folder a LoRA adapter applies to: `--model`; else the base its adapter_config.json names, when
    it is found; else the `model.path` of the run's config.yaml. UserError naming adapter_config.json otherwise."""
    from .errors import CheckpointError
    from .models.lora import ADAPTER_CONFIG, adapter_base_named

    if model:
        return model_folder(model)
    named = adapter_base_named(adapter)
    if named:
        try:
            folder = model_folder(named)
            folder = folder.parent if (folder / "config.json").is_file() else folder  # its transformer/ folder
            if (folder / "model_index.json").is_file():
                return folder
        except CheckpointError:  # a hub id that is not cached here
            pass
    found, path = _run_model(checkpoint)
    if found:
        return model_folder(path)
    what = f"its base model {named} cannot be found" if named else "it names no base model (base_model_name_or_path)"
    raise UserError(f"{adapter / ADAPTER_CONFIG}: {what}, and no run config.yaml names one; pass the base pipeline "
                    "with --model.")


def run_model(checkpoint: str) -> str | None:
    """`model.path` of the udm-grpo run that `checkpoint` belongs to (from its config.yaml), so that
    `--checkpoint RUN` alone evaluates on the model the run trained; None for the tiny world or other layouts."""
    return _run_model(checkpoint)[1]


def _run_model(checkpoint: str) -> tuple[bool, str | None]:
    """(whether a udm-grpo run's config.yaml holds `checkpoint`, its model.path or None)."""
    import yaml

    from .textfiles import read_text

    path = Path(checkpoint).resolve()
    for folder in (path, *path.parents[:3]):
        if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            try:
                data = yaml.safe_load(read_text(folder / "config.yaml")) or {}
                model = (data.get("model") or {}).get("path")
            except (UserError, yaml.YAMLError, AttributeError):
                return False, None
            return True, model if isinstance(model, str) and model else None
    return False, None
