"""`udm-grpo` command line. Each subcommand lives in its own module and registers here.

User errors (bad config, file or argument) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import UserError

# name -> (module, one-line help). A module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("udm_grpo.commands.train", "UDM-GRPO fine-tuning (default: the tiny world with ShapeEval)"),
    "ablate": ("udm_grpo.commands.ablate", "train the paper's ablation ladder and write a table and plot"),
    "compare": ("udm_grpo.commands.compare", "train recipe variants x seeds and compare their held-out gains"),
    "pretrain": ("udm_grpo.commands.pretrain", "build and pretrain a tiny-world URSA model from scratch"),
    "sample": ("udm_grpo.commands.sample", "prompts -> a PNG grid of samples"),
    "eval": ("udm_grpo.commands.evaluate", "evaluate a model: shapes (tiny world), geneval, pickscore, ocr"),
    "export": ("udm_grpo.commands.export", "a training checkpoint -> a pipeline folder (e.g. in bf16)"),
    "score": ("udm_grpo.commands.score", "score image files with a reward (JSON per image and a summary)"),
    "serve-reward": ("udm_grpo.commands.serve_reward", "serve a reward over HTTP for trainers on other machines"),
    "data": ("udm_grpo.commands.data", "prompt data: generate GenEval training metadata, check prompt files"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="udm-grpo",
        description="UDM-GRPO: reinforcement-learning fine-tuning of uniform discrete diffusion (URSA) "
        "text-to-image models, with a tiny world that runs on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"udm-grpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (one line on stderr): the status as a return
        return e.code if isinstance(e.code, int) else 2
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"udm-grpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"udm-grpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
