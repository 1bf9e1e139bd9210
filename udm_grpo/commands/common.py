"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipelines import check_device, load_pipeline, run_model  # noqa: F401  (the commands' loaders)


def _number(kind, text: str, low: float | None, what: str):
    """argparse type: `kind(text)`, finite and >= `low`; ArgumentTypeError (exit 2, one line) otherwise."""
    import math

    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or (low is not None and value < low):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _number(int, text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    value = _number(float, text, None, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(float, text, None, "a finite number")


def fraction(text: str) -> float:
    value = _number(float, text, 0.0, "a fraction in [0, 1)")
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def guidance_float(text: str) -> float:
    return _number(float, text, 1.0, "a finite guidance scale >= 1")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="pipeline folder in the URSA layout or a hub id such as BAAI/URSA-1.7B-IBQ512 "
                        "(default: the model the --checkpoint's run trained, else the shipped tiny-world model)")
    parser.add_argument("--checkpoint", default=None,
                        help="a training checkpoint whose transformer replaces the model's: RUN/checkpoints/step-N "
                        "(or RUN for its latest), a reference checkpoint-N folder (or its output folder for the "
                        "highest N), or a transformer folder; a LoRA checkpoint's adapter (PEFT's adapter/ folder) is "
                        "merged into its base: --model, else the base the adapter or its run names")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def read_sources(model: str | None, checkpoint: str | None, run: bool = False) -> list[Path]:
    """The folders a `--model` / `--checkpoint` command reads, for `outputs.check_output`: the model folder (the
    shipped tiny world when none is named) and the checkpoint folder, or with `run` its whole run folder."""
    from ..grpo.checkpoint import checkpoint_folder, resolve_transformer, run_folder_of
    from ..models.lora import is_adapter
    from ..pipelines import adapter_base
    from ..tinyworld import SHIPPED_MODEL

    base = None
    if model is None and checkpoint:
        transformer = resolve_transformer(checkpoint)
        if is_adapter(transformer):  # a LoRA checkpoint reads the base its adapter names
            base = adapter_base(transformer, None, checkpoint)
        else:
            model = run_model(checkpoint)
    sources = [base or (Path(model) if model else SHIPPED_MODEL)]
    if checkpoint:
        folder = checkpoint_folder(checkpoint)
        sources.append((run_folder_of(folder) if run else None) or folder)
    return sources


def sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tinyworld import TINY_WORLD_SAMPLING as d

    parser.add_argument("--sampling-steps", dest="steps", type=positive_int, default=d.num_inference_steps,
                        help=f"CTMC sampling steps (default {d.num_inference_steps})")
    parser.add_argument("--steps", dest="old_steps", type=positive_int, default=None,
                        help="the old name of --sampling-steps (deprecated: in `train` --steps counts optimiser steps)")
    parser.add_argument("--guidance", type=guidance_float, default=d.guidance_scale,
                        help="classifier-free guidance scale (>= 1; 1 = no guidance)")
    parser.add_argument("--guidance-trunc", type=finite_float, default=d.guidance_trunc,
                        help="apply guidance only while t < this")
    parser.add_argument("--seed", type=nonnegative_int, default=0)


def sampling_from_args(args):
    """The sampling settings of `sampling_arguments`; the deprecated --steps wins over --sampling-steps' default
    and says so in one line on stderr."""
    import sys

    from ..tinyworld import TINY_WORLD_SAMPLING

    if args.old_steps is not None:
        print(f"udm-grpo: warning: --steps is deprecated here; use --sampling-steps {args.old_steps}.", file=sys.stderr)
        args.steps = args.old_steps
    return TINY_WORLD_SAMPLING.replace(num_inference_steps=args.steps, guidance_scale=args.guidance,
                                       guidance_trunc=args.guidance_trunc)


def warn_unknown_words(pipe, prompts: list[str], command: str) -> None:
    """One warning line on stderr naming the prompt words the model's tokenizer cannot read."""
    import sys

    from ..data.text_tokenizer import unknown_words

    if words := unknown_words(pipe.tokenizer, list(dict.fromkeys(prompts))):
        print(f"udm-grpo {command}: warning: the model's tokenizer does not know the word(s) "
              f"{', '.join(map(repr, words))} and reads each as its unknown token.", file=sys.stderr)
