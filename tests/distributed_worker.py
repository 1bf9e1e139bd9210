"""Run by tests/test_distributed.py under torchrun: a few UDM-GRPO steps on the tiny random pipeline.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.distributed_worker OUT RECIPE \
        [ENGINE [CHECKPOINT]]

ENGINE: ddp (default), fsdp, or deepspeed-<ZeRO stage>, each optionally with +KEY (training.KEY: true, e.g.
+offload_optimizer). RECIPE "lora" trains LoRA adapters ("lora-bf16" on a bf16 base), "bf16" the full model in
bf16 compute. CHECKPOINT: resume from it and train one more step.

With UDM_GRPO_ENGINE_STATE=1 in the environment the run takes three steps and each process writes
OUT/state.rank<R>.json: the bytes of the distinct storages the engine holds by category during the first update
(its backwards and the moment before its optimizer step) and after it and `zero_grad`; see `measure_update`.

Randomness is made independent of the process layout (each image's rollout and training states drawn
with generators seeded by its global index and the step; the Reduced-Step start drawn alike on every
process), so that a run on N processes must reproduce the single-process run: the same images, the same
group advantages (gathered over processes), the same averaged gradient. The last process gets a
non-finite loss on its second micro-batch of step 2 (every process must skip that step together), and
the held-out evaluation has fewer prompts than processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from udm_grpo.commands.train import finish_processes
from udm_grpo.grpo import trainer as trainer_mod
from udm_grpo.grpo.rollout import Rollout, rollout
from udm_grpo.grpo.states import TrainingStates, pick_train_steps

from .test_trainer import Brightness, make_config, trainer
from .test_variants import HalfConstant

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
RECIPES = {
    "simplified": {"sampling.train_start": [0, 1], "sampling.forward_process": False},
    "default": {"sampling.train_start": [0, 3], "sampling.forward_process": True},  # the paper's switches
    "lora": {"sampling.train_start": [0, 3], "sampling.forward_process": True,
             "model.lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
}
RECIPES["lora-bf16"] = {**RECIPES["lora"], "model.dtype": "bfloat16"}  # a bf16 frozen base, float32 adapters
RECIPES["bf16"] = {**RECIPES["default"], "model.dtype": "bfloat16"}  # float32 masters, bf16 compute
RECIPES["variants"] = {**RECIPES["default"], "training.reuse_rollouts": 2, "data.curriculum": True,  # issue 25's keys
                       "reward.per_prompt_stats": True, "reward.importance_sampling_level": "token",
                       "reward.ratio_clipping": 0.2, "reward.ratio_clipping_high": 0.3, "reward.scale_rewards": "batch"}
RECIPES["dynamic"] = {**RECIPES["default"], "sampling.dynamic_sampling": True}  # with a reward of equal-score groups
MEASURE_STATE = os.environ.get("UDM_GRPO_ENGINE_STATE") == "1"


def layout_free_rollout():
    calls = {"n": 0}

    def run(pipe, logits, prompts, metadata, options, generator):
        per = len(prompts)
        calls["n"] += 1
        if not per:
            return rollout(pipe, logits, prompts, metadata, options, generator)
        parts = []
        for i in range(per):
            gen = torch.Generator().manual_seed(10_000 * calls["n"] + RANK * per + i)
            parts.append(rollout(pipe, logits, prompts[i:i + 1], metadata[i:i + 1], options, gen))
        return Rollout.cat(parts)

    return run


def layout_free_states():
    calls = {"n": 0}

    def pick(train_start, train_steps, generator):
        return pick_train_steps(train_start, train_steps, torch.Generator().manual_seed(777 + calls["n"]))

    def states(ro, steps, path, forward_process, clean_response, generator):
        calls["n"] += 1
        per = len(ro)
        gens = [torch.Generator().manual_seed(20_000 * calls["n"] + RANK * per + i) for i in range(per)]
        out = []
        for k in steps:
            t = float(ro.t[k])
            x = (torch.cat([path.add_noise(ro.final[i:i + 1], t, g) for i, g in enumerate(gens)])
                 if forward_process else ro.states[k])
            out.append(TrainingStates(k, t, x, ro.final if clean_response else ro.predictions[k]))
        return out

    return pick, states


def nan_on_last_process(tr):
    real, seen = trainer_mod.grpo_loss, {"step": -1, "micro": 0}

    def loss(*args, **kwargs):
        value, metrics = real(*args, **kwargs)
        seen["micro"] = seen["micro"] + 1 if seen["step"] == tr.step else 0
        seen["step"] = tr.step
        if RANK == WORLD - 1 and tr.step == 1 and seen["micro"] == 1:
            value = value * float("nan")
        return value, metrics

    return loss


def engine_overrides(engine: str) -> dict:
    """ENGINE[-STAGE][+training key set to true]..., e.g. deepspeed-3+offload_param."""
    engine, *switches = engine.split("+")
    kind, _, stage = engine.partition("-")
    return {"training.engine": kind, **({"training.zero_stage": int(stage)} if stage else {}),
            **{f"training.{key}": True for key in switches}}


def engine_facts(engine) -> dict:
    """What the engine set up, as the main process sees it: the optimizer's class, the elements it optimises on
    this process against those trained and all of the model's, and the offload DeepSpeed / FSDP2 received."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # accelerate's and ZeRO's wrapped optimizer
    size = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731  (ZeRO-3 partitions hold ds_numel)
    local = lambda p: p.to_local().numel() if hasattr(p, "to_local") else p.numel()  # noqa: E731  (FSDP2 shards)
    facts = {"optimizer": type(opt).__name__, "optimized": sum(local(p) for g in opt.param_groups for p in g["params"]),
             "trained": sum(size(p) for p in engine.params()), "total": sum(size(p) for p in engine.inner.parameters()),
             "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in engine.inner.parameters()})}
    module = engine.module
    if hasattr(module, "zero_cpu_offload"):  # DeepSpeed's own reading of its config
        param = module.zero_offload_param()
        facts.update(offload_optimizer=bool(module.zero_cpu_offload()),
                     offload_param=None if param is None else str(getattr(param.device, "value", param.device)))
    if hasattr(engine, "offload_policy"):
        block = next(m for m in module.modules() if hasattr(m, "_get_fsdp_state") and m is not module)
        facts["offload_policy"] = type(block._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
    return facts


def _category(path: str) -> str:
    """A DeepSpeed buffer's category from its attribute path (bit16 / fp16 / lp: the module's weights)."""
    path = path.lower()
    if "grad" in path or "ipg" in path:
        return "gradients"
    if "fp32" in path:
        return "masters"
    return "weights" if "16" in path or "lp_param" in path else "other"


def held_storages(engine, reference=None) -> dict[int, tuple[str, str, int, object]]:
    """The storages the engine holds on this process: data_ptr -> (category, where found, bytes, weak reference),
    each storage once (whole, alignment padding included), first found first: masters (the tensors the optimizer
    steps), weights (the module's parameters not stepped: a compute-dtype copy or a frozen base; ZeRO-3's
    partitions `ds_tensor`), gathered (parameters held whole beside their shards: ZeRO-3's, FSDP2's), gradients
    (`.grad`), optimizer (AdamW state), then the tensors in DeepSpeed's optimizer by attribute name (`_category`),
    and the frozen reference."""
    from torch.multiprocessing.reductions import StorageWeakRef

    found: dict[int, tuple[str, str, int, object]] = {}

    def add(category: str, where: str, t) -> None:
        if not torch.is_tensor(t) or t.is_meta:  # meta tensors (DeepSpeed's shape records) hold no memory
            return
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()  # FSDP2: the local shard
        if storage.nbytes() and storage.data_ptr() not in found:
            found[storage.data_ptr()] = (category, where, storage.nbytes(), StorageWeakRef(storage))

    def walk(obj, path: str, depth: int, seen: set) -> None:
        if torch.is_tensor(obj):
            add(_category(path), path, obj)
            return
        if depth > 5 or id(obj) in seen or isinstance(obj, torch.nn.Module):
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            items = [(path, v) for v in obj.values()]
        elif isinstance(obj, (list, tuple)):
            items = [(path, v) for v in obj]
        elif type(obj).__module__.startswith("deepspeed"):
            items = [(f"{path}.{k}" if path else k, v) for k, v in vars(obj).items()]
        else:
            return
        for where, value in items:
            walk(value, where, depth + 1, seen)

    wrapper = engine.optimizer
    opt = getattr(wrapper, "optimizer", wrapper)  # accelerate's or DeepSpeed's wrapped torch optimizer
    stepped = [p for g in opt.param_groups for p in g["params"]]
    module = list(engine.inner.parameters())
    for p in stepped:
        add("masters", "optimizer's parameters", p)
    fsdp = any(hasattr(p, "to_local") for p in stepped)
    for p in module:  # FSDP2 swaps a unit's gathered parameters into the module while it computes
        if not fsdp or hasattr(p, "to_local"):
            add("weights", "module's parameters", getattr(p, "ds_tensor", p))
    for p in module:
        add("gathered", "parameters held whole (ZeRO-3's gathered and persistent, FSDP2's unsharded)", p)
    for p in stepped + module:
        add("gradients", ".grad", p.grad)
    for state in opt.state.values():
        for key, value in state.items():
            add("optimizer", f"AdamW {key}", value)
    if wrapper is not opt and type(wrapper).__module__.startswith("deepspeed"):
        walk(wrapper, "", 0, set())
    for p in reference.parameters() if reference is not None else ():
        add("reference", "frozen reference", p)
    return found


def measure_update(tr, out: Path) -> None:
    """Wrap the engine's `backward` and `step`: the storages held after each backward of the second completed
    update (the steady state) and just before its optimizer step ("update": the point with the most bytes) and
    after the step and `zero_grad` ("outside"), by category, to OUT/state.rank<R>.json. A storage seen during the
    update that no reachable place holds afterwards yet is still alive (DDP's gradient buckets, held by its
    reducer) counts as held outside the update."""
    engine = tr.engine
    real_step, real_backward = engine.step, engine.backward
    points: list[dict] = []
    steps: list = []

    def totals(found: dict) -> tuple[dict, dict]:
        by_category: dict[str, int] = {}
        by_place: dict[str, int] = {}
        for category, where, size, _ in found.values():
            by_category[category] = by_category.get(category, 0) + size
            by_place[f"{category}: {where}"] = by_place.get(f"{category}: {where}", 0) + size
        return by_category, by_place

    def backward(loss, last):
        hooks = [p.register_post_accumulate_grad_hook(lambda _: points.append(held_storages(engine, tr.reference)))
                 for p in engine.params()]  # inside the backward: DeepSpeed's reduce buckets
        real_backward(loss, last)
        for hook in hooks:
            hook.remove()
        points.append(held_storages(engine, tr.reference))

    def step(lr):
        if not steps:  # the first update makes the gradients' storage: measure the steady state, the second
            steps.append(real_step(lr))
            points.clear()
            return steps[0]
        points.append(held_storages(engine, tr.reference))
        norm = real_step(lr)
        engine.zero_grad()
        after = held_storages(engine, tr.reference)
        for point in points:
            for ptr, (category, where, _, ref) in point.items():
                if ptr not in after and not ref.expired():  # its size now: FSDP2 frees by resizing to 0
                    size = torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
                    if size:
                        after[ptr] = (category, f"{where}, held by the engine", size, ref)
        update = max(points, key=lambda found: sum(size for _, _, size, _ in found.values()))
        (update, update_places), (outside, outside_places) = totals(update), totals(after)
        count = lambda ps: sum(getattr(p, "ds_numel", None) or p.numel() for p in ps)  # noqa: E731
        (out / f"state.rank{RANK}.json").write_text(json.dumps({
            "rank": RANK, "world": WORLD, "trained": count(engine.params()), "total": count(engine.inner.parameters()),
            "update": update, "outside": outside, "places": {"update": update_places, "outside": outside_places},
            "points": [totals(point)[0] for point in points]}))
        engine.step, engine.backward = real_step, real_backward
        return norm

    engine.step, engine.backward = step, backward


def main(out: Path, recipe: str, engine: str = "ddp", resume: str | None = None) -> None:
    torch.set_num_threads(1)
    trainer_mod.rollout = layout_free_rollout()
    trainer_mod.pick_train_steps, trainer_mod.training_states = layout_free_states()
    cfg = make_config(out, **RECIPES[recipe], **{
        "training.max_steps": 3, "experiment.save_every": 0, "training.lr": 1e-3,
        "experiment.eval_every": 3, "experiment.num_eval_prompts": 1, **engine_overrides(engine)})
    if resume:
        cfg.training.max_steps, cfg.experiment.resume_from_checkpoint = 4, resume
    if MEASURE_STATE:
        cfg.training.max_steps = 3  # the second is skipped (a non-finite loss): the third update is measured
    tr = trainer(cfg, HalfConstant() if recipe == "dynamic" else Brightness())
    trainer_mod.grpo_loss = nan_on_last_process(tr)
    if MEASURE_STATE:
        measure_update(tr, out)
    tr.train()
    if RANK == 0:
        (out / "engine.json").write_text(json.dumps(engine_facts(tr.engine)))
    finish_processes(tr.acc)  # as `udm-grpo train` does


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
