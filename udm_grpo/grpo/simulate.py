"""The policy's phases at any model shape without the memory: torch's fake tensors (shapes and dtypes, no
storage) run the real code, `FlopCount` counts FLOPs per op (torch's formulas) and `MemTracker` the live bytes by
category.

`simulate_phases(config, ...)` builds a random URSA transformer of `config`'s shape (fake unless `fake=False`,
which runs the same program for real: the tests compare the two) and runs one process's view of:

    rollout step       one sampling step of `rollout_batch` images without grad: the forward (doubled under
                       guidance), the guided mixture, the categorical draw of x1 over K and the CTMC jump
    rollout decode     the tokenizer's decode of the rollout's tokens to pixels (with `vae`)
    reference forward  the frozen reference's no-grad forward of a micro-batch (with `reference`; LoRA: the
                       base with its adapters disabled)
    old-policy forward the policy's no-grad forward of a micro-batch for the stored old log-probs (`old_policy`)
    training step      forward + backward of one micro-batch through the trainer's objective (action log-probs,
                       then the entropy metric), gradient checkpointing as configured
    optimizer step     AdamW on the trainable parameters

in the steady state of every iteration after the first (one optimizer step is taken before measuring, so the
AdamW moments are live). Stand-ins of the same shapes replace what depends on values: every token jumps
(the jump's upper bound) and every row draws from the first block of K (`_static_categorical`); the jump streams
(row x column) blocks as it does at large K (small codebooks use a K x K table instead).

`simulate_iteration` runs it for a run config and combines the measured transient bytes with what the engine
stores (`memory.engine_state`: weights, masters, gradients, moments, gathered shards) for the process count.

Not simulated: reward models, communication buffers other than the engines' buckets, allocator fragmentation,
CUDA workspaces, image encoding and the `.item()` / NaN-guard synchronisations.
"""

from __future__ import annotations

import collections
import contextlib
import gc
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..diffusion import categorical, paths
from ..models.transformer import URSAConfig, URSATransformer
from .memory import GPU_PRESETS, PATH_DIM
from .objective import action_log_probs, token_entropy


def _count_cpu_attention() -> None:
    """FlopCounterMode has formulas for the GPU attention kernels only; fake CPU tensors run the CPU one."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_registry:
        register_flop_formula(forward)(lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v))
    if backward not in flop_registry:
        register_flop_formula(backward)(
            lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))


_count_cpu_attention()


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run under it, by torch's formulas (`flop_counter.flop_registry`). FlopCounterMode's module
    tracking holds the tensors that checkpointing recomputes until the backward ends, which inflates the bytes
    measured beside it at checkpointing levels 2 and 3; this counter holds nothing."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def get_total_flops(self) -> int:
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

PHASES = ("rollout step", "rollout decode", "reference forward", "old-policy forward", "training step",
          "optimizer step")
TRANSIENT = {"act": "activations", "temp": "temporaries", "buffer": "buffers", "pipeline": "tokenizer and path"}


@dataclass
class PhaseFigures:
    """One phase: `flops` counted by `FlopCount`, `peak_bytes` the live bytes at the phase's peak by MemTracker
    category ("param", "buffer", "grad", "act", "temp", "opt", plus "reference" and "pipeline") and "total"."""

    flops: float
    peak_bytes: dict[str, int]


def _peak(tracker) -> dict[str, int]:
    snapshot = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snapshot.values()))
    out = {str(k).rsplit(".", 1)[-1].lower(): int(v) for k, v in per_device.items()}
    return {k: v for k, v in out.items() if v or k == "total"}


def steady_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over `params` after one step, as from the second iteration on: its moments are live."""
    optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def measure(fn, *tracked) -> tuple[float, dict[str, int]]:
    """(FLOPs, peak live bytes by MemTracker category and "total") of `fn(counter)`, which may return FLOPs to add;
    `tracked`: modules and optimizers whose tensors count (None skipped). The garbage collector is held: a phase
    starts clean and frees only by reference counts, so every run gives the same peak."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*(m for m in tracked if m is not None))
    gc.collect()
    gc.disable()
    try:
        with _frozen_parameters_tracked(), tracker, FlopCount() as counter:
            extra = fn(counter) or 0.0
    finally:
        gc.enable()
    return float(counter.get_total_flops()) + extra, _peak(tracker)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_policy_model(config: URSAConfig, dtype: torch.dtype, lora: dict | None, fake: bool) -> torch.nn.Module:
    """A transformer of `config` with parameters in `dtype` (LoRA: the frozen base in `dtype`, float32 adapters),
    fake when `fake`. Built on the meta device and then given fake storage: peft cannot convert fake modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta") if fake else contextlib.nullcontext():
            model = URSATransformer(config)
            if lora is not None:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(**lora))
    finally:
        torch.set_default_dtype(previous)
    if lora is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if fake:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                  requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return model


def _static_categorical(score_fn, rows: int, num_classes: int, chunk: int, generator=None, device="cpu"):
    """`chunked_categorical` with the same passes and block shapes when every row draws from the first block."""
    blocks = list(categorical.class_blocks(num_classes, chunk))
    maxes, _ = categorical.block_masses(score_fn, rows, blocks, device)
    k0, k1 = blocks[0]
    w = torch.exp(score_fn(k0, k1, torch.arange(rows, device=device)).float() - maxes[:, :1]).double()
    w.cumsum(dim=1)
    return torch.zeros(rows, dtype=torch.long, device=device)


@contextlib.contextmanager
def _value_free_sampler():
    """The sampler's value-dependent selections replaced by stand-ins of the same shapes (module docstring)."""
    with mock.patch.object(categorical, "chunked_categorical", _static_categorical), \
            mock.patch.object(paths, "chunked_categorical", _static_categorical), \
            mock.patch.object(paths, "_jumping", lambda rate, dt, generator: torch.arange(rate.numel())):
        yield


@contextlib.contextmanager
def _frozen_parameters_tracked():
    """MemTracker hooks every parameter a forward reads for its gradient, which fails on frozen ones (the reference,
    LoRA's base): they get no hook, as they get no gradient."""
    def only_trained(original):
        def register(tensor, hook):
            if tensor.requires_grad:
                return original(tensor, hook)
            return torch.utils.hooks.RemovableHandle(collections.OrderedDict())
        return register

    names = ("register_hook", "register_post_accumulate_grad_hook")
    with mock.patch.multiple(torch.Tensor, **{name: only_trained(getattr(torch.Tensor, name)) for name in names}):
        yield


def _vae(data: dict):
    from ..models.patch_vq import PatchVQConfig
    from ..models.vae import VAE_CLASSES
    from ..models.vq import VQConfig

    name = data.get("_class_name")
    config = (PatchVQConfig if name == "PatchVQ" else VQConfig).from_dict(data)
    return VAE_CLASSES[name](config)


def simulate_phases(config: URSAConfig, micro_batch: int, rollout_batch: int, text_tokens: int,
                    grid: tuple[int, int], bf16: bool = True, gradient_checkpointing: int = 1,
                    guidance: bool = False, reference: bool = False, old_policy: bool = False,
                    accumulating: bool = True, fake: bool = True, seed: int = 0, vae: dict | None = None,
                    lora: dict | None = None, module_dtype: torch.dtype | None = None,
                    only: tuple[str, ...] | None = None) -> dict[str, PhaseFigures]:
    """FLOPs and peak bytes of each phase for one process (see the module docstring). `reference`: a frozen copy in
    the compute dtype is live throughout ("reference" bytes, out of "param"); `accumulating`: gradients of earlier
    micro-batches are live during the training step; `vae`: the tokenizer's config.json (adds the decode phase and
    sizes the path embedding); `module_dtype`: the dtype of the module the forwards read (default float32 masters
    under autocast, as DDP runs; bf16 for DeepSpeed's and FSDP2's compute copies); `only`: these phases only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..diffusion.categorical import sample_logits
    from ..diffusion.sampler import guided_logits

    torch.manual_seed(seed)
    figures: dict[str, PhaseFigures] = {}
    compute = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    n, k = grid[0] * grid[1], config.lm_head_size
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = build_policy_model(config, module_dtype or torch.float32, lora, fake)
        if lora is not None:
            model.base_model.model.set_gradient_checkpointing(gradient_checkpointing)
        else:
            model.set_gradient_checkpointing(gradient_checkpointing)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = steady_adamw(trainable)
        frozen = build_policy_model(config, compute, None, fake).requires_grad_(False) \
            if reference and lora is None else None
        tokenizer = _vae(vae) if vae else None
        dim = tokenizer.codebook.shape[1] if tokenizer is not None else PATH_DIM
        path = paths.MetricPath(torch.randn(k, dim), table_max=0)
        resident = _nbytes(path.raw_emb, path.emb, path.sq_norm)
        named = [("reference", "param", _nbytes(*frozen.parameters()) if frozen else 0),
                 ("pipeline", "param", _nbytes(*tokenizer.parameters()) if tokenizer else 0),
                 ("pipeline", "buffer", _nbytes(*tokenizer.buffers()) if tokenizer else 0)]

        def phase(name, fn):
            if only is not None and name not in only:
                return
            flops, peak = measure(fn, model, optimizer, frozen, tokenizer)
            peak["pipeline"] = resident  # the path tables exist before the tracker starts
            peak["total"] += resident
            for key, source, size in named:  # tracked as parameters or buffers: named apart
                peak[source] -= size
                peak[key] = peak.get(key, 0) + size
            figures[name] = PhaseFigures(flops, {k: v for k, v in peak.items() if v})

        def tokens(rows):
            return torch.zeros(rows, text_tokens, dtype=torch.long), torch.randint(0, k, (rows, n))

        def no_grad(fn):
            def run(counter):
                model.eval()
                with torch.no_grad(), autocast, _value_free_sampler():
                    extra = fn(counter)
                model.train()
                return extra
            return run

        def rollout_step(counter):
            """KineticOptimalScheduler.step before its last step. The draw and the jump work on chunks of
            `path.row_chunk` tokens alike: one chunk runs and its FLOPs are counted for all."""
            text, x = tokens(rollout_batch)
            logits = guided_logits(model.image_logits, text, x, grid, 7.0 if guidance else 1.0,
                                   text if guidance else None)
            rows = min(path.row_chunk, x.numel())
            before = counter.get_total_flops()
            path.jump(x.view(-1)[:rows], sample_logits(logits.view(-1, k)[:rows]), 0.5, 0.1)
            return (counter.get_total_flops() - before) * (x.numel() / rows - 1)

        def old_policy_forward(counter):
            model.image_logits(*tokens(micro_batch * (2 if guidance else 1)), grid)

        def decode(counter):
            tokenizer.decode(torch.randint(0, k, (rollout_batch, *grid)))

        def reference_forward(counter):
            if frozen is not None:
                frozen.image_logits(*tokens(micro_batch * (2 if guidance else 1)), grid)
                return
            with model.disable_adapter():
                model.image_logits(*tokens(micro_batch * (2 if guidance else 1)), grid)

        def train(counter):
            for p in trainable:
                p.grad = torch.zeros_like(p) if accumulating else None
            with autocast:
                logits = model.image_logits(*tokens(micro_batch), grid)
                logp = action_log_probs(logits, torch.randint(0, k, (micro_batch, n)))
            logp.mean().backward()
            token_entropy(logits.detach())

        phase("rollout step", no_grad(rollout_step))
        if tokenizer is not None:
            phase("rollout decode", no_grad(decode))
        if reference:
            phase("reference forward", no_grad(reference_forward))
        if old_policy:
            phase("old-policy forward", no_grad(old_policy_forward))
        phase("training step", train)
        phase("optimizer step", lambda counter: optimizer.step() and None)
    return figures


def gpu_memory_bytes(value: str) -> int:
    """`--gpu-memory`: GiB as a number, or a preset name of `GPU_PRESETS`; ValueError (one sentence) otherwise."""
    name = value.strip().lower()
    if name in GPU_PRESETS:
        return GPU_PRESETS[name] * 2**30
    try:
        gib = float(name)
    except ValueError:
        gib = -1.0
    if not gib > 0 or gib == float("inf"):
        raise ValueError(f"expected GiB (a positive number) or a preset: "
                         f"{', '.join(f'{k} {v}' for k, v in GPU_PRESETS.items())}; got {value!r}")
    return int(gib * 2**30)


SHAPE_KEYS = {"transformer": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "lm_vocab_size", "lm_head_size", "vocab_size"),
              "AutoencoderVQ": ("block_out_channels", "num_vq_embeddings", "vq_embed_dim"),
              "PatchVQ": ("patch_size", "num_vq_embeddings")}


def shape_configs(folder) -> tuple[dict, dict]:
    """(transformer/config.json, vae/config.json) of a model folder, each holding every key that sets a shape
    (`SHAPE_KEYS`): without weights, a default would silently stand in for the model's size. (head_dim and
    rms_norm_eps may be absent: the reference's config.json leaves them to Qwen3's defaults, as the loader does.)
    ConfigError naming the file and key otherwise."""
    from ..errors import ConfigError
    from ..models.io import read_config

    out = []
    for sub in ("transformer", "vae"):
        data, path = read_config(folder / sub, f"{sub}/")
        kind = "transformer" if sub == "transformer" else data.get("_class_name", "AutoencoderVQ")
        missing = [key for key in SHAPE_KEYS.get(kind, ()) if key not in data]
        if missing:
            raise ConfigError(f"{path}: key '{missing[0]}' is missing; the simulation and the memory estimate read "
                              "the model's shape from it (config files only, no weights).")
        out.append(data)
    return out[0], out[1]


@dataclass(frozen=True)
class Iteration:
    """What one process runs in one training iteration, from a run config and its model folder's config files."""

    config: URSAConfig
    vae: dict
    text_tokens: int
    grid: tuple[int, int]
    engine: str  # memory.ENGINE_KINDS
    processes: int
    bf16: bool
    level: int
    guidance: bool
    reference: bool
    lora: dict | None
    micro_batch: int
    rollout_batch: int
    images: int  # per process
    train_steps: int
    updates: int
    sampling_steps: int
    offload_optimizer: bool = False
    offload_param: bool = False
    reuse: int = 1  # rollouts trained per step (training.reuse_rollouts)

    @classmethod
    def from_run(cls, cfg, folder, index: dict, plan, spec, codebook: int | None = None) -> Iteration:
        """From the run config `cfg`, its model `folder` (config files only; `index` its model_index.json), the
        batch `plan` and engine `spec`; `codebook` replaces the model's codebook size K."""
        from ..models.pipeline import DEFAULT_PROMPT_LENGTH, token_grid
        from ..models.vae import vae_geometry
        from .memory import engine_kind

        data, vae = shape_configs(folder)
        path = folder / "transformer" / "config.json"
        if codebook:
            data = {**data, "lm_head_size": codebook, "vocab_size": data["lm_vocab_size"] + codebook}
            vae = {**vae, "num_vq_embeddings": codebook}
        r, t = cfg.sampling.rollout, cfg.training
        return cls(URSAConfig.from_dict(data, str(path)), vae,
                   int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH)),
                   token_grid(r.height, r.width, *vae_geometry(folder / "vae")),
                   engine_kind(spec.kind, spec.zero_stage), plan.num_processes, cfg.bf16,
                   cfg.model.gradient_checkpointing, r.guidance_scale != 1.0,
                   cfg.reward.kl_beta > 0, cfg.model.lora, plan.micro_batch_size,
                   min(r.batch_size or plan.images_per_process, plan.images_per_process), plan.images_per_process,
                   plan.train_steps, t.updates_per_rollout, r.num_inference_steps,
                   t.offload_optimizer, t.offload_param, t.reuse_rollouts)

    @property
    def module_dtype(self) -> torch.dtype | None:
        """The dtype of the module the forwards read: DeepSpeed's and FSDP2's compute copies in bf16."""
        return torch.bfloat16 if self.bf16 and self.engine != "ddp" else None

    def phase_args(self) -> dict:
        """`simulate_phases` keyword arguments."""
        return dict(config=self.config, micro_batch=self.micro_batch, rollout_batch=self.rollout_batch,
                    text_tokens=self.text_tokens, grid=self.grid, bf16=self.bf16, gradient_checkpointing=self.level,
                    guidance=self.guidance, reference=self.reference, old_policy=self.updates > 1 or self.reuse > 1,
                    vae=self.vae,
                    lora=self.lora, module_dtype=self.module_dtype)

    def calls(self) -> dict[str, int]:
        """How often each phase runs per iteration (steady state: R = `reuse` rollouts trained, no refills of
        dynamic sampling)."""
        rollouts = -(-self.images // self.rollout_batch)
        accum = self.images // self.micro_batch * self.train_steps
        return {"rollout step": self.sampling_steps * rollouts, "rollout decode": rollouts,
                "reference forward": accum, "old-policy forward": accum,
                "training step": accum * self.updates * self.reuse, "optimizer step": self.updates}


_SHAPES: dict[str, tuple] = {}  # (URSAConfig, LoRA) -> (memory.Shape, trainable parameters)


def iteration_figures(it: Iteration, phases: dict[str, PhaseFigures]) -> dict:
    """The iteration from its phases' figures (`simulate_phases`, one call each): "params", "trainable_params",
    "codebook", "engine", "processes", "flops" (phase -> FLOPs per iteration, "total"), "peak_bytes" (category ->
    bytes at the peak phase, "total"), "peak_phase" and "phases" (each phase's "flops" and "peak_bytes"). A phase's
    bytes are what the engine stores then (`memory.engine_state`) plus the transient bytes measured."""
    from .memory import Shape, engine_state

    key = repr((it.config, it.lora))
    if key not in _SHAPES:
        shape = Shape.from_config(it.config)
        _SHAPES[key] = shape, shape.params if it.lora is None else sum(
            p.numel() for p in build_policy_model(it.config, torch.float32, it.lora, True).parameters()
            if p.requires_grad)
    shape, trainable = _SHAPES[key]
    state = engine_state(shape, it.engine, it.processes, it.bf16, None if it.lora is None else trainable,
                         it.reference, it.offload_optimizer, it.offload_param)
    calls, out = it.calls(), {}
    for name, fig in phases.items():
        update = name in ("training step", "optimizer step")
        peak = {key: int(v[update]) for key, v in state.items() if v[update]}
        peak.update({label: fig.peak_bytes[key] for key, label in TRANSIENT.items() if fig.peak_bytes.get(key)})
        peak["total"] = sum(peak.values())
        out[name] = {"flops": fig.flops * calls[name], "peak_bytes": peak}
    flops = {name: phase["flops"] for name, phase in out.items()}
    peak_phase = max(out, key=lambda name: out[name]["peak_bytes"]["total"])
    return {"params": shape.params, "trainable_params": trainable, "codebook": it.config.lm_head_size,
            "engine": it.engine, "processes": it.processes, "flops": {**flops, "total": sum(flops.values())},
            "peak_bytes": out[peak_phase]["peak_bytes"], "peak_phase": peak_phase, "phases": out}


def simulate_iteration(cfg, folder, index: dict, plan, spec, codebook: int | None = None) -> dict:
    """One process's first training iteration of the run config `cfg` (see `Iteration.from_run`) simulated phase by
    phase at the model's full shape; see `iteration_figures` for the keys."""
    it = Iteration.from_run(cfg, folder, index, plan, spec, codebook)
    return iteration_figures(it, simulate_phases(**it.phase_args()))
