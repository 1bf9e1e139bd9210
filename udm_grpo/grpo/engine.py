"""The training engine under the trainer: DDP (accelerate), DeepSpeed ZeRO 1-3 or FSDP2, behind one API.

The trainer never touches an engine directly. It asks for:

    module                    the wrapped policy (an `ImageLogits`); call it for training and, under
                              sharded parameters, for rollouts too (each forward gathers what it needs)
    sampler()                 the logits function the sampler calls: the bare model's `image_logits` when
                              every process holds full parameters (DDP, ZeRO-1/2), the wrapped forward otherwise
    backward(loss, last)      one micro-batch; gradients are synchronised at `last` only.
                              The loss is pre-divided by the accumulation count (DeepSpeed divides itself)
    step(lr) -> grad norm     clip, then step; None when the gradient norm is non-finite on any process
                              (the update is skipped everywhere)
    abort(loss)               drop the update in progress on every process (a non-finite loss somewhere)
    full_state()              (float32 weights by parameter name, optimizer state in torch's AdamW layout
                              indexed like `module.parameters()`): the same checkpoint under every engine,
                              so a run saved under one engine resumes under another with the same process
                              count
    load_full_state(w, opt)   the inverse, on every process

The engine is chosen by `training.engine` (`auto` = what `accelerate launch --config_file` selected through
its environment: ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_ZERO_STAGE or ACCELERATE_USE_FSDP, else
DDP). DeepSpeed and FSDP are set up here, not by accelerate, because accelerate drives them only on GPUs;
this way the same code runs on CPUs (gloo) for the tests.

DeepSpeed note: DeepSpeed clips and steps inside `engine.step()` and skips the update itself when the
global gradient norm is non-finite (its overflow check, on for bf16 here); an update abandoned for a
non-finite loss is closed through that same path, because DeepSpeed keeps reduced gradients outside
`param.grad` where `zero_grad` does not reach.

LoRA (`model.lora`): every engine optimises the trainable (adapter) parameters only; `full_state` /
`load_full_state` cover exactly those (gathered adapter weights and their AdamW moments), so a LoRA checkpoint
is the same under every engine too. The frozen base never enters the optimizer: ZeRO-1/2 keep it whole on
every process, ZeRO-3 partitions it as parameters (gathered per module by the forwards), and FSDP2 shards it
in the same `fully_shard` unit as the adapters of its block. One unit may mix the frozen base in the compute
dtype (bf16) with float32 adapters: FSDP2 asks for a uniform dtype among trainable parameters only, and its
mixed-precision policy casts every parameter to the compute dtype for the all-gather; so no separate units for
frozen and trainable parameters are needed.

Offload (`training.offload_optimizer` / `training.offload_param`, checked per engine by
`config.rules.offload_problem`): DeepSpeed ZeRO-1/2/3 `offload_optimizer` (float32 masters, AdamW moments and
the step on the CPU, with DeepSpeed's CPUAdam), ZeRO-3 `offload_param`; FSDP2 `offload_param` =
`CPUOffloadPolicy` (sharded parameters and gradients on the CPU, so AdamW steps there). Memory is pinned only on
CUDA machines.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError

ENGINES = ("auto", "ddp", "deepspeed", "fsdp")


@dataclass(frozen=True)
class EngineSpec:
    kind: str = "ddp"  # ddp | deepspeed | fsdp
    zero_stage: int = 2

    def describe(self) -> str:
        names = {"ddp": "DDP", "fsdp": "FSDP2 (fully_shard per block)"}
        return names.get(self.kind, f"DeepSpeed ZeRO-{self.zero_stage}")


def engine_spec(engine: str = "auto", zero_stage: int | None = None, env=None) -> EngineSpec:
    """The engine from `training.engine` / `training.zero_stage`, or from accelerate's launch environment."""
    env = os.environ if env is None else env
    if engine == "auto":
        if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            engine = "deepspeed"
        elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            engine = "fsdp"
        else:
            engine = "ddp"
    if engine not in ENGINES[1:]:
        raise ConfigError(f"training.engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    stage = zero_stage if zero_stage is not None else int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    if stage not in (1, 2, 3):
        raise ConfigError(f"the DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}.")
    return EngineSpec(engine, stage)


def world_layout(world: int, spec: EngineSpec, env=None) -> str:
    """'W processes on M machine(s) x L, engine E' from the launcher's environment (torchrun / accelerate)."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" not in env and world > 1:
        return f"{world} processes; engine {spec.describe()}"
    local = int(env.get("LOCAL_WORLD_SIZE", world) or world)
    machines = max(1, world // max(1, local))
    node = env.get("GROUP_RANK", env.get("NODE_RANK", env.get("MACHINE_RANK", "0")))
    where = f", this is machine {node}" if machines > 1 else ""
    return f"{world} process(es) on {machines} machine(s) x {min(local, world)}{where}; engine {spec.describe()}"


@contextlib.contextmanager
def plain_accelerator_env():
    """accelerate would switch to its own DeepSpeed/FSDP mode on GPUs; the engine here does that part."""
    saved = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def adamw(params, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


class Engine:
    """DDP through accelerate (single process included). Subclasses: DeepSpeedEngine, `fsdp.FSDPEngine`."""

    sharded = False

    def __init__(self, spec: EngineSpec, acc, policy: torch.nn.Module, training, accum: int, micro_batch: int,
                 compute_dtype: torch.dtype):
        self.spec, self.acc, self.accum, self.training = spec, acc, accum, training
        self.inner = policy  # ImageLogits(model); its parameters are the float32 masters
        self.setup(policy, micro_batch, compute_dtype)

    def setup(self, policy, micro_batch: int, compute_dtype: torch.dtype) -> None:
        t = self.training
        opt = adamw(self.params(), t.lr, t.betas, t.weight_decay)
        self.module, self.optimizer = self.acc.prepare(policy, opt)

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.inner.parameters() if p.requires_grad]

    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained parameters (all of them, or a LoRA policy's adapters) by their name in the model."""
        return [(n.removeprefix("model."), p) for n, p in self.inner.named_parameters() if p.requires_grad]

    def sampler(self):
        return self.inner.model.image_logits if not self.sharded else self.module

    def micro_context(self, last: bool):
        return self.acc.no_sync(self.module) if not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.acc.backward(loss / self.accum)

    def zero_grad(self) -> None:
        # Under DDP the gradients are views of its buckets (gradient_as_bucket_view): zeroed in place, the no_sync
        # micro-batches accumulate into them; set to None, each would first get a gradient of its own.
        self.optimizer.zero_grad(set_to_none=self.spec.kind != "ddp" or self.acc.num_processes == 1)

    def abort(self, loss: torch.Tensor) -> None:
        """Drop the update in progress (a process had a non-finite loss); called on every process."""
        self.zero_grad()

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float:
        return float(self.acc.clip_grad_norm_(self.module.parameters(), self.training.max_grad_norm or math.inf))

    def step(self, lr: float) -> float | None:
        from .control import all_processes

        norm = self.grad_norm()
        if not all_processes(self.acc, math.isfinite(norm)):
            self.zero_grad()
            return None
        self._set_lr(lr)
        self.optimizer.step()
        self.zero_grad()
        return norm

    # ---- checkpoints: one layout for every engine ----------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        weights = {n: p.detach().float().cpu() for n, p in self.named_params()}
        return weights, self.optimizer.state_dict()

    def load_full_state(self, weights: dict[str, torch.Tensor], optimizer: dict) -> None:
        with torch.no_grad():
            for name, p in checked(self.named_params(), weights):
                p.copy_(weights[name])
        self.optimizer.load_state_dict(optimizer)


def checked(named: list[tuple[str, torch.nn.Parameter]], weights: dict) -> list[tuple[str, torch.nn.Parameter]]:
    """`named`, after checking that `weights` holds exactly these names (a checkpoint of another model or LoRA
    setting is refused in one sentence)."""
    missing = [n for n, _ in named if n not in weights]
    extra = sorted(set(weights) - {n for n, _ in named})
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not train"
        raise CheckpointError(f"the checkpoint's weights do not match the trained parameters: it {what} "
                              f"({len(missing)} missing, {len(extra)} unexpected); check model.lora.")
    return named


def adam_state(step: torch.Tensor | float, moments: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> dict:
    """torch's AdamW state_dict layout for parameters 0..n-1."""
    state = {i: {"step": torch.as_tensor(float(step)), "exp_avg": m, "exp_avg_sq": v} for i, (m, v) in
             enumerate(moments)}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(moments)))}]}


def group_settings(optimizer) -> dict:
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3 on the process group accelerate started; bf16 compute keeps fp32 masters in
    the ZeRO optimizer. Gradient accumulation boundaries are set explicitly per micro-batch."""

    def setup(self, policy, micro_batch: int, compute_dtype: torch.dtype) -> None:
        import deepspeed

        t, stage = self.training, self.spec.zero_stage
        zero: dict = {"stage": stage}
        pin = self.acc.device.type == "cuda"
        for key in ("offload_optimizer", "offload_param"):
            if getattr(t, key):
                zero[key] = {"device": "cpu", "pin_memory": pin}
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": self.accum,
            "train_batch_size": micro_batch * self.accum * self.acc.num_processes,
            "zero_optimization": zero,
            "gradient_clipping": t.max_grad_norm or 0.0,
            "bf16": {"enabled": compute_dtype == torch.bfloat16, "check_grad_overflow": True},
            "data_types": {"grad_accum_dtype": "fp32"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31,
        }
        if "offload_optimizer" in zero:  # AdamW on the CPU: DeepSpeed's vectorised CPUAdam (built on first use)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(self.params(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                   adamw_mode=True)
        else:
            opt = adamw(self.params(), t.lr, t.betas, t.weight_decay)
        self.module, self.optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=opt, config=config)
        self.sharded = stage == 3

    def micro_context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.module.set_gradient_accumulation_boundary(last)
        self.module.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps

    def zero_grad(self) -> None:
        self.module.zero_grad()

    def abort(self, loss: torch.Tensor) -> None:
        # DeepSpeed keeps reduced gradients of earlier micro-batches outside param.grad; its own overflow
        # path clears them: close the accumulation with non-finite gradients, and its step skips.
        self.backward(loss * float("nan"), last=True)
        self.module.step()

    def step(self, lr: float) -> float | None:
        self._set_lr(lr)
        self.module.step()  # skips the update itself when the global gradient norm is non-finite
        norm = self.module.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm if math.isfinite(norm) else None

    def full_state(self):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        named = self.named_params()
        weights = {n: safe_get_full_fp32_param(p).float().cpu() for n, p in named}
        moments = [(safe_get_full_optimizer_state(p, "exp_avg").float().cpu(),
                    safe_get_full_optimizer_state(p, "exp_avg_sq").float().cpu()) for _, p in named]
        base = self.optimizer.optimizer
        step = next(iter(base.state.values()), {}).get("step", 0)
        return weights, adam_state(step, moments, group_settings(base))

    def load_full_state(self, weights, optimizer) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        base = self.optimizer.optimizer  # torch AdamW over this process's flat float32 partitions
        flats = [f for g in base.param_groups for f in g["params"]]
        zero_step = 0 if type(base).__name__ == "DeepSpeedCPUAdam" else torch.tensor(0.0)  # CPUAdam counts in ints
        for flat in flats + list(getattr(self.optimizer, "fp32_partitioned_groups_flat", [])):
            if "exp_avg" not in base.state[flat]:  # created lazily at the first step: create it now
                base.state[flat].update({"step": zero_step, "exp_avg": torch.zeros_like(flat),
                                         "exp_avg_sq": torch.zeros_like(flat)})
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 link the moments to parameters at the first step; do it now
            link()
        step = 0.0  # the AdamW step count, from the checkpoint's moments when it has any
        for i, (name, p) in enumerate(checked(self.named_params(), weights)):
            value = weights[name]
            safe_set_full_fp32_param(p, value.to(p.device))
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.sharded):
                if not self.sharded or self.acc.process_index == 0:
                    p.data.copy_(value.to(p.device, p.dtype))  # the compute copy the forwards read
            entry = optimizer["state"].get(i) or optimizer["state"].get(str(i))
            if entry:
                safe_set_full_optimizer_state(p, entry["exp_avg"].to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, entry["exp_avg_sq"].to(p.device), "exp_avg_sq")
                step = entry["step"]
        for state in base.state.values():
            if "step" in state:
                old = state["step"]
                state["step"] = (torch.as_tensor(float(step), dtype=old.dtype) if torch.is_tensor(old)
                                 else type(old)(float(step)))


def transformer_of(model: torch.nn.Module) -> torch.nn.Module:
    """The URSATransformer inside `model` (itself, or the base of a peft LoRA model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def build_engine(spec: EngineSpec, acc, policy, training, accum: int, micro_batch: int,
                 compute_dtype: torch.dtype) -> Engine:
    """The engine for `spec`, wrapping `policy` (an ImageLogits) and creating its AdamW optimiser."""
    from .fsdp import FSDPEngine

    cls = {"ddp": Engine, "deepspeed": DeepSpeedEngine, "fsdp": FSDPEngine}[spec.kind]
    if spec.kind == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("training.engine deepspeed: DeepSpeed is not installed; pip install "
                              "'udm-grpo[deepspeed]'.") from None
    return cls(spec, acc, policy, training, accum, micro_batch, compute_dtype)
