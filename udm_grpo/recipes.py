"""The configs shipped inside the package: the paper's run recipes (`train` / `ablate --config NAME`), the
tiny-world pretraining recipe (`pretrain --config NAME`) and the `accelerate launch` configs of the engines.

`python -m udm_grpo.recipes` lists them with their paths; `python -m udm_grpo.recipes accelerate/fsdp` prints
one path (for `accelerate launch --config_file` from an installed package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import UserError

CONFIGS = Path(__file__).resolve().parent / "configs"
KINDS = ("recipes", "pretrain", "accelerate")  # folders of CONFIGS
SUFFIXES = (".yaml", ".yml")
TINY_WORLD_LAYER = CONFIGS / "tiny_world_grpo.yaml"  # the first layer of every run config


def run_config(config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """A validated run `Config` from its layers, later wins: the tiny-world defaults (`TINY_WORLD_LAYER`) <-
    `config` (a YAML file, or a packaged recipe's name such as "geneval_ursa_1.7b") <- dotted `KEY=VALUE`
    `overrides`. What `udm-grpo train` builds from --config and its arguments."""
    from .config import load_config

    path = resolve_config_path(None if config is None else os.fspath(config))
    notes = {str(TINY_WORLD_LAYER): "the default layer"}
    if path is not None and config is not None and path != os.fspath(config):
        notes[path] = f"the packaged recipe {config}"
    return load_config([TINY_WORLD_LAYER, path], list(overrides), notes=notes)


def list_recipes(kind: str = "recipes") -> dict[str, Path]:
    """Name -> file of the packaged configs of `kind`: 'recipes' (runs of `train` and `ablate`), 'pretrain' or
    'accelerate'."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return {p.stem: p for p in sorted((CONFIGS / kind).glob("*.yaml"))}


def recipes_help(kind: str = "recipes") -> str:
    """'a YAML file, or a packaged recipe: A, B, C' for a --config help text."""
    return f"a YAML file, or a packaged recipe: {', '.join(list_recipes(kind)) or '(none)'}"


def _has_separator(value: str) -> bool:
    return any(sep and sep in value for sep in (os.sep, os.altsep, "/"))


def resolve_config_path(value: str | None, kind: str = "recipes", flag: str = "--config") -> str | None:
    """`value` of a --config option as a file path: an existing path or a value with a path separator stays as it
    is (the config loader reports a missing file); a bare name (optional .yaml) of a packaged recipe of `kind`
    becomes its file; any other bare name is a UserError listing the recipes."""
    if value is None or not value.strip() or os.path.exists(value) or _has_separator(value):
        return value
    name = next((value[: -len(s)] for s in SUFFIXES if value.endswith(s)), value)
    recipes = list_recipes(kind)
    if name in recipes:
        return str(recipes[name])
    raise UserError(f"{flag} {value}: no such file, and not a packaged recipe (choose a YAML file or one of: "
                    f"{', '.join(recipes) or '(none)'}).")


def main(argv: list[str] | None = None) -> int:
    """Print every packaged config (KIND/NAME and its path), or the path of the one named KIND/NAME."""
    argv = sys.argv[1:] if argv is None else argv
    table = {f"{kind}/{name}": path for kind in KINDS for name, path in list_recipes(kind).items()}
    if not argv:
        width = max(map(len, table))
        print("\n".join(f"{key:<{width}}  {path}" for key, path in table.items()))
        return 0
    key = argv[0].removesuffix(".yaml")
    if len(argv) > 1 or key not in table:
        print(f"python -m udm_grpo.recipes: '{' '.join(argv)}' names no packaged config; choose one of: "
              f"{', '.join(table)}.", file=sys.stderr)
        return 2
    print(table[key])
    return 0


if __name__ == "__main__":
    sys.exit(main())
