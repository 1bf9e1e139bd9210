"""Compare training recipes: each variant x seed trained into OUT/<variant>/seed-<s>/ with the same held-out
evaluation, resumable through a manifest, then summarised (`udm-grpo compare`; `udm-grpo ablate` is one use).

A variant is a config file layered on the base config and/or KEY=VALUE overrides. Layers, later wins: the base
layers <- the variant's file <- the shared overrides <- the variant's overrides <- `training.seed`,
`training.max_steps` and the run folder.

OUT/<name>.json (the manifest) records the definition: base layers, shared overrides, variants, seeds, steps.
Running the same definition again skips finished runs (an evaluation and a checkpoint at the last step),
resumes unfinished ones from their latest checkpoint, restarts the comparison's runs that have none, and
trains the missing ones; another definition is refused unless `force`, which retrains every run from
scratch. Folders of OUT that the definition does not name are left alone. The figures are read back from
each run's eval.jsonl (`collect`) into OUT/<name>.md, .png and the manifest's "results" (`write_report`).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,63}$")
RESERVED = {"checkpoints"}  # and the comparison's own files, see `check_variants`
# What the trainer's held-out evaluation depends on besides the weights: equal in every run, so the runs'
# figures compare (the evaluation seed is fixed by the trainer).
EVAL_KEYS = ("data.test", "experiment.num_eval_prompts", "experiment.eval_images_per_prompt",
             "experiment.eval_images_per_tag", "experiment.eval_num_inference_steps",
             "experiment.eval_guidance_scale", "sampling.rollout.height", "sampling.rollout.width",
             "sampling.rollout.guidance_trunc")


@dataclass(frozen=True)
class Variant:
    """A named recipe: `config` (a YAML file or packaged recipe, layered on the base) and `overrides`.
    `note` is only printed with its runs."""

    name: str
    config: str | None = None
    overrides: tuple[str, ...] = ()
    note: str = field(default="", compare=False)

    def definition(self) -> dict:
        return {"name": self.name, "config": self.config, "overrides": list(self.overrides)}


def check_variants(variants: list[Variant], report: str = "compare") -> None:
    """UserError (one sentence) unless there is a variant and every name is unique and a usable folder name."""
    if not variants:
        raise UserError("name at least one variant (--variant NAME [FILE.yaml] [KEY=VALUE ...]).")
    seen: dict[str, str] = {}
    reserved = RESERVED | {f"{report}.{ext}" for ext in ("md", "png", "json")}
    for v in variants:
        if not NAME.match(v.name) or v.name.lower() in reserved:
            raise UserError(f"variant name {v.name!r} cannot be a folder name: use up to 64 letters, digits and '_ + . "
                            f"-', starting with a letter, digit, '_' or '+', and not {', '.join(sorted(reserved))}.")
        if v.name.lower() in seen:
            raise UserError(f"variant name {v.name!r} is given twice (as {seen[v.name.lower()]!r} before); names must "
                            "differ, also in letter case.")
        seen[v.name.lower()] = v.name


def definition(base: list, overrides: list[str], variants: list[Variant], seeds: list[int], steps: int) -> dict:
    """The manifest's record of what the comparison trains."""
    return {"base": [str(p) for p in base if p is not None], "overrides": list(overrides),
            "variants": [v.definition() for v in variants], "seeds": list(seeds), "steps": steps}


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two definitions, each as a short phrase ('steps 2, now 3')."""
    found = [f"{label} {old.get(key)!r}, now {new[key]!r}" for key, label in
             (("base", "base config"), ("overrides", "shared overrides"), ("steps", "steps"), ("seeds", "seeds"))
             if old.get(key) != new[key]]
    before = {v.get("name"): v for v in old.get("variants") or [] if isinstance(v, dict)}
    now = {v["name"]: v for v in new["variants"]}
    if added := [n for n in now if n not in before]:
        found.append(f"variant(s) {', '.join(added)} added")
    if dropped := [n for n in before if n not in now]:
        found.append(f"variant(s) {', '.join(map(str, dropped))} dropped")
    for name in now:
        if name in before and before[name] != now[name]:
            found.append(f"variant {name} was {_describe(before[name])}, now {_describe(now[name])}")
    return found


def _describe(v: dict) -> str:
    return " ".join([v.get("config") or "", *(v.get("overrides") or [])]).strip() or "(the base config)"


@dataclass
class Run:
    variant: Variant
    seed: int
    folder: Path
    config: object
    action: str  # "done", "resume", "restart" or "start"
    step: int = 0


def _plan(folder: Path, steps: int, ours: bool, force: bool) -> tuple[str, int]:
    """What to do with a run folder: (action, checkpoint step). `ours`: the manifest records this comparison."""
    from ..grpo.checkpoint import latest_checkpoint
    from ..grpo.logger import read_jsonl
    from ..outputs import holds_files

    if force or not holds_files(folder):
        return "start", 0
    if not ours:
        raise UserError(f"run folder {folder} already holds a run that no manifest of this comparison records; "
                        "pass --force to replace it, or choose another folder with -o.")
    if (folder / "checkpoints" / f"step-{steps:06d}" / "trainer_state.json").is_file() and \
            any(r.get("step") == steps for r in read_jsonl(folder / "eval.jsonl")):
        return "done", steps  # an evaluation and a checkpoint at the last step
    latest = latest_checkpoint(folder / "checkpoints")
    if latest is None:
        return "restart", 0
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    if step >= steps:
        raise UserError(f"run folder {folder} has its checkpoint of step {steps} but no evaluation at that step "
                        f"(stopped during its last evaluation); remove {latest} to train its last steps again.")
    return "resume", step


def plan_runs(base: list, overrides: list[str], variants: list[Variant], seeds: list[int], steps: int,
              output: Path, ours: bool, force: bool) -> list[Run]:
    """Every run's config and action; all run folders checked before anything trains."""
    from ..config import load_config
    from ..grpo.checkpoint import latest_checkpoint
    from ..grpo.run_folder import check_run_dir

    runs, first = [], None
    for v in variants:
        for seed in seeds:
            folder = output / v.name / f"seed-{seed}"
            cfg = load_config([*base, v.config], [*overrides, *v.overrides, f"training.seed={seed}",
                                                  f"training.max_steps={steps}", f"experiment.output_dir={folder}"])
            if not cfg.experiment.eval_every:
                raise UserError(f"variant {v.name}: experiment.eval_every is 0, but a comparison reads the held-out "
                                f"evaluation; set it (e.g. experiment.eval_every={steps}).")
            signature = {k: functools.reduce(getattr, k.split("."), cfg) for k in EVAL_KEYS}
            first = first or (v.name, signature)
            if diff := next((k for k in EVAL_KEYS if signature[k] != first[1][k]), None):
                raise UserError(f"variant {v.name} changes the held-out evaluation ({diff} {signature[diff]!r}, "
                                f"{first[0]} has {first[1][diff]!r}), so its figures would not compare; keep the "
                                "evaluation keys equal.")
            action, step = _plan(folder, steps, ours, force)
            if action != "done":
                resume = latest_checkpoint(folder / "checkpoints") if action == "resume" else None
                check_run_dir(folder, resume, force or action == "restart", [cfg.model.path])
            runs.append(Run(v, seed, folder, cfg, action, step))
    return runs


def read_manifest(path: Path) -> dict | None:
    """The manifest at `path` (None when absent); UserError when it is not a JSON object."""
    from ..textfiles import read_text

    if not path.exists():
        return None
    try:
        data = json.loads(read_text(path, "comparison manifest"))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a comparison manifest (a JSON object); pass --force to replace it.")
    return data


def run_comparison(base, overrides: list[str], variants: list[Variant], output: Path, steps: int,
                   seeds: list[int] = (0,), force: bool = False, metric: str = "strict", make_trainer=None,
                   report: str = "compare", title: str = "Comparison") -> dict:
    """Train every variant x seed into `output/<variant>/seed-<s>` (see the module docstring), then write
    output/<report>.md, .png and .json. `base`: the base config layers (a path, a list, or None for the
    schema defaults). `make_trainer(config)` builds each trainer (default `UDMGRPOTrainer(config)`).

    Returns the results (`collect`) with "interrupted": True when a run was stopped with
    Ctrl-C (its checkpoint saved; the same call resumes it; no report is written then)."""
    from ..grpo.trainer import UDMGRPOTrainer
    from ..outputs import FolderLock, check_not_in_use, write_text_atomic

    output = Path(output)
    base = list(base) if isinstance(base, list | tuple) else [base]
    seeds = list(dict.fromkeys(seeds))
    check_variants(variants, report)
    check_not_in_use(output)
    manifest_path = output / f"{report}.json"
    new = definition(base, overrides, variants, seeds, steps)
    old = None if force else read_manifest(manifest_path)
    if old is not None and (diffs := differences(old, new)):
        raise UserError(f"{manifest_path} records another comparison ({'; '.join(diffs)}); rerun it as it was to "
                        "resume it, choose another folder with -o, or pass --force to replace its runs.")
    runs = plan_runs(base, overrides, variants, seeds, steps, output, old is not None, force)
    with FolderLock(output):
        write_text_atomic(manifest_path, json.dumps({**new, "results": None}, indent=1) + "\n")
        for i, run in enumerate(runs, 1):
            what = {"done": "finished earlier, skipped", "resume": f"resuming from step {run.step}",
                    "restart": "no checkpoint to resume, training from step 0", "start": "training"}[run.action]
            print(f"{report} run {i}/{len(runs)}: {run.variant.name} seed {run.seed}{run.variant.note}: {what}",
                  flush=True)
            if run.action == "done":
                continue
            trainer = (make_trainer or UDMGRPOTrainer)(run.config)
            result = trainer.train(resume="latest" if run.action == "resume" else None,
                                   force=force or run.action == "restart")
            if result.get("interrupted"):
                print(f"{report}: interrupted; {run.folder} saved its checkpoint of step {result['step']}; run the "
                      "same command again to resume.", flush=True)
                return {"interrupted": True}
        results = collect(output, variants, seeds, steps, metric)
        write_report(results, new, output, report, title)
        write_text_atomic(manifest_path, json.dumps({**new, "results": results}, indent=1) + "\n")
    return {**results, "interrupted": False}


# ---- results: read back from each run's eval.jsonl ----------------------------------------------------------
IMAGES, MINUTES = "progress/rollout_images", "progress/minutes"
ALSO = ("score", "exact", "blobs")  # held-out figures shown beside the metric when the reward logs them


def _metric_key(metric: str, finals: list[dict]) -> tuple[str, list[str]]:
    """The eval.jsonl key of `metric` ('eval/strict' falls back to 'eval/reward'), with a note when it fell back."""
    key = f"eval/{metric}"
    if all(isinstance(r.get(key), int | float) for r in finals):
        return key, []
    if metric == "strict" and all(isinstance(r.get("eval/reward"), int | float) for r in finals):
        return "eval/reward", ["No run logs eval/strict (its reward has no strict correctness), so the metric is "
                               "eval/reward, the mean held-out reward (it has no 95% interval of its own)."]
    names = sorted({k[5:] for r in finals for k in r if k.startswith("eval/") and "/" not in k[5:]})
    raise UserError(f"--metric {metric}: not in every run's last evaluation; choose one of {', '.join(names)}.")


def _progress(folder: Path, evals: dict[int, dict]) -> tuple[dict, dict, list[str]]:
    """Rollout images and wall minutes at each evaluated step (the trainer's progress/ keys, else estimates)."""
    import yaml

    from ..grpo.logger import read_jsonl
    from ..textfiles import read_text

    notes = []
    if all(isinstance(r.get(IMAGES), int | float) for r in evals.values()):
        images = {s: r[IMAGES] for s, r in evals.items()}
    else:
        try:
            sampling = yaml.safe_load(read_text(folder / "config.yaml", "run config"))["sampling"]
            per_step = sampling["num_prompts_per_step"] * sampling["num_images_per_prompt"]
        except (UserError, TypeError, KeyError, yaml.YAMLError):
            per_step = float("nan")
        images = {s: s * per_step for s in evals}
        notes.append("images")
    if all(isinstance(r.get(MINUTES), int | float) for r in evals.values()):
        minutes = {s: r[MINUTES] for s, r in evals.items()}
    else:
        seconds = sorted((r["step"], r.get("time/total") or 0.0) for r in read_jsonl(folder / "metrics.jsonl")
                         if isinstance(r.get("step"), int))
        minutes = {s: sum(t for k, t in seconds if k <= s) / 60 for s in evals}
        notes.append("minutes")
    return images, minutes, notes


def _interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95% t half-width over the values: t(0.975, n - 1) s / sqrt(n); nan for one value)."""
    import math
    import statistics

    from scipy.stats import t

    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    n = len(values)
    return mean, float(t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)) if n > 1 else math.nan


def collect(output: Path, variants: list[Variant], seeds: list[int], steps: int, metric: str = "strict") -> dict:
    """Per run, per variant and per evaluation (the plot's curves) figures of a finished comparison."""
    import math

    from ..grpo.logger import read_jsonl

    evals, progress, fallback = {}, {}, {"images": 0, "minutes": 0}
    for v in variants:
        for s in seeds:
            folder = output / v.name / f"seed-{s}"
            rows = {r["step"]: r for r in read_jsonl(folder / "eval.jsonl") if isinstance(r.get("step"), int)}
            if steps not in rows:
                raise UserError(f"run folder {folder} has no held-out evaluation at step {steps}; run the same "
                                "comparison again to finish it.")
            evals[v.name, s] = dict(sorted(rows.items()))
            images, minutes, missing = _progress(folder, evals[v.name, s])
            progress[v.name, s] = images, minutes
            for what in missing:
                fallback[what] += 1
    key, notes = _metric_key(metric, [e[steps] for e in evals.values()])
    nan = math.nan
    runs, summary, curves = [], [], {}
    for v in variants:
        mine = []
        for s in seeds:
            e, (images, minutes) = evals[v.name, s], progress[v.name, s]
            before, after = _num(e.get(0, {}).get(key)), _num(e[steps][key])
            also = {n: [_num(e.get(0, {}).get(f"eval/{n}")), _num(e[steps][f"eval/{n}"])] for n in ALSO
                    if f"eval/{n}" in e[steps] and f"eval/{n}" != key}
            mine.append({"variant": v.name, "seed": s, "before": before, "after": after,
                         "after_ci95": _num(e[steps].get(f"eval/ci95/{key[5:]}")), "gain": after - before,
                         "rollout_images": images[steps], "minutes": minutes[steps], "also": also})
        runs += mine
        gain, half = _interval([r["gain"] for r in mine])
        summary.append({"variant": v.name, "seeds": len(seeds), "mean_gain": gain, "gain_ci95": half,
                        "min_gain": min((r["gain"] for r in mine if math.isfinite(r["gain"])), default=nan),
                        "mean_rollout_images": sum(r["rollout_images"] for r in mine) / len(mine),
                        "mean_minutes": sum(r["minutes"] for r in mine) / len(mine),
                        "also": {n: sum(r["also"][n][1] for r in mine) / len(mine) for n in ALSO
                                 if all(n in r["also"] for r in mine)}})
        common = sorted(set.intersection(*(set(evals[v.name, s]) for s in seeds)))
        curves[v.name] = []
        for step in common:
            mean, half = _interval([_num(evals[v.name, s][step].get(key)) for s in seeds])
            if len(seeds) == 1:
                half = _num(evals[v.name, seeds[0]][step].get(f"eval/ci95/{key[5:]}"))
            curves[v.name].append({"step": step, "mean": mean, "half_width": half,
                                   "rollout_images": sum(progress[v.name, s][0][step] for s in seeds) / len(seeds),
                                   "minutes": sum(progress[v.name, s][1][step] for s in seeds) / len(seeds)})
    if fallback["images"]:
        notes.append(f"{fallback['images']} run(s) log no {IMAGES}: their rollout images are estimated as step x "
                     "prompts per step x images per prompt from their config.yaml (extra rollouts not counted).")
    if fallback["minutes"]:
        notes.append(f"{fallback['minutes']} run(s) log no {MINUTES}: their minutes are the sum of the logged step "
                     "times (time/total), which leaves out steps that were not logged.")
    return _clean({"metric": key, "runs": runs, "variants": summary, "curves": curves, "notes": notes})


def _num(x) -> float:
    return float(x) if isinstance(x, int | float) else float("nan")


def _clean(x):
    """NaN and infinities as None (valid JSON)."""
    import math

    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _f(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_report(results: dict, defined: dict, output: Path, report: str, title: str) -> None:
    """output/<report>.md (tables and notes) and output/<report>.png (the curves), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure, write_text_atomic

    name, steps, seeds = results["metric"][5:], defined["steps"], defined["seeds"]
    lines = [f"# {title}: {len(defined['variants'])} variant(s) x {len(seeds)} seed(s), {steps} steps each", "",
             f"- base config: {' <- '.join(defined['base']) or 'the schema defaults'}",
             f"- shared overrides: {' '.join(defined['overrides']) or '(none)'}"]
    lines += [f"- variant {v['name']}: {_describe(v)}" for v in defined["variants"]]
    also = [n for n in ALSO if all(n in r["also"] for r in results["runs"])]
    lines += ["", "## Runs", "", f"| variant | seed | held-out {name} before -> after (+- 95%) | gain | "
              + "".join(f"{n} before -> after | " for n in also) + "rollout images | wall minutes |",
              "|---|---|---|---|" + "---|" * len(also) + "---|---|"]
    lines += [f"| {r['variant']} | {r['seed']} | {_f(r['before'])} -> {_f(r['after'])}"
              + ("" if r["after_ci95"] is None else f" +-{r['after_ci95']:.3f}") + f" | {_f(r['gain'], '+.3f')} | "
              + "".join(f"{_f(r['also'][n][0])} -> {_f(r['also'][n][1])} | " for n in also)
              + f"{_f(r['rollout_images'], ',.0f')} | {_f(r['minutes'], '.2f')} |" for r in results["runs"]]
    lines += ["", "## Variants", "", "| variant | seeds | mean gain [95% interval over seeds] | min seed gain | "
              + "".join(f"mean {n} after | " for n in also) + "mean rollout images | mean wall minutes |",
              "|---|---|---|---|" + "---|" * len(also) + "---|---|"]
    for v in results["variants"]:
        m, h = v["mean_gain"], v["gain_ci95"]
        ci = "n/a: one seed" if h is None else f"{m - h:+.3f}, {m + h:+.3f}"
        lines.append(f"| {v['variant']} | {v['seeds']} | {_f(m, '+.3f')} [{ci}] | {_f(v['min_gain'], '+.3f')} | "
                     + "".join(f"{_f(v['also'].get(n))} | " for n in also)
                     + f"{_f(v['mean_rollout_images'], ',.0f')} | {_f(v['mean_minutes'], '.2f')} |")
    lines += ["", "Notes:", "",
              f"- Held-out {name}: each run's own evaluation by the trainer (the same held-out prompts, sampling "
              f"settings and evaluation seed in every run) at step 0 (before) and step {steps} (after); +- is that "
              "evaluation's 95% half-width (Agresti-Coull for 0/1 values, else 1.96 s / sqrt(n)). Gain = after - "
              "before.",
              "- The interval over seeds is mean +- t(0.975, n - 1) s / sqrt(n), with s the sample standard deviation "
              "(ddof 1) of the n seeds' gains (Student's t); it is not defined for one seed.",
              f"- {report}.png: held-out {name}, the mean over seeds at each evaluation, against rollout images "
              "consumed and wall minutes of training (each the mean over seeds); the shaded band is the 95% "
              "t-interval over seeds at each evaluation (the seed spread), or with one seed that evaluation's own "
              "95% interval.", f"- Wall minutes: {MINUTES}, the time spent in training steps (rollouts, rewards, "
              "updates) since step 0 across resumes; evaluations and checkpoints are not counted.",
              *(f"- {n}" for n in results["notes"])]
    write_text_atomic(output / f"{report}.md", "\n".join(lines) + "\n")
    curves = results["curves"]
    rows = -(-len(curves) // 3)  # one shared legend of 3 columns under the plots
    height = 3.8 + 0.2 * rows
    fig, axes = plt.subplots(1, 2, figsize=(11, height))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    for (variant, points), colour in zip(curves.items(), itertools.cycle(colours)):
        y = [p["mean"] for p in points]
        for ax, x_key in zip(axes, ("rollout_images", "minutes")):
            x = [p[x_key] for p in points]
            ax.plot(x, y, "o-", markersize=3, color=colour, label=variant)
            if all(p["half_width"] is not None for p in points):
                ax.fill_between(x, [m - p["half_width"] for m, p in zip(y, points)],
                                [m + p["half_width"] for m, p in zip(y, points)], color=colour,
                                alpha=0.2 if len(curves) <= 4 else 0.08)
    for ax, label in zip(axes, ("rollout images consumed", "wall minutes of training")):
        ax.set(xlabel=label, ylabel=f"held-out {name}", title=f"held-out {name} vs {label.split(' of')[0]}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    band = "95% t-interval over seeds" if len(seeds) > 1 else "the evaluation's own 95% interval"
    fig.suptitle(f"{title}: mean over {len(seeds)} seed(s), band: {band}", fontsize=10)
    fig.tight_layout(rect=(0, (0.17 * rows + 0.1) / height, 1, 1))
    save_figure(fig, output / f"{report}.png")
    plt.close(fig)
