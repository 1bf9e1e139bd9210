"""Memory per GPU of a UDM-GRPO run, estimated from the transformer's config.json, the batch plan and the engine.

Persistent state, for P trainable parameters over W processes (bytes):

    engine      weights for the forwards        float32 masters   gradients       AdamW moments
    DDP         2P (bf16 autocast copies)       4P                4P              8P
    ZeRO-1      2P (bf16 module)                4P / W            4P (2P bf16+…)  8P / W
    ZeRO-2      2P (bf16 module)                4P / W            4P / W + 2P     8P / W
    ZeRO-3      2P / W (+ one gathered block)   4P / W            4P / W          8P / W
    FSDP2       one gathered block (bf16)       4P / W            4P / W          8P / W

plus the frozen reference in the compute dtype (2P in bf16, replicated) when reward.kl_beta > 0. In float32 compute the
"weights for the forwards" row is the masters themselves (0 extra).

Activations of one training micro-batch of b samples, S = L_text + 1 + N tokens, per layer and token
(bf16, SDPA attention, so no S x S scores): the block input 2d always; with checkpointing level 0 also
attention (q, k, v, output: 2 (H + 2 KV) hd + 2 H hd + 2d) and the MLP (gate, up, product: 6 I + 2d);
level 1 recomputes the MLP, level 2 also the qkv projection, level 3 the whole block. The logits
dominate at large K: b N K x (2 bytes bf16 + 4 bytes float32 log-softmax) x 2 (kept for backward).
The rollout forward (no grad) holds b_r N K x 2 bytes of logits (x 2 with guidance) and the CTMC step's
blocks. Figures are estimates (allocator fragmentation and framework buffers add ~10-20%).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3


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

    @classmethod
    def from_config(cls, cfg) -> Shape:
        """From an URSAConfig; the parameter count comes from the model built on the meta device."""
        import torch

        from ..models.transformer import URSATransformer

        with torch.device("meta"):
            params = sum(p.numel() for p in URSATransformer(cfg).parameters())
        return cls(params, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, cfg.num_hidden_layers, cfg.lm_head_size)


def activation_bytes_per_token_layer(s: Shape, level: int) -> int:
    attention = 2 * (s.heads + 2 * s.kv_heads) * s.head_dim + 2 * s.heads * s.head_dim + 2 * s.hidden
    mlp = 6 * s.intermediate + 2 * s.hidden
    keep = {0: attention + mlp, 1: attention, 2: 2 * s.heads * s.head_dim + 2 * (s.heads + 2 * s.kv_heads) * s.head_dim,
            3: 0}[level]
    return 2 * s.hidden + keep


def estimate(s: Shape, engine: str, zero_stage: int, world: int, bf16: bool, reference: bool, level: int,
             micro_batch: int, rollout_batch: int, text_tokens: int, image_tokens: int, guidance: bool,
             lora: bool = False) -> dict[str, float]:
    """GiB per GPU by item (see the module docstring); 'total' sums them."""
    p, w = s.params, max(1, world)
    kind = engine if engine != "deepspeed" else f"zero{zero_stage}"
    compute = 2 * p if bf16 else 0
    rows = {
        "ddp": (compute, 4 * p, 4 * p, 8 * p),
        "zero1": (compute, 4 * p / w, 4 * p + (2 * p if bf16 else 0), 8 * p / w),
        "zero2": (compute, 4 * p / w, 4 * p / w + (2 * p if bf16 else 0), 8 * p / w),
        "zero3": ((2 * p if bf16 else 4 * p) / w, 4 * p / w if bf16 else 0, 4 * p / w, 8 * p / w),
        "fsdp": (0, 4 * p / w, 4 * p / w, 8 * p / w),
    }
    weights, masters, grads, moments = rows[kind]
    if lora:  # frozen base in the compute dtype; adapters are negligible
        weights, masters, grads, moments = (2 if bf16 else 4) * p, 0, 0, 0
    block = (2 if bf16 else 4) * p / s.layers if kind in ("zero3", "fsdp") else 0
    seq = text_tokens + 1 + image_tokens
    act = micro_batch * seq * s.layers * activation_bytes_per_token_layer(s, level)
    logits = micro_batch * image_tokens * s.codebook * (2 + 4) * 2
    rollout = rollout_batch * image_tokens * s.codebook * 2 * (2 if guidance else 1)
    out = {
        "weights for the forwards": weights + block,
        "float32 master weights": masters,
        "gradients": grads,
        "AdamW moments": moments,
        "frozen reference": (2 if bf16 else 4) * p if reference and not lora else 0,
        "training activations (one micro-batch)": act,
        "training logits (one micro-batch)": logits,
        "rollout logits (one forward)": rollout,
    }
    gib = {k: v / GB for k, v in out.items()}
    persistent = sum(v for k, v in gib.items() if "logits" not in k and "activations" not in k)
    gib["total"] = persistent + max(gib["training activations (one micro-batch)"]
                                    + gib["training logits (one micro-batch)"], gib["rollout logits (one forward)"])
    return gib


GPU_PRESETS = {"h200": 141, "h100": 80, "a100-80": 80, "l40s": 48, "a100-40": 40, "rtx4090": 24}  # GiB, largest first


def fitting_gpus(total_gib: float) -> list[str]:
    """The GPUs of `GPU_PRESETS` whose memory holds `total_gib` (none when it exceeds the largest)."""
    return [name for name, gib in GPU_PRESETS.items() if total_gib <= gib]


def describe(gib: dict[str, float], shape: Shape) -> str:
    lines = [f"memory per GPU (estimate, {shape.params / 1e6:,.1f}M parameters, K = {shape.codebook}):"]
    lines += [f"  {k:40s} {v:8.2f} GiB" for k, v in gib.items() if k != "total" and v > 0]
    lines.append(f"  {'peak: persistent + max(training, rollout)':40s} {gib['total']:8.2f} GiB")
    return "\n".join(lines)
