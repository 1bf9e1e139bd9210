"""URSA transformer: a bidirectional Qwen3 stack over [text | BOV | image tokens] with 3-D RoPE.

One sequence, one embedding table (text ids < lm_vocab_size, image ids = codebook id + lm_vocab_size),
one stack of pre-norm blocks (GQA attention with per-head q/k RMSNorm, SwiGLU MLP, no biases, no mask)
and an image-only head Linear(hidden -> K). The state-dict keys and `config.json` fields are those of
the reference `URSATransformer3DModel`, so official checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .io import CONFIG_NAME, DIFFUSERS_VERSION, load_weights, read_config, resolve_dtype, save_folder

CLASS_NAME = "URSATransformer3DModel"
_WRITTEN = ("_class_name", "_diffusers_version")  # rewritten on save, like diffusers does


@dataclass
class URSAConfig:
    """Transformer hyper-parameters (defaults: URSA-1.7B). `extra` keeps unknown config.json keys."""

    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    num_hidden_layers: int = 28
    rope_theta: float = 1_000_000
    vocab_size: int = 215_669
    lm_vocab_size: int = 151_669
    lm_head_size: int = 64_000
    bov_token_id: int = 151_652
    head_dim: int = 128  # Qwen3Config default; never hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    max_window_layers: int = 28
    attn_implementation: str | None = None  # kept for the file; attention is always SDPA here
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = CONFIG_NAME) -> URSAConfig:
        """Read a config.json dict; unknown keys go to `extra` (the `_class_name`/`_diffusers_version`
        stamps are dropped and rewritten). Raises ConfigError naming source and field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}.")
        class_name = d.get("_class_name", CLASS_NAME)
        if class_name != CLASS_NAME:
            raise ConfigError(f"{source}: '_class_name' is {class_name!r}, expected {CLASS_NAME!r}.")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _WRITTEN}
        cfg = cls(**known, extra=extra)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The reference's config.json fields plus head_dim, rms_norm_eps and `extra`."""
        out = {**self.extra, "_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return out

    def validate(self, source: str = "URSAConfig") -> None:
        """Check field types and invariants: vocab_size = lm_vocab_size + K, GQA and RoPE divisibility."""

        def fail(msg: str) -> NoReturn:
            raise ConfigError(f"{source}: {msg}")

        for f in fields(self):  # annotations are strings under `from __future__ import annotations`
            name, v = f.name, getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                fail(f"field '{name}' must be an integer, got {v!r}.")
            if f.type == "float" and (not isinstance(v, int | float) or isinstance(v, bool)):
                fail(f"field '{name}' must be a number, got {v!r}.")
            if f.type in ("int", "float") and name != "bov_token_id" and not v > 0:
                fail(f"field '{name}' must be positive, got {v!r}.")
        if self.attn_implementation is not None and not isinstance(self.attn_implementation, str):
            fail(f"field 'attn_implementation' must be a string or null, got {self.attn_implementation!r}.")
        if not isinstance(self.extra, dict):
            fail(f"'extra' must be a dict, got {type(self.extra).__name__}.")
        if self.vocab_size != self.lm_vocab_size + self.lm_head_size:
            total = self.lm_vocab_size + self.lm_head_size
            fail(f"field 'vocab_size' ({self.vocab_size}) must equal lm_vocab_size + lm_head_size ({total}).")
        if not 0 <= self.bov_token_id < self.lm_vocab_size:
            fail(f"field 'bov_token_id' ({self.bov_token_id}) must be a text id in [0, lm_vocab_size).")
        if self.num_attention_heads % self.num_key_value_heads:
            h, kv = self.num_attention_heads, self.num_key_value_heads
            fail(f"field 'num_attention_heads' ({h}) must be a multiple of num_key_value_heads ({kv}).")
        try:
            rope_axes(self.head_dim)
        except ValueError as e:
            fail(f"field 'head_dim' {e}")


def rope_axes(head_dim: int) -> list[int]:
    """Axis (0 = t, 1 = h, 2 = w) of each of the D/2 rotation pairs.

    The first 3 * (D // 8) pairs cycle t, h, w; the remaining pairs alternate h, w. For D = 128:
    48 interleaved pairs then 16 alternating, so t gets 16 pairs and h, w get 24 each.
    """
    n_cycle = 3 * (head_dim // 8)
    n_rest = head_dim // 2 - n_cycle
    if head_dim % 2 or n_rest % 2 or head_dim < 8:
        raise ValueError(f"({head_dim}) does not split into the 3-D RoPE axes; use a multiple of 16.")
    return [i % 3 for i in range(n_cycle)] + [1 + i % 2 for i in range(n_rest)]


def rope_positions(text_len: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Long[L + 1 + H * W, 3] (t, h, w) positions: text i -> (i, i, i), BOV -> (L, L, L),
    image token n = h * W + w -> (L + 1, h, w)."""
    h, w = grid
    text = torch.arange(text_len + 1, device=device).unsqueeze(1).expand(-1, 3)
    hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    image = torch.stack([torch.full_like(hh, text_len + 1), hh, ww], -1).reshape(-1, 3)
    return torch.cat([text, image])


def rope_angles(positions: torch.Tensor, axes: torch.Tensor, theta: float) -> torch.Tensor:
    """Float32[..., D/2] angle_i = p[axis(i)] * theta^(-2i / D), for Long positions [..., 3]."""
    exponent = torch.arange(0, 2 * axes.numel(), 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.pow(float(theta), exponent / (2 * axes.numel())).reciprocal()
    return positions[..., axes].float() * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on x [B, S, H, D]: pair i = (x_i, x_{i+D/2}) turned by angle_i.

    cos, sin: [B, S, 1, D/2]. The reference writes each rotated pair interleaved (channels 2i, 2i+1):
    the same permutation of q and of k, so q . k and the attention are identical.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention: H query heads, H_kv key/value heads of size D (H * D need not equal hidden)."""

    def __init__(self, cfg: URSAConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> q [B, S, H, D], k, v [B, S, H_kv, D]; q and k RMS-normed per head."""
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.n_kv, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.head_dim))
        return self.q_norm(q), self.k_norm(k), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """RoPE, then softmax(q k^T / sqrt(D)) v over the whole sequence (no mask), then o_proj."""
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.n_heads != self.n_kv:  # query head h reads kv head h // (H / H_kv)
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.o_proj(o.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: URSAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _maybe_checkpoint(enabled: bool, fn: Callable, *args: Any) -> Any:
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Block(nn.Module):
    """Pre-norm block: h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h)).

    checkpoint_level: 0 none, 1 recompute norm + MLP, 2 also norm + qkv + q/k norms, 3 the whole block.
    """

    def __init__(self, cfg: URSAConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpoint_level = 0

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.qkv(self.input_layernorm(x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        level = self.checkpoint_level
        q, k, v = _maybe_checkpoint(level == 2, self._qkv, x)
        x = x + self.self_attn.attend(q, k, v, cos, sin)
        return x + _maybe_checkpoint(level in (1, 2), self._mlp, x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint_level == 3, self._forward, x, cos, sin)


class Backbone(nn.Module):
    """Holds the `model.*` weights: embed_tokens, layers, norm."""

    def __init__(self, cfg: URSAConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class URSATransformer(nn.Module):
    """URSA transformer; logits cover the K image codebook entries only (lm_head is not tied)."""

    def __init__(self, config: URSAConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.lm_head_size, bias=False)
        self._set_rope_buffer()
        if not self.lm_head.weight.is_meta:
            self.reset_parameters()

    def _set_rope_buffer(self, device: torch.device | str | None = None) -> None:
        axes = torch.tensor(rope_axes(self.config.head_dim), dtype=torch.long, device=device)
        self.register_buffer("rope_axes", axes, persistent=False)

    def reset_parameters(self) -> None:
        """Linear and embedding weights ~ N(0, 0.02); norm weights = 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    @property
    def image_offset(self) -> int:
        """Vocabulary id of codebook entry 0 (= lm_vocab_size)."""
        return self.config.lm_vocab_size

    @property
    def codebook_size(self) -> int:
        """K: rows of lm_head = number of image codebook entries."""
        return self.config.lm_head_size

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # -- gradient checkpointing
    @property
    def gradient_checkpointing(self) -> bool:
        return any(layer.checkpoint_level for layer in self.model.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.set_gradient_checkpointing(3 if value else 0)

    def set_gradient_checkpointing(self, level: int | bool) -> None:
        """0 none, 1 MLP, 2 MLP + attention qkv, 3 whole layer (True = 3); active only when grad is on."""
        level = 3 if level is True else int(level)
        if level not in (0, 1, 2, 3):
            raise ConfigError(f"gradient checkpointing level must be 0, 1, 2 or 3, got {level}.")
        for layer in self.model.layers:
            layer.checkpoint_level = level

    # -- forward
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float[B, S, hidden] after the last block, before the final norm. positions: Long[B or 1, S, 3]."""
        x = self.model.embed_tokens(input_ids)
        angles = rope_angles(positions, self.rope_axes, self.config.rope_theta).unsqueeze(-2)
        cos, sin = angles.cos(), angles.sin()  # [B, S, 1, D/2]
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm + lm_head: [..., hidden] -> [..., K]."""
        return self.lm_head(self.model.norm(hidden))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: int | None = None
    ) -> torch.Tensor:
        """input_ids Long[B, S] (vocabulary ids), positions Long[B, S, 3] or [S, 3] -> Float[B, S, K].

        With logits_to_keep = n > 0 the norm and head run on the last n positions only -> [B, n, K].
        """
        if positions.dim() == 2:
            positions = positions.unsqueeze(0)
        hidden = self.hidden_states(input_ids, positions.expand(input_ids.shape[0], -1, -1))
        return self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def image_logits(
        self, text_ids: torch.Tensor, image_ids: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Float[B, N, K] logits for codebook ids image_ids Long[B, N] (N = H * W) given text Long[B, L].

        Runs [text | BOV | image_ids + lm_vocab_size] and reads the shifted positions [-(N+1):-1]:
        the hidden state at BOV predicts img_0, the one at img_{n-1} predicts img_n.
        """
        (batch, text_len), n = text_ids.shape, image_ids.shape[1]
        if n != grid[0] * grid[1]:
            raise ValueError(f"image_ids has {n} tokens but grid {tuple(grid)} holds {grid[0] * grid[1]}.")
        bov = text_ids.new_full((batch, 1), self.config.bov_token_id)
        ids = torch.cat([text_ids, bov, image_ids.to(text_ids.dtype) + self.image_offset], dim=1)
        positions = rope_positions(text_len, grid, device=ids.device).unsqueeze(0)
        return self.head(self.hidden_states(ids, positions)[:, -(n + 1) : -1])

    # -- disk
    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json and diffusion_pytorch_model.safetensors (reference layout)."""
        save_folder(folder, self.config.to_dict(), self)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> URSATransformer:
        """Load a `transformer/` folder: config.json + safetensors (single or sharded) or legacy .bin.

        The model is built on the meta device and each weight is cast to `dtype` (default float32) and
        placed on `device` (default CPU) as it is read, so no second in-memory copy of the model exists.
        Returns the model in eval mode.
        """
        folder = Path(folder)
        dtype = resolve_dtype(dtype)
        data, path = read_config(folder, "transformer/")
        config = URSAConfig.from_dict(data, source=str(path))
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, folder, dtype, device)
        model._set_rope_buffer(device=model.device)
        return model.eval()
