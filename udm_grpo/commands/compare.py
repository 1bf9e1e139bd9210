"""`udm-grpo compare`: train named recipe variants x seeds with the same held-out evaluation and write a table,
a plot and a JSON of the results; resumable (see `comparison`)."""

from __future__ import annotations

import argparse

from ..recipes import recipes_help
from .common import nonnegative_int, positive_int
from .train import DEFAULT_CONFIG

SYNOPSIS = ("Each --variant is NAME [FILE.yaml|RECIPE] [KEY=VALUE ...]: its file is layered on the base config "
            f"({DEFAULT_CONFIG.name} <- --config), then the shared overrides, then its own overrides. Each variant x "
            "seed trains into OUTPUT/NAME/seed-S/. Running the same command again skips finished runs, resumes "
            "unfinished ones from their latest checkpoint and trains missing ones; another definition (variants, "
            "steps, seeds, base) is refused unless --force.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"{p.description}. {SYNOPSIS}"
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides shared by every variant "
                   "(put them before --seeds and --variant, which take the words that follow them)")
    p.add_argument("-o", "--output", required=True, help="folder for the runs, compare.md, compare.png and the "
                   "compare.json manifest")
    p.add_argument("--config", default=None, metavar="FILE|RECIPE",
                   help=f"base config layered on {DEFAULT_CONFIG.name}: {recipes_help()}")
    p.add_argument("--variant", action="append", nargs="+", required=True, metavar=("NAME", "FILE|KEY=VALUE"),
                   help="a variant (repeat for more): its name (a folder name), optionally a config file or recipe, "
                   "then KEY=VALUE overrides")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimiser steps per run (default: training.max_steps of the base config)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0], metavar="S",
                   help="training seeds (training.seed), one run per variant and seed (default 0)")
    p.add_argument("--metric", default="strict", help="held-out metric: NAME reads eval/NAME of eval.jsonl "
                   "(default strict, else eval/reward when the reward logs no strict value); it changes only the "
                   "report, so a rerun with another --metric re-reads finished runs")
    p.add_argument("--force", action="store_true", help="replace the comparison and retrain all of its runs")


def parse_variant(tokens: list[str]):
    """A `comparison.Variant` from the tokens of one --variant: NAME [FILE|RECIPE] [KEY=VALUE ...]."""
    from ..errors import UserError
    from ..recipes import resolve_config_path
    from .comparison import Variant

    name, *rest = tokens
    if "=" in name:
        raise UserError(f"--variant {' '.join(tokens)}: the first word must be the variant's name, not {name!r}.")
    config, overrides = None, []
    for token in rest:
        if "=" in token:
            overrides.append(token)
        elif config is None and not overrides:
            config = resolve_config_path(token, flag=f"--variant {name}")
        else:
            raise UserError(f"--variant {name}: {token!r} is not KEY=VALUE, and only one config file may follow the "
                            "name, before the overrides.")
    return Variant(name, config, tuple(overrides))


def base_steps(base: list, overrides: list[str]) -> int:
    """training.max_steps of the base config with the shared overrides."""
    from ..config import load_config

    return load_config(base, overrides).training.max_steps


def run(args) -> int:
    from pathlib import Path

    from ..errors import TrainingError
    from ..outputs import check_output
    from ..recipes import resolve_config_path
    from .comparison import check_variants, run_comparison

    output = check_output(args.output, "folder", exists_ok=True)  # each run folder is checked before training
    variants = [parse_variant(tokens) for tokens in args.variant]
    check_variants(variants)
    base = [DEFAULT_CONFIG, resolve_config_path(args.config)]
    steps = args.steps or base_steps(base, args.overrides)
    try:
        result = run_comparison(base, args.overrides, variants, Path(output), steps, args.seeds, args.force,
                                args.metric)
    except TrainingError as e:
        print(f"udm-grpo compare: stopped: {e}")
        return 1
    if result["interrupted"]:
        return 130
    print((Path(output) / "compare.md").read_text())
    return 0
