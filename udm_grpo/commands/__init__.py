"""One module per `udm-grpo` subcommand (see `udm_grpo.cli.COMMANDS`).

The modules are imported by name; this file imports nothing."""

__all__ = ["ablate", "ablation", "common", "compare", "comparison", "data", "evaluate", "export", "pretrain", "sample",
           "score", "serve_reward", "train", "verdict"]
