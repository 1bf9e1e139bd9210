"""udm-grpo: UDM-GRPO fine-tuning of uniform discrete diffusion (URSA) text-to-image models.

The Python API (imported lazily, so that `udm-grpo --help` does not import torch):

    from udm_grpo import UDMGRPOTrainer, run_config
    trainer = UDMGRPOTrainer(run_config(overrides=["training.max_steps=10", "experiment.output_dir=runs/x"]))
    result = trainer.train()   # result["first_eval"], result["eval"]: held-out figures before and after

- configs: `run_config` (tiny-world defaults <- a file or recipe <- KEY=VALUE), `load_config`, `Config`,
  `list_recipes`;
- training: `UDMGRPOTrainer` (`train`, `train_step`, `evaluate`, `save`, `resume`);
- models and sampling: `URSAPipeline` (`from_pretrained`, `__call__`, `generate`), `load_pipeline` (None: the
  shipped tiny world), `SamplingOptions`, `TINY_WORLD_SAMPLING`;
- rewards: `build_reward`, `Reward`, `RewardOutput`;
- errors: `UserError` (what a user's file, flag or folder caused), `TrainingError`.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "udm_grpo.config",
    "load_config": "udm_grpo.config",
    "run_config": "udm_grpo.recipes",
    "list_recipes": "udm_grpo.recipes",
    "UDMGRPOTrainer": "udm_grpo.grpo.trainer",
    "URSAPipeline": "udm_grpo.models.pipeline",
    "load_pipeline": "udm_grpo.pipelines",
    "SamplingOptions": "udm_grpo.diffusion.sampler",
    "TINY_WORLD_SAMPLING": "udm_grpo.tinyworld",
    "build_reward": "udm_grpo.rewards",
    "Reward": "udm_grpo.rewards.base",
    "RewardOutput": "udm_grpo.rewards.base",
    "UserError": "udm_grpo.errors",
    "TrainingError": "udm_grpo.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'udm_grpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
