"""Typed configuration of a UDM-GRPO run: dataclass defaults (the paper's recipe), YAML + dotted overrides.

`load_config(path, ["sampling.train_steps=2", ...])` merges YAML files (one path or a list of layers,
later wins) and `key=value` overrides onto the defaults with OmegaConf (plain `${a.b}` interpolation only:
no `eval` or other custom resolvers), checks every key and value, and returns a `Config`. Every problem
raises ConfigError with one sentence naming the key (and the file or override that set it). Key names
follow the official UDM-GRPO configs where they exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_rules import (  # noqa: F401  (re-exported)
    BETAS,
    BOOL,
    INT_PAIR,
    MAPPING,
    MIXED_PRECISION,
    NONNEG_FLOAT,
    NONNEG_INT,
    NUMBERS,
    POS_FLOAT,
    POS_INT,
    REWARD_NAME,
    STRING,
    Rule,
    _is_int,
    _is_num,
    choice,
    float_rule,
    int_rule,
    optional,
)
from .errors import ConfigError


def opt(default, rule: Rule, help_text: str = ""):
    """A dataclass field carrying its validation rule and a one-line help text."""
    meta = {"rule": rule, "help": help_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls):
    return field(default_factory=cls)


@dataclass
class ModelConfig:
    path: str | None = opt(None, optional(STRING), "pipeline folder (official URSA layout); null = the tiny world")
    lora: dict | None = opt(None, optional(MAPPING), "peft LoraConfig kwargs; null = full fine-tune")
    gradient_checkpointing: int = opt(1, int_rule(0, 3), "0 none, 1 MLP, 2 MLP+QKV, 3 whole layer")
    dtype: str = opt("bfloat16", choice("float32", "bfloat16"), "compute dtype: bfloat16 runs forwards under autocast "
                     "and stores the frozen reference in bf16; trained weights are always float32 masters")


@dataclass
class RolloutConfig:
    num_inference_steps: int = opt(10, POS_INT, "CTMC sampling steps per rollout (Reduced-Step: 10)")
    guidance_scale: float = opt(1.0, float_rule("a number >= 1", lambda v: v >= 1), "1 = CFG-free")
    guidance_trunc: float = opt(0.9, float_rule("a number in (0, 1]", lambda v: 0 < v <= 1), "CFG only while t < it")
    height: int = opt(512, POS_INT, "image height in pixels")
    width: int = opt(512, POS_INT, "image width in pixels")
    batch_size: int | None = opt(None, optional(POS_INT), "images per rollout forward per process; null = all")

    def options(self):
        """These settings as the sampler's `SamplingOptions`."""
        from .diffusion.sampler import SamplingOptions

        return SamplingOptions(self.num_inference_steps, self.guidance_scale, self.guidance_trunc, self.height,
                               self.width, self.batch_size)


@dataclass
class SamplingConfig:
    num_prompts_per_step: int = opt(16, POS_INT, "prompts P per optimiser step (all processes together)")
    num_images_per_prompt: int = opt(8, int_rule(2), "group size G")
    train_steps: int = opt(3, POS_INT, "consecutive rollout steps trained per sample (Reduced-Step)")
    train_start: list = opt([0, 3], INT_PAIR, "first trained step ~ UniformInt[lo, hi)")
    forward_process: bool = opt(True, BOOL, "states re-noised from the final sample (false: rollout states)")
    clean_response: bool = opt(True, BOOL, "action = final clean sample (false: the step's own prediction)")
    rollout: RolloutConfig = section(RolloutConfig)


@dataclass
class RewardConfig:
    name: str | list = opt("geneval", REWARD_NAME, "reward name, or a list of names summed with reward.weights")
    params: dict = opt({}, MAPPING, "keyword arguments of the reward (of a list: {name: {...}} per listed reward)")
    weights: list | None = opt(None, optional(NUMBERS), "weights of a list of rewards; null = all 1")
    normalize: bool = opt(False, BOOL, "standardise each listed reward's scores per call before the weighted sum")
    advantage_clipping: float | None = opt(5.0, optional(POS_FLOAT), "clip advantages to +-this; null = off")
    advantage_eps: float = opt(1e-4, POS_FLOAT, "A = (s - mean) / (std + eps)")
    global_std: bool = opt(False, BOOL, "normalise by the std of all scores instead of per group")
    ratio_clipping: float = opt(1e-4, float_rule("a number in (0, 1)", lambda v: 0 < v < 1), "PPO epsilon")
    kl_beta: float = opt(0.05, NONNEG_FLOAT, "weight of the k3 KL to the reference; 0 = no reference")
    kl_mode: str = opt("sequence", choice("sequence", "token"), "k3 on sequence-mean or per-token log-probs")


@dataclass
class TrainingConfig:
    micro_batch_size: int | None = opt(None, optional(POS_INT), "samples per forward/backward; null = all")
    updates_per_rollout: int = opt(1, POS_INT, "optimiser updates per rollout (>1 stores old log-probs)")
    max_steps: int = opt(10000, POS_INT, "optimiser steps")
    lr: float = opt(1e-6, POS_FLOAT, "AdamW learning rate (constant after the warm-up)")
    lr_warmup_steps: int = opt(0, NONNEG_INT, "linear learning-rate warm-up steps; 0 = none (the paper)")
    betas: list = opt([0.9, 0.95], BETAS, "AdamW betas")
    weight_decay: float = opt(0.01, NONNEG_FLOAT, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, optional(POS_FLOAT), "global gradient-norm clip; null = off")
    seed: int = opt(1337, NONNEG_INT, "base seed (per-rank streams derive from it)")
    mixed_precision: str = opt("bf16", MIXED_PRECISION, "accelerate's mixed precision; 'bf16' also makes "
                               "forwards bfloat16 (as model.dtype does)")
    max_nonfinite: int = opt(3, POS_INT, "stop after this many consecutive non-finite steps")
    engine: str = opt("auto", choice("auto", "ddp", "deepspeed", "fsdp"), "auto = what `accelerate launch "
                      "--config_file` selected (DeepSpeed, FSDP), else DDP")
    zero_stage: int | None = opt(None, optional(int_rule(1, 3)), "DeepSpeed ZeRO stage; null = the accelerate "
                                 "config's, else 2 (the paper)")


@dataclass
class ExperimentConfig:
    output_dir: str = opt("runs/udm-grpo", STRING, "run folder: resolved config, logs, samples, checkpoints")
    resume_from_checkpoint: str | None = opt(None, optional(STRING), "checkpoint folder or 'latest'; null = fresh")
    log_every: int = opt(5, POS_INT, "steps between metric log lines")
    eval_every: int = opt(100, NONNEG_INT, "steps between held-out evaluations; 0 = off")
    save_every: int = opt(100, NONNEG_INT, "steps between checkpoints; 0 = only at the end")
    num_eval_prompts: int = opt(64, POS_INT, "held-out prompts per evaluation")
    eval_images_per_prompt: int = opt(1, POS_INT, "images per held-out prompt")
    eval_images_per_tag: int | None = opt(None, optional(POS_INT), "tagged prompts: this many held-out images "
                                          "per tag instead (small tags repeat prompts); null = off")
    eval_num_inference_steps: int = opt(25, POS_INT, "sampling steps of the held-out evaluation")
    eval_guidance_scale: float = opt(1.0, float_rule("a number >= 1", lambda v: v >= 1), "guidance of the evaluation")
    keep_checkpoints: int | None = opt(3, optional(POS_INT), "keep the newest N checkpoints; null = all")
    wandb: bool = opt(False, BOOL, "also log to Weights & Biases")


@dataclass
class DataConfig:
    train: str | None = opt(None, optional(STRING), "training prompts (.txt/.jsonl or built-in set); null = default")
    test: str | None = opt(None, optional(STRING), "held-out prompts, never optimised; null = default")
    shuffle: bool = opt(True, BOOL, "shuffle training prompts each epoch")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    reward: RewardConfig = section(RewardConfig)
    training: TrainingConfig = section(TrainingConfig)
    experiment: ExperimentConfig = section(ExperimentConfig)
    data: DataConfig = section(DataConfig)

    @property
    def bf16(self) -> bool:
        """Compute in bf16 (autocast forwards, a bf16 reference): `model.dtype: bfloat16` or bf16 mixed precision."""
        return self.model.dtype == "bfloat16" or self.training.mixed_precision == "bf16"


# keys of the official UDM-GRPO configs -> the end of the error sentence
_RENAMED = {
    "training.batch_size": "did you mean 'training.micro_batch_size'",
    "training.max_train_steps": "did you mean 'training.max_steps'",
    "training.gradient_accumulation_steps": "it is derived by the batch planner, remove it",
    "training.num_batches": "it is derived by the batch planner, remove it",
    "training.data_every": "did you mean 'training.updates_per_rollout'",
    "sampling.num_batches": "did you mean 'sampling.rollout.batch_size'",
    "train_dataloader": "set 'data.train' and 'sampling.num_prompts_per_step' instead",
    "optimizer": "set 'training.lr', 'training.betas' and 'training.weight_decay' instead",
    "pipeline": "set 'model.path' instead",
    "experiment.sample_every": "sample grids are written with every held-out evaluation (experiment.eval_every); "
                               "remove it",
}


def _section_cls(f: dataclasses.Field):
    """The dataclass of a nested section (annotations are strings under `from __future__ import annotations`)."""
    if not isinstance(f.type, str):
        return f.type
    return _SECTIONS.get(f.type) or globals()[f.type]


_SECTIONS: dict[str, type] = {}


def register_section(cls):
    """Make a section dataclass of another module (e.g. the tiny-world schema) resolvable by name."""
    _SECTIONS[cls.__name__] = cls
    return cls


def config_to_dict(config: Config) -> dict:
    """Plain nested dict of a Config (lists, dicts, scalars only)."""
    return dataclasses.asdict(config)


def _origin_text(key: str, origins: dict[str, str]) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return f" ({origins['.'.join(parts[:n])]})"
    return ""


def _fmt(value) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    return repr(value)


def _check_keys(data: Mapping, cls, prefix: str, where: str) -> dict:
    """Reject unknown keys (with a suggestion) and non-mapping sections; drop empty (null) sections."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            if dotted in _RENAMED:
                tail = _RENAMED[dotted]
            elif close:
                tail = f"did you mean '{prefix}{close[0]}'"
            else:
                tail = f"valid keys{' under ' + repr(prefix[:-1]) if prefix else ''} are: {', '.join(fields)}"
            end = "?" if tail.startswith("did you mean") else "."
            raise ConfigError(f"config key '{dotted}'{where} is unknown; {tail}{end}")
        sub = fields[key].metadata.get("rule") is None  # a nested section
        if sub and value is None:
            continue
        if sub:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}'{where} must be a mapping of keys, got {_fmt(value)}.")
            value = _check_keys(value, _section_cls(fields[key]), f"{dotted}.", where)
        out[key] = value
    return out


def _build(cls, data: Mapping, prefix: str, origins: dict[str, str]):
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        rule: Rule | None = f.metadata.get("rule")
        if rule is None:
            kwargs[f.name] = _build(_section_cls(f), data.get(f.name) or {}, f"{dotted}.", origins)
            continue
        value = data[f.name]
        if not rule.test(value):
            where = _origin_text(dotted, origins)
            raise ConfigError(f"config key '{dotted}' must be {rule.phrase}, got {_fmt(value)}{where}.")
        kwargs[f.name] = rule.convert(value)
    return cls(**kwargs)


def _cross_checks(cfg: Config, origins: dict[str, str]) -> None:
    r = cfg.reward
    if r.weights is not None and (isinstance(r.name, str) or len(r.weights) != len(r.name)):
        count = 1 if isinstance(r.name, str) else len(r.name)
        raise ConfigError(f"config key 'reward.weights' has {len(r.weights)} weights for {count} reward(s) in "
                          f"'reward.name'{_origin_text('reward.weights', origins)}; give one weight per listed reward.")
    s = cfg.sampling
    lo, hi = s.train_start
    steps = s.rollout.num_inference_steps
    if lo >= hi:
        raise ConfigError(
            f"config key 'sampling.train_start' must be [lo, hi) with lo < hi, got {[lo, hi]}"
            f"{_origin_text('sampling.train_start', origins)}."
        )
    if s.train_steps > steps:
        raise ConfigError(
            f"config key 'sampling.train_steps' {s.train_steps} exceeds 'sampling.rollout.num_inference_steps' "
            f"{steps}; train at most {steps} steps per rollout or sample with more steps."
        )
    last = hi - 1 + s.train_steps - 1
    if last >= steps:
        raise ConfigError(
            f"config keys 'sampling.train_start' {[lo, hi]} and 'sampling.train_steps' {s.train_steps} train rollout "
            f"steps up to index {last}, but 'sampling.rollout.num_inference_steps' is {steps} (indices 0-{steps - 1}); "
            f"lower train_start[1] to at most {steps - s.train_steps + 1} or raise num_inference_steps "
            f"to {last + 1}."
        )


def config_from_dict(data: Mapping, origins: dict[str, str] | None = None, where: str = "", schema=Config):
    """Validate a (possibly partial) nested mapping, fill defaults and return a `schema` instance."""
    origins = origins or {}
    checked = _check_keys(data, schema, "", where)
    merged = OmegaConf.create(_merge(config_to_dict(schema()), checked))
    try:
        plain = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        first = str(e).splitlines()[0]
        if "Unsupported interpolation type" in first:
            name = first.rsplit(" ", 1)[-1]
            raise ConfigError(
                f"config key '{key}'{_origin_text(key, origins)} uses the '${{{name}:...}}' resolver, "
                f"which udm-grpo does not register (it could run code); write the value out."
            ) from None
        raise ConfigError(f"config key '{key}'{_origin_text(key, origins)} could not be resolved: {first}.") from None
    cfg = _build(schema, plain, "", origins)
    if schema is Config:
        _cross_checks(cfg, origins)
    return cfg


def validate_config(config: Config) -> Config:
    """Re-check a Config edited in code; returns a normalised copy."""
    return config_from_dict(config_to_dict(config))


def _merge(base: Mapping, top: Mapping) -> dict:
    """`top` over `base`: two mappings merge key by key; anything else replaces what is below, whatever its
    shape (a list over a mapping is then named by validation instead of failing inside a merge)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _without_other_reward_params(merged: dict, layer: Mapping) -> dict:
    """reward.params and reward.weights belong to reward.name: a layer naming another reward drops them."""
    below, top = merged.get("reward"), layer.get("reward")
    if not (isinstance(below, Mapping) and isinstance(top, Mapping) and "name" in top and "name" in below):
        return merged
    if top["name"] == below["name"]:
        return merged
    return {**merged, "reward": {k: v for k, v in below.items() if k not in ("params", "weights")}}


def _flat_keys(data: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, Mapping):
            keys += _flat_keys(v, f"{prefix}{k}.")
    return keys


def _read_yaml(path: str) -> dict:
    from .textfiles import read_text

    text = read_text(path, "config file", ConfigError)
    try:
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{line}: {problem}.") from None
    data = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model, sampling, ...) at the top.")
    return data


def _parse_override(item: str) -> dict:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override '{item}' must look like key=value, e.g. sampling.train_steps=3.")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        first = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override '{item}' has a value that cannot be parsed: {first}.") from None


def load_config(path: str | os.PathLike | Sequence[str | os.PathLike | None] | None = None,
                overrides: list[str] | tuple[str, ...] = (), schema=Config, notes: Mapping[str, str] | None = None):
    """Defaults <- YAML file(s) <- dotted `key=value` overrides (later wins); a validated `schema` instance
    (default: the GRPO run `Config`). `path` is one file or a list of layers (None entries are skipped);
    `notes` adds a remark to a layer's name in error messages (e.g. "the default layer")."""
    origins: dict[str, str] = {}
    layers = []
    paths = path if isinstance(path, list | tuple) else [path]
    for item in paths:
        if item is None:
            continue
        item = os.fspath(item)
        data = _read_yaml(item)
        name = f"'{item}'" + (f" ({notes[item]})" if notes and item in notes else "")
        _check_keys(data, schema, "", f" in {name}")
        origins.update({k: f"set in {name}" for k in _flat_keys(data)})
        layers.append(data)
    for item in overrides:
        data = _parse_override(item)
        _check_keys(data, schema, "", f" in override '{item}'")
        origins.update({k: f"set by override '{item}'" for k in _flat_keys(data)})
        layers.append(data)
    merged: dict = {}
    for layer in layers:
        merged = _merge(_without_other_reward_params(merged, layer), layer)
    return config_from_dict(merged, origins, schema=schema)


def save_resolved(config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (creates parent folders)."""
    from .outputs import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config))))


def describe_schema() -> list[tuple[str, Any, str, str]]:
    """(dotted key, default, rule phrase, help) for every leaf key, for docs and `--help` output."""
    rows = []

    def walk(cls, obj, prefix):
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("rule")
            value = getattr(obj, f.name)
            if rule is None:
                walk(_section_cls(f), value, f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", value, rule.phrase, f.metadata.get("help", "")))

    walk(Config, Config(), "")
    return rows


def config_template(config: Config, title: str) -> str:
    """A commented YAML file of every key of `config`: its value, its meaning and, where it differs, the
    library default (the paper's recipe). Loading the text gives back `config`."""

    def scalar(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")

    paper = Config()
    lines = [f"# {line}".rstrip() for para in title.splitlines() for line in textwrap.wrap(para, 100) or [""]]
    for f in dataclasses.fields(Config):
        lines.append(f"{f.name}:")

        def walk(cls, obj, ref, indent):
            for g in dataclasses.fields(cls):
                value, default = getattr(obj, g.name), getattr(ref, g.name)
                if g.metadata.get("rule") is None:
                    lines.append(f"{indent}{g.name}:")
                    walk(_section_cls(g), value, default, indent + "  ")
                    continue
                note = g.metadata.get("help", "")
                if value != default:
                    note += f" (paper: {scalar(default)})"
                lines.append(f"{indent}{g.name}: {scalar(value)}".ljust(40) + f"  # {note}")

        walk(_section_cls(f), getattr(config, f.name), getattr(paper, f.name), "  ")
    return "\n".join(lines) + "\n"
