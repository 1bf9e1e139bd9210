"""Loading a run config: YAML layers and dotted `key=value` overrides merged onto the schema's defaults with
OmegaConf (plain `${a.b}` interpolation only: no `eval` or other custom resolvers), every key and value checked
(unknown keys with a suggestion, leaf rules, the cross-field checks of `Config`), each problem one ConfigError
sentence naming the key and the file or override that set it; writing a resolved config and its commented
template."""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from .rules import Rule, offload_problem
from .schema import Config

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
    "reward.global_std": "it became reward.scale_rewards (global_std: true = scale_rewards: batch)",
    "experiment.sample_every": "sample grids are written with every held-out evaluation (experiment.eval_every); "
                               "remove it",
}


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_cls(cls, f: dataclasses.Field) -> type:
    """The dataclass of the nested section `f` of `cls`, from the type hints of `cls` (annotations are strings
    under `from __future__ import annotations`; its module resolves them)."""
    return _hints(cls)[f.name]


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
            value = _check_keys(value, _section_cls(cls, fields[key]), f"{dotted}.", where)
        out[key] = value
    return out


def _build(cls, data: Mapping, prefix: str, origins: dict[str, str]):
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        rule: Rule | None = f.metadata.get("rule")
        if rule is None:
            kwargs[f.name] = _build(_section_cls(cls, f), data.get(f.name) or {}, f"{dotted}.", origins)
            continue
        value = data[f.name]
        if not rule.test(value):
            where = _origin_text(dotted, origins)
            raise ConfigError(f"config key '{dotted}' must be {rule.phrase}, got {_fmt(value)}{where}.")
        kwargs[f.name] = rule.convert(value)
    return cls(**kwargs)


def _cross_checks(cfg: Config, origins: dict[str, str]) -> None:
    t = cfg.training
    problem = offload_problem(t.engine, t.zero_stage, t.offload_optimizer, t.offload_param)
    if problem:
        raise ConfigError(problem)
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
    from ..textfiles import read_text

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
    from ..outputs import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config))))


def describe_schema() -> list[tuple[str, Any, str, str]]:
    """(dotted key, default, rule phrase, help) for every leaf key, for docs and `--help` output."""
    rows = []

    def walk(cls, obj, prefix):
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("rule")
            value = getattr(obj, f.name)
            if rule is None:
                walk(_section_cls(cls, f), value, f"{prefix}{f.name}.")
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
                    walk(_section_cls(cls, g), value, default, indent + "  ")
                    continue
                note = g.metadata.get("help", "")
                if value != default:
                    note += f" (paper: {scalar(default)})"
                lines.append(f"{indent}{g.name}: {scalar(value)}".ljust(40) + f"  # {note}")

        walk(_section_cls(Config, f), getattr(config, f.name), getattr(paper, f.name), "  ")
    return "\n".join(lines) + "\n"
