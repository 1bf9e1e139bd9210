"""Memory per GPU of a UDM-GRPO run from the transformer's config.json, the batch plan and the engine.

What each engine stores per process, for P parameters (T trainable; T = P without LoRA) over W processes and a
compute dtype of c bytes (2 for bf16, 4 for float32), in bytes (`engine_state`; "update" = the training and
optimizer steps):

    engine   weights the forwards read   float32 masters  gradients (other phases / update)              AdamW moments
    DDP      the masters (autocast)      4T               W > 1: 4T (buckets) / 4T; W = 1: 0 / 4T        8T
    ZeRO-1   cP (module in c)            4T / W           4T (fp32 accumulation) / 4T + cT                8T / W
    ZeRO-2   cP                          4T / W           0 / (4 + c) T / W + reduce bucket               8T / W
    ZeRO-3   cP / W + gathered           4T / W           4T / W + bucket / (4 + c) T / W + bucket + gath. 8T / W
    FSDP2    gathered (c)                the shards 4T/W  0 / 4T / W + (c + 4) x root                     8T / W

DDP uses gradient buckets as the gradients' storage (`gradient_as_bucket_view`), zeroed in place between updates,
so W > 1 keeps 4T throughout and the `no_sync` micro-batches accumulate into them (only the first update, before
the gradients become bucket views, holds fresh `.grad` tensors beside the buckets: 8T). DeepSpeed ZeRO-1
with bf16 and float32 accumulation is its BF16_Optimizer: a full float32 gradient buffer. The reduce bucket is
DeepSpeed's default reduce_bucket_size, 5e8 elements in c whatever the model's size: ZeRO-2 allocates it for each
backward, ZeRO-3 once at setup and keeps it between updates with its float32 gradient partitions (4T / W).
"Gathered" is what a sharded engine holds unsharded at once: ZeRO-3 the largest module plus its prefetch bucket
(5e7 elements); FSDP2 the root unit (embeddings, image head, final norm: not resharded after the forward) plus
two blocks (current and prefetched), and in the backward the root's unsharded gradient in c and in float32
(reduce dtype).
With LoRA the frozen base is the weights (cP, sharded under ZeRO-3 / FSDP2; DeepSpeed's module also holds the
adapters in c) and only the adapters have masters, gradients and moments, sharded like a full fine-tune's (not
under DDP). The frozen reference (kl_beta > 0, no LoRA) is a replicated copy in c: cP. tests/test_engine_state.py
measures what the engines hold (2 CPU processes, the tiny shape) against `engine_state`.

`estimate` adds the transient memory with formulas fitted to what `udm-grpo train --check --simulate` measures
(`simulate.py`; docs/multinode.md compares the two; `activation_bytes_per_token_layer` lists the saved tensors).
For c compute bytes, m bytes of the module the forwards read (4 for DDP's float32 masters under bf16 autocast,
else c), b samples of S = L_text + 1 + N tokens, K codebook entries and hidden size d:
- training step: the larger of the end of the forward (L layers x b S x the bytes each block saves for its
  backward, the b N K x c logits, the head's b N d x (6 + 2m), a float32 row block of the log-probs, and under
  autocast the c-byte copies of every linear weight that autocast caches), the start of the backward (the same
  activations and head, the logits and their gradient, the larger of two row blocks and the image head's weight
  gradient K d m, and of the autocast copies only those the backward needs) and the end of the backward (the
  logits, which the entropy metric reads afterwards, and the embedding table's gradient);
- rollout step: the b_r N K x c logits (2 b_r rows under guidance, whose float32 mixture adds 16 b_r N K) plus
  the sampler's float32 blocks and K x 256 tables, the autocast copies, and the path's resident K x 256 float32
  tables (in every phase).
Autocast does not cache its copies of frozen weights (LoRA's base): those are made one at a time. LoRA's blocks
are counted with a full fine-tune's saved tensors (about 7% above the simulation at level 1). Not counted: the
tokenizer's weights and its decode (its own phase, measured by the simulation).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, elements
PREFETCH_BUCKET = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size, elements
ENGINE_KINDS = ("ddp", "zero1", "zero2", "zero3", "fsdp")


@dataclass(frozen=True)
class Shape:
    params: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    codebook: int
    root_params: int = 0  # outside the blocks: embeddings, image head, final norm
    largest_module: int = 0  # parameters of the largest leaf module (the embedding table)

    @classmethod
    def from_config(cls, cfg) -> Shape:
        """From an URSAConfig; parameter counts come from the model built on the meta device."""
        import torch

        from ..models.transformer import URSATransformer

        with torch.device("meta"):
            model = URSATransformer(cfg)
        params = sum(p.numel() for p in model.parameters())
        blocks = sum(p.numel() for p in model.model.layers.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        return cls(params, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, cfg.num_hidden_layers, cfg.lm_head_size, params - blocks, largest)

    @property
    def block_params(self) -> int:
        return (self.params - self.root_params) // max(1, self.layers)


def engine_kind(kind: str, zero_stage: int) -> str:
    """'ddp', 'zero1'..'zero3' or 'fsdp' from an EngineSpec's kind and stage."""
    return f"zero{zero_stage}" if kind == "deepspeed" else kind


def engine_state(s: Shape, kind: str, world: int, bf16: bool, trainable: int | None = None,
                 reference: bool = False, offload_optimizer: bool = False,
                 offload_param: bool = False) -> dict[str, tuple[float, float]]:
    """Bytes per process the engine `kind` (`ENGINE_KINDS`) stores on the GPU, category -> (outside the update,
    during the training and optimizer steps); see the module docstring. `trainable`: LoRA's adapter parameters
    (None: a full fine-tune). Offload (`training.offload_optimizer` / `offload_param`) moves to the CPU: DeepSpeed's
    optimizer offload the masters, moments and float32 gradients (the compute-dtype gradients stay until reduced);
    its parameter offload (ZeRO-3) the parameter shards; FSDP2's CPUOffloadPolicy (offload_param) the float32
    shards, their gradients and moments."""
    p, w, c = s.params, max(1, world), 2 if bf16 else 4
    lora = trainable is not None
    t = trainable if lora else p
    sharded = kind in ("zero3", "fsdp")
    module = c * (p + (t if lora and kind.startswith("zero") else 0))  # DeepSpeed casts LoRA's adapters to c too
    weights = module / w if kind == "zero3" or lora and sharded else 0 if kind in ("ddp", "fsdp") and not lora \
        else module
    masters = 4 * t / (1 if kind == "ddp" else w)
    moments = 8 * t / (1 if kind == "ddp" else w)
    bucket = c * REDUCE_BUCKET  # allocated whole, however few the trainable parameters
    if kind == "ddp":  # W > 1: the buckets, which the gradients are views of (zeroed in place between updates)
        grads = (4 * t, 4 * t) if w > 1 else (0, 4 * t)
    elif kind == "zero1":
        grads = (4 * t, 4 * t + c * t)
    elif kind == "zero2":
        grads = (0, (4 + c) * t / w + bucket)
    elif kind == "zero3":  # the float32 gradient partitions and the bucket stay between updates
        grads = (4 * t / w + bucket, (4 + c) * t / w + bucket)
    else:
        grads = (0, 4 * t / w)
    gathered = (0.0, 0.0)
    if kind == "zero3":
        live = c * (s.largest_module + min(p, PREFETCH_BUCKET))
        gathered = (live, live + (0 if lora else c * s.largest_module))
    elif kind == "fsdp":
        live = c * (s.root_params + 2 * s.block_params)
        gathered = (live, live + (0 if lora else (c + 4) * s.root_params))
    if offload_optimizer and kind.startswith("zero"):
        masters = moments = 0  # ZeRO-3's gradient partitions go to the CPU too, its bucket stays
        grads = (bucket if kind == "zero3" else 0, c * t / (w if kind != "zero1" else 1) + bucket)
    if offload_param and kind == "zero3":
        weights = 0
    if offload_param and kind == "fsdp":
        masters = moments = 0
        grads = (0, 0)
    out = {"weights": (weights, weights), "masters": (masters, masters), "gradients": grads,
           "optimizer": (moments, moments), "gathered": gathered,
           "reference": (c * p, c * p) if reference and not lora else (0, 0)}
    return {k: v for k, v in out.items() if v != (0, 0)}


def activation_bytes_per_token_layer(s: Shape, level: int, c: int = 2, m: int | None = None) -> int:
    """Bytes one block keeps for its backward per token at checkpointing `level`, compute dtype c bytes, module
    (and residual stream) m bytes (default c). Level 1 (MLP recomputed): the two RMSNorms' float32 inputs and
    c-byte outputs (2 + 4m per hidden unit with the residual kept for the MLP's recompute), q and k after their
    norms, SDPA's q, repeated k and v, output and log-sum-exp, o_proj's input (4 + 5c per query unit, 4 + c per
    key unit), RoPE's cos / sin and the norms' rsqrt; level 0 adds the post-attention norm and the SwiGLU's four
    I-wide tensors; level 2 keeps the block input, the residual, SDPA's inputs and o_proj's input; level 3 the
    block input. SDPA attention keeps no S x S scores."""
    m = m or c
    d, i, hd = s.hidden, s.intermediate, s.head_dim
    q, kv = s.heads * hd, s.kv_heads * hd
    small = m * hd + 8 * s.heads + 4 * s.kv_heads + 4  # cos / sin, log-sum-exp, the norms' rsqrt
    level1 = (2 + 4 * m) * d + (4 + 5 * c) * q + (4 + c) * kv + small
    return {0: level1 + (4 + m) * d + 4 * c * i + 4, 1: level1,
            2: 2 * m * d + 4 * c * q + m * hd + 4 * s.heads, 3: m * d}[level]


PATH_DIM = 256  # the metric path's table width (the tokenizer's codebook dimension; the IBQ VAE's vq_embed_dim)
SAMPLER_BLOCKS = 2**27  # the draw's and the jump's float32 (1,024 x 4,096) blocks at their peak, bytes
SAMPLER_PER_CODE = 1152  # ... plus their K x 256 tables, bytes per codebook entry
LOGPROB_BLOCK = 2**24  # elements of `objective.action_log_probs`' row blocks


def estimate(s: Shape, engine: str, zero_stage: int, world: int, bf16: bool, reference: bool, level: int,
             micro_batch: int, rollout_batch: int, text_tokens: int, image_tokens: int, guidance: bool,
             lora: bool = False) -> dict[str, float]:
    """GiB per GPU by item (see the module docstring); 'total' = the larger of the update's peak and the
    rollout's."""
    c = 2 if bf16 else 4
    m = 4 if engine == "ddp" or not bf16 else c  # DDP's forwards read the float32 masters under autocast
    state = engine_state(s, engine_kind(engine, zero_stage), world, bf16, 0 if lora else None, reference)
    b, n, k, d, layers = micro_batch, image_tokens, s.codebook, s.hidden, s.layers
    attention = d * 2 * (s.heads + s.kv_heads) * s.head_dim
    saved = {0: s.block_params, 1: attention, 2: d * s.heads * s.head_dim, 3: 0}[level]
    # autocast's c-byte copies of the linear weights: cached through the forward when trained, made one at a time
    # when frozen (LoRA's base); the backward keeps those it needs
    kept = c * layers * saved if m != c else 0
    casts = kept if lora else c * (layers * s.block_params + k * d) if m != c else 0
    act = b * (text_tokens + 1 + n) * layers * activation_bytes_per_token_layer(s, level, c, m)
    logits, head = b * n * k * c, b * n * d * (6 + 2 * m)
    block = 4 * min(b * n * k, LOGPROB_BLOCK)  # a float32 row block of the log-probs (one in the forward, two after)
    forward = casts + logits + head + block
    backward = kept + 2 * logits + head + max(2 * block, 0 if lora else k * d * m)
    train = max(act + max(forward, backward), logits + (0 if lora else s.largest_module * m))
    rows = rollout_batch * (2 if guidance else 1)
    draw = 16 * rollout_batch * n * k if guidance else SAMPLER_BLOCKS + SAMPLER_PER_CODE * k
    rollout = (c * k * d if lora and m != c else casts) + max(
        rows * n * k * c + draw, rows * (text_tokens + 1 + n) * (3 * s.intermediate * c + 2 * d * m))
    path = k * (2 * PATH_DIM + 1) * 4
    gib = {key: v[1] / GB for key, v in state.items()}
    gib.update({"path tables (K x 256 float32, x 2)": path / GB, "training activations (one micro-batch)": act / GB,
                "training logits and temporaries": (train - act) / GB, "rollout logits and sampler (one step)":
                rollout / GB})
    outside = sum(v[0] for v in state.values()) + path + rollout
    gib["total"] = max(sum(v[1] for v in state.values()) + path + train, outside) / GB
    return gib


GPU_PRESETS = {"h200": 141, "h100": 80, "a100-80": 80, "l40s": 48, "a100-40": 40, "rtx4090": 24}  # GiB, largest first


def fitting_gpus(total_gib: float) -> list[str]:
    """The GPUs of `GPU_PRESETS` whose memory holds `total_gib` (none when it exceeds the largest)."""
    return [name for name, gib in GPU_PRESETS.items() if total_gib <= gib]


LABELS = {"weights": "weights the forwards read", "masters": "float32 masters", "optimizer": "AdamW moments",
          "gathered": "gathered (unsharded) parameters", "reference": "frozen reference"}


def describe(gib: dict[str, float], shape: Shape) -> str:
    lines = [f"memory per GPU (estimate, {shape.params / 1e6:,.1f}M parameters, K = {shape.codebook}):"]
    lines += [f"  {LABELS.get(k, k):40s} {v:8.2f} GiB" for k, v in gib.items() if k != "total" and v > 0]
    lines.append(f"  {'peak: the larger of update and rollout':40s} {gib['total']:8.2f} GiB")
    return "\n".join(lines)
