"""Every check a training start makes before it loads weights: one function for `UDMGRPOTrainer` and for
`udm-grpo train --check`, so that a config `--check` passes is one the trainer starts with.

Checked: every key's rule and the cross-field checks of the config (`config.validate_config`, so a `Config`
built in code is checked as one loaded from YAML), the engine and its offload keys, the batch plan for the number of
processes (whole groups per process under dynamic sampling), the reward's name and parameters, the model
folder's layout, the rollout image size against the tokenizer's stride, the prompt sources (readable, non-empty,
and records the reward can score) and the held-out set built from them. The trainer runs it before it sets anything up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config, validate_config
from ..config.rules import offload_problem
from ..data.prompts import load_prompts
from ..errors import ConfigError, UserError
from ..pipelines import model_folder
from ..rewards import check_prompt_source, check_reward
from .batching import BatchPlan, plan_from_config
from .engine import EngineSpec, engine_spec
from .evaluation import eval_records


@dataclass
class StartPlan:
    """What the checks found: the engine, the batch plan, the model folder (None when the trainer was given a
    pipeline) and its parsed model_index.json, the training records and the held-out records."""

    spec: EngineSpec
    plan: BatchPlan
    folder: Path | None
    index: dict
    train: list[dict]
    held_out: list[dict]


def check_start(cfg: Config, world: int, pipeline=None, reward_given: bool = False) -> StartPlan:
    """Run every start check for `world` processes (see the module docstring); UserError at the first fault.
    `pipeline`: a loaded pipeline to check against instead of the model folder; `reward_given`: the reward
    was built in code, so `reward.name` / `reward.params` are not checked."""
    from ..models.pipeline import URSAPipeline, token_grid
    from ..models.vae import vae_geometry

    validate_config(cfg)
    spec = engine_spec(cfg.training.engine, cfg.training.zero_stage)
    problem = offload_problem(spec.kind, spec.zero_stage, cfg.training.offload_optimizer, cfg.training.offload_param)
    if problem:
        raise ConfigError(problem)
    plan = plan_from_config(cfg, world)
    if cfg.sampling.dynamic_sampling and cfg.sampling.num_prompts_per_step % world:
        raise ConfigError(f"sampling.dynamic_sampling needs each of the {world} processes to hold whole groups: make "
                          f"sampling.num_prompts_per_step ({cfg.sampling.num_prompts_per_step}) a multiple of {world}.")
    if not reward_given:
        check_reward(cfg.reward.name, cfg.reward.params)
    folder, index = None, {}
    if pipeline is None:
        folder = model_folder(cfg.model.path)
        index = URSAPipeline.check_folder(folder)
    r = cfg.sampling.rollout
    try:
        if pipeline is None:
            token_grid(r.height, r.width, *vae_geometry(folder / "vae"))
        else:
            pipeline.grid(r.height, r.width)
    except UserError as e:
        raise ConfigError(f"config keys 'sampling.rollout.height' / 'sampling.rollout.width': {e}") from None
    sources = (cfg.data.train or "shapes:train", cfg.data.test or "shapes:test")
    train, test = (load_prompts(source) for source in sources)
    if not reward_given:  # a reward built in code may score what `reward.name` would not
        for source, records in zip(sources, (train, test)):
            check_prompt_source(cfg.reward.name, records, source)
    return StartPlan(spec, plan, folder, index, train, eval_records(test, cfg.experiment))
