"""URSA's IBQ-style conv VQ autoencoder (`AutoencoderVQ`); a reference `vae/` folder loads unchanged.

Images Float[B, 3, H, W] in [-1, 1] <-> codebook ids Long[B, H/s, W/s], s = 2^(L-1) with
L = len(block_out_channels). Encoder -> `quant_conv` (1x1) -> ids = argmax_k <z, e_k> (inner product,
z not normalised); decode = embedding lookup -> `post_quant_conv` (1x1) -> decoder.

State-dict keys, checked against baaivision/URSA `diffnext/models/autoencoders/autoencoder_vq.py`,
`autoencoder_kl.py` (Encoder, Decoder, UNetResBlock, UNetMidBlock, ResBlock, Resize, Attention) and
`quantizers.py` (VQuantizer). n = layers_per_block, C = block_out_channels, every entry `.weight` +
`.bias` except the codebook:

    encoder.conv_in                                      3x3, in_channels -> C[0]
    encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2}          i < L, j < n
    encoder.down_blocks.{i}.resnets.0.conv_shortcut      1x1, only where C[i-1] != C[i]
    encoder.down_blocks.{i}.downsamplers.0.conv          3x3 stride 2, i < L-1
    encoder.down_blocks.{L-1}.attentions.{j}.{group_norm,to_q,to_k,to_v,to_out.0}   attn_down_block, j < n
    encoder.mid_block.resnets.{0,1}.* , encoder.mid_block.attentions.0.*
    encoder.conv_norm_out , encoder.conv_out             3x3, C[-1] -> latent_channels
    quant_conv                                           1x1, latent_channels -> vq_embed_dim
    quantizer.embedding.weight                           [num_vq_embeddings, vq_embed_dim]
    post_quant_conv                                      1x1, vq_embed_dim -> latent_channels
    decoder.conv_in                                      3x3, latent_channels -> C[-1]
    decoder.mid_block.resnets.{0,1}.* , decoder.mid_block.attentions.0.*
    decoder.up_blocks.{i}.resnets.{j}.*                  channels reversed, j < n+1
    decoder.up_blocks.{i}.upsamplers.0.conv              3x3 after nearest x2, i < L-1
    decoder.up_blocks.0.attentions.{j}.*                 attn_up_block, j < n+1
    decoder.conv_norm_out , decoder.conv_out             3x3, C[0] -> out_channels

Attention blocks are single-head with `nn.Linear` q/k/v/out (not 1x1 convs). The reference hard-codes
GroupNorm(32) and SiLU; here `norm_num_groups` is honoured (32 in every reference config) and `act_fn`
must be silu.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .io import (
    DIFFUSERS_VERSION,
    check_int,
    check_size,
    load_weights,
    read_config,
    resolve_dtype,
    save_folder,
)

CLASS_NAME = "AutoencoderVQ"
QUANTIZERS = ("VQuantizer",)
_INT_FIELDS = ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
               "num_vq_embeddings", "vq_embed_dim", "temporal_stride", "spatial_stride")
_BOOL_FIELDS = ("attn_down_block", "attn_up_block", "force_upcast")


@dataclass
class VQConfig:
    """The reference's `vae/config.json` fields and defaults (`quantizer_name` is `_quantizer_name` on
    disk). `extra` keeps unknown keys so that a round trip preserves them."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 1024
    num_vq_embeddings: int = 16384
    vq_embed_dim: int = 8
    attn_down_block: bool = False
    attn_up_block: bool = False
    force_upcast: bool = False
    temporal_stride: int = 1
    spatial_stride: int = 16  # as written; the architecture's stride is 2^(L-1) (see AutoencoderVQ)
    decoder_dtype: str | None = None
    quantizer_name: str = "VQuantizer"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> VQConfig:
        """Parse and validate a config.json dict; ConfigError names `source` and the field at fault."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}.")
        name = d.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ConfigError(f"{source}: '_class_name' is {name!r}, expected {CLASS_NAME!r}.")
        names = {f.name for f in fields(cls)} - {"extra", "quantizer_name"}
        known = {k: v for k, v in d.items() if k in names}
        if "_quantizer_name" in d:
            known["quantizer_name"] = d["_quantizer_name"]
        extra = {k: v for k, v in d.items()
                 if k not in names and k not in ("_class_name", "_diffusers_version", "_quantizer_name")}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if isinstance(known.get(key), list):
                known[key] = tuple(known[key])
        if isinstance(known.get("sample_size"), list):
            known["sample_size"] = tuple(known["sample_size"])
        cfg = cls(**known, extra=extra)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The same fields as the reference writes (lists for tuples), plus `extra`."""
        out: dict[str, Any] = {**self.extra, "_class_name": CLASS_NAME}
        out["_diffusers_version"] = DIFFUSERS_VERSION
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            key = "_quantizer_name" if f.name == "quantizer_name" else f.name
            out[key] = list(v) if isinstance(v, tuple) else v
        return out

    def validate(self, source: str = "VQConfig") -> None:
        """Types, positivity, GroupNorm divisibility and the supported quantiser / activation / dtype."""
        for name in _INT_FIELDS:
            check_int(getattr(self, name), name, source)
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"{source}: field '{name}' must be true or false, got {v!r}.")
        check_size(self.sample_size, "sample_size", source)
        chans = self.block_out_channels
        if not isinstance(chans, tuple) or not chans:
            raise ConfigError(f"{source}: field 'block_out_channels' must be a non-empty list, "
                              f"got {chans!r}.")
        for c in chans:
            check_int(c, "block_out_channels", source)
            if c % self.norm_num_groups:
                raise ConfigError(f"{source}: field 'block_out_channels' entry {c} is not a multiple of "
                                  f"norm_num_groups ({self.norm_num_groups}).")
        for key in ("down_block_types", "up_block_types"):
            v = getattr(self, key)
            if not isinstance(v, tuple) or not all(isinstance(s, str) for s in v):
                raise ConfigError(f"{source}: field '{key}' must be a list of strings, got {v!r}.")
        if self.act_fn not in ("silu", "swish"):
            raise ConfigError(f"{source}: field 'act_fn' must be 'silu', got {self.act_fn!r}.")
        if self.quantizer_name not in QUANTIZERS:
            raise ConfigError(f"{source}: field '_quantizer_name' is {self.quantizer_name!r}; only "
                              f"{', '.join(QUANTIZERS)} (IBQ) is supported.")
        if self.decoder_dtype is not None:
            dt = getattr(torch, self.decoder_dtype, None) if isinstance(self.decoder_dtype, str) else None
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise ConfigError(f"{source}: field 'decoder_dtype' must be null or a torch float dtype name "
                                  f"such as 'bfloat16', got {self.decoder_dtype!r}.")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"{source}: 'extra' must be a dict, got {type(self.extra).__name__}.")


def _norm(groups: int, dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, dim, eps=1e-6)


class Attention(nn.Module):
    """Single-head self-attention over h*w positions; returns the update (the caller adds the residual)."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _norm(groups, dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float[B, C, h, w] -> Float[B, C, h, w]."""
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, hw, C]
        q, k, v = (f(t).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """(GroupNorm -> SiLU -> conv3x3) x 2 plus the input (1x1 `conv_shortcut` when channels change)."""

    def __init__(self, dim: int, out_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(groups, dim), nn.Conv2d(dim, out_dim, 3, 1, 1)
        self.norm2, self.conv2 = _norm(groups, out_dim), nn.Conv2d(out_dim, out_dim, 3, 1, 1)
        self.conv_shortcut = nn.Conv2d(dim, out_dim, 1) if dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        x = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(x))) + skip


class Downsample(nn.Module):
    """Pad right/bottom by one, then conv3x3 stride 2 (no padding): [h, w] -> [h/2, w/2]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then conv3x3: [h, w] -> [2h, 2w]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LevelBlock(nn.Module):
    """`depth` ResBlocks (each optionally followed by residual attention), then an optional resize."""

    def __init__(self, dim: int, out_dim: int, depth: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        dims = [dim] + [out_dim] * (depth - 1)
        self.resnets = nn.ModuleList(ResBlock(d, out_dim, groups) for d in dims)
        self.attentions = nn.ModuleList()
        self.downsamplers = nn.ModuleList([Downsample(out_dim)] if down else [])
        self.upsamplers = nn.ModuleList([Upsample(out_dim)] if up else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if i < len(self.attentions):
                x = x + self.attentions[i](x)
        for resize in (*self.downsamplers, *self.upsamplers):
            x = resize(x)
        return x


class MidBlock(nn.Module):
    """ResBlock -> residual single-head attention -> ResBlock, at constant width."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim, groups), ResBlock(dim, dim, groups)])
        self.attentions = nn.ModuleList([Attention(dim, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](x + self.attentions[0](x))


class Encoder(nn.Module):
    """Float[B, in, H, W] -> Float[B, out, H/s, W/s]."""

    def __init__(self, dim: int, out_dim: int, chans: tuple[int, ...], depth: int, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(dim, chans[0], 3, 1, 1)
        self.down_blocks = nn.ModuleList(
            LevelBlock(chans[max(i - 1, 0)], c, depth, groups, down=i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = _norm(groups, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], out_dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Float[B, in, h, w] -> Float[B, out, h*s, w*s]; levels run in reversed channel order."""

    def __init__(self, dim: int, out_dim: int, chans: tuple[int, ...], depth: int, groups: int) -> None:
        super().__init__()
        rev = tuple(reversed(chans))
        self.conv_in = nn.Conv2d(dim, rev[0], 3, 1, 1)
        self.mid_block = MidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList(
            LevelBlock(rev[max(i - 1, 0)], c, depth + 1, groups, up=i < len(rev) - 1)
            for i, c in enumerate(rev)
        )
        self.conv_norm_out = _norm(groups, rev[-1])
        self.conv_out = nn.Conv2d(rev[-1], out_dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VQuantizer(nn.Module):
    """Index-backpropagation (IBQ) quantiser: ids = argmax_k <z, e_k> over `embedding.weight` [K, D]."""

    def __init__(self, num_embeddings: int, dim: int, chunk: int = 4096) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        self.chunk = chunk

    def quantize(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Float[B, D, h, w] -> Long[B, h, w]; scores are computed in float32, `chunk` codes at a time,
        so no [B*h*w, K] table exists. Ties go to the lowest id, as with a single argmax."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        weight, step = self.embedding.weight, chunk or self.chunk
        best = torch.full((flat.shape[0],), float("-inf"), device=z.device)
        ids = torch.zeros(flat.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, weight.shape[0], step):
            scores = flat @ weight[start : start + step].float().T
            idx = scores.argmax(1)
            val = scores.gather(1, idx[:, None]).squeeze(1)
            better = val > best
            best, ids = torch.where(better, val, best), torch.where(better, idx + start, ids)
        return ids.view(b, h, w)

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[B, h, w] -> Float[B, D, h, w]."""
        return self.embedding(ids.long()).permute(0, 3, 1, 2)


class AutoencoderVQ(nn.Module):
    """URSA's IBQ VQ autoencoder. Build from a `VQConfig`, or load with `from_pretrained(vae_folder)`."""

    def __init__(self, config: VQConfig | None = None) -> None:
        super().__init__()
        cfg = config or VQConfig()
        cfg.validate()
        self.config = cfg
        chans, n, g = tuple(cfg.block_out_channels), cfg.layers_per_block, cfg.norm_num_groups
        self.encoder = Encoder(cfg.in_channels, cfg.latent_channels, chans, n, g)
        self.decoder = Decoder(cfg.latent_channels, cfg.out_channels, chans, n, g)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        if cfg.attn_down_block:
            self.encoder.down_blocks[-1].attentions.extend(Attention(chans[-1], g) for _ in range(n))
        if cfg.attn_up_block:
            self.decoder.up_blocks[0].attentions.extend(Attention(chans[-1], g) for _ in range(n + 1))
        self.quantizer = VQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim)

    @property
    def num_embeddings(self) -> int:
        """K: codebook rows."""
        return self.config.num_vq_embeddings

    @property
    def spatial_stride(self) -> int:
        """Pixels per token side, 2^(L-1) from the architecture (config.spatial_stride is not trusted)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def codebook(self) -> torch.Tensor:
        """Float[K, vq_embed_dim]: `quantizer.embedding.weight`."""
        return self.quantizer.embedding.weight

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float[B, C, H, W] in [-1, 1] (H, W multiples of the stride) -> Long[B, H/s, W/s]."""
        s, c = self.spatial_stride, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] % s or images.shape[3] % s:
            raise ValueError(f"encode expects [B, {c}, H, W] with H, W multiples of {s}, "
                             f"got {list(images.shape)}.")
        z = self.quant_conv(self.encoder(images.to(self.encoder.conv_in.weight.dtype)))
        return self.quantizer.quantize(z)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[B, h, w] -> Float[B, out_channels, h*s, w*s] in [-1, 1] (float32, clamped)."""
        if ids.dim() != 3:
            raise ValueError(f"decode expects ids of shape [B, h, w], got {list(ids.shape)}.")
        z = self.quantizer.dequantize(ids).to(self.post_quant_conv.weight.dtype)
        x = self.post_quant_conv(z).to(self.decoder.conv_in.weight.dtype)
        return self.decoder(x).float().clamp(-1, 1)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors (the reference layout)."""
        save_folder(folder, self.config.to_dict(), self)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> AutoencoderVQ:
        """Load a `vae/` folder (safetensors or legacy .bin). Weights are cast to `dtype` (default float32,
        so fp16-stored weights compute in fp32). `decoder_dtype` from the config is applied to the decoder
        only off the CPU, as the reference's `.to()` does. Returns the model in eval mode."""
        folder = Path(folder)
        dtype = resolve_dtype(dtype)
        data, path = read_config(folder, "vae/")
        config = VQConfig.from_dict(data, source=str(path))
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, folder, dtype, device)
        if config.decoder_dtype and torch.device(device or "cpu").type != "cpu":
            model.decoder.to(getattr(torch, config.decoder_dtype))
        return model.eval()
