"""Run by tests/test_distributed.py under torchrun: a few UDM-GRPO steps on the tiny random pipeline.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.distributed_worker OUT RECIPE \
        [ENGINE [CHECKPOINT]]

ENGINE: ddp (default), fsdp, or deepspeed-<ZeRO stage>, each optionally with +KEY (training.KEY: true, e.g.
+offload_optimizer). RECIPE "lora" trains LoRA adapters ("lora-bf16" on a bf16 base). CHECKPOINT: resume from
it and train one more step.

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

import numpy as np
import torch

from udm_grpo.commands.train import finish_processes
from udm_grpo.grpo import trainer as trainer_mod
from udm_grpo.grpo.rollout import Rollout, rollout
from udm_grpo.grpo.states import TrainingStates, pick_train_steps

from .test_trainer import Brightness, make_config, trainer

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
RECIPES = {
    "simplified": {"sampling.train_start": [0, 1], "sampling.forward_process": False},
    "default": {"sampling.train_start": [0, 3], "sampling.forward_process": True},  # the paper's switches
    "lora": {"sampling.train_start": [0, 3], "sampling.forward_process": True,
             "model.lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
}
RECIPES["lora-bf16"] = {**RECIPES["lora"], "model.dtype": "bfloat16"}  # a bf16 frozen base, float32 adapters


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
        first = parts[0]
        return Rollout(prompts, metadata, torch.cat([p.text_ids for p in parts]), None, first.grid,
                       torch.cat([p.final for p in parts]), torch.cat([p.states for p in parts], 1),
                       torch.cat([p.predictions for p in parts], 1), first.t, np.concatenate([p.images for p in parts]))

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


def main(out: Path, recipe: str, engine: str = "ddp", resume: str | None = None) -> None:
    torch.set_num_threads(1)
    trainer_mod.rollout = layout_free_rollout()
    trainer_mod.pick_train_steps, trainer_mod.training_states = layout_free_states()
    cfg = make_config(out, **RECIPES[recipe], **{
        "training.max_steps": 3, "experiment.save_every": 0, "training.lr": 1e-3,
        "experiment.eval_every": 3, "experiment.num_eval_prompts": 1, **engine_overrides(engine)})
    if resume:
        cfg.training.max_steps, cfg.experiment.resume_from_checkpoint = 4, resume
    tr = trainer(cfg, Brightness())
    trainer_mod.grpo_loss = nan_on_last_process(tr)
    tr.train()
    if RANK == 0:
        (out / "engine.json").write_text(json.dumps(engine_facts(tr.engine)))
    finish_processes(tr.acc)  # as `udm-grpo train` does


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
