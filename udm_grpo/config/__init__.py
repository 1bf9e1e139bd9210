"""Typed configuration of a UDM-GRPO run: the schema (`schema.py`: dataclass sections whose defaults are the
paper's recipe, each leaf with its rule and help), its loading (`loading.py`: YAML layers + dotted overrides,
checked key by key, cross-field checks) and the leaf rules (`rules.py`).

`load_config(path, ["sampling.train_steps=2", ...])` returns a validated `Config`; every problem raises
ConfigError with one sentence naming the key and the file or override that set it. `udm_grpo.run_config` adds
the tiny-world layer and recipe names on top.
"""

from .loading import (
    config_from_dict,
    config_template,
    config_to_dict,
    describe_schema,
    load_config,
    save_resolved,
    validate_config,
)
from .rules import Rule, choice, float_rule, int_rule, optional
from .schema import (
    Config,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
    TrainingConfig,
    opt,
    section,
)

__all__ = ["Config", "DataConfig", "ExperimentConfig", "ModelConfig", "RewardConfig", "RolloutConfig", "Rule",
           "SamplingConfig", "TrainingConfig", "choice", "config_from_dict", "config_template", "config_to_dict",
           "describe_schema", "float_rule", "int_rule", "load_config", "opt", "optional", "save_resolved",
           "section", "validate_config"]
