"""PatchVQ: the tiny-world image tokenizer. Each non-overlapping p x p RGB patch becomes the id of its
nearest (L2) codebook entry; decoding pastes the entry back. Same API as `AutoencoderVQ`.

On disk (`vae/`): config.json {"_class_name": "PatchVQ", patch_size, num_vq_embeddings, in_channels,
sample_size, colour_groups} + diffusion_pytorch_model.safetensors with one tensor, `codebook`
Float[K, in_channels*p*p] (pixel values in [-1, 1], flattened channel-major: c, then row, then column
inside the patch).

Colour groups (optional, `colour_groups` = [background RGB, colour 1 RGB, ...]): a patch's group is the
colour most of its non-background pixels are nearest to (0 = background only). `fit` then gives each group
its own share of entries (k-means within the group), and `encode` searches only the entries of the patch's
own group, so a shape is never reconstructed with another colour's patches (plain k-means blends the
slivers of similar colours into mixed-colour entries).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
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

CLASS_NAME = "PatchVQ"
_BLOCK = 1 << 22  # floats per distance block (rows x codebook entries): 16 MiB
_SEED_POOL = 64  # k-means++ draws its seeds from at most this many distinct patches per codebook entry


@dataclass
class PatchVQConfig:
    """config.json fields of a PatchVQ."""

    patch_size: int = 8
    num_vq_embeddings: int = 256
    in_channels: int = 3
    sample_size: int | tuple[int, int] = 64
    colour_groups: list | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> PatchVQConfig:
        """Parse and validate; unknown keys are ignored. ConfigError names `source` and the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}.")
        name = d.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ConfigError(f"{source}: '_class_name' is {name!r}, expected {CLASS_NAME!r}.")
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if isinstance(known.get("sample_size"), list):
            known["sample_size"] = tuple(known["sample_size"])
        cfg = cls(**known)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **asdict(self)}
        if isinstance(self.sample_size, tuple):
            out["sample_size"] = list(self.sample_size)
        if self.colour_groups is None:  # files without colour groups stay as they were
            del out["colour_groups"]
        return out

    def validate(self, source: str = "PatchVQConfig") -> None:
        for name in ("patch_size", "num_vq_embeddings", "in_channels"):
            check_int(getattr(self, name), name, source)
        check_size(self.sample_size, "sample_size", source)
        groups = self.colour_groups
        if groups is not None and not (isinstance(groups, list) and len(groups) >= 2 and all(
                isinstance(c, list) and len(c) == self.in_channels and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c) for c in groups)):
            raise ConfigError(f"{source}: field 'colour_groups' must be null or a list of at least two "
                              f"[{self.in_channels} integers in 0..255] colours, background first.")


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """Float[B, C, H, W] -> Float[B, H/p, W/p, C*p*p]."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h // p, w // p, c * p * p)


def unpatchify(patches: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """Float[B, h, w, C*p*p] -> Float[B, C, h*p, w*p] (inverse of `patchify`)."""
    b, h, w, _ = patches.shape
    x = patches.reshape(b, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h * p, w * p)


def nearest(
    x: torch.Tensor, centers: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center (L2) of each row: x Float[N, D], centers Float[K, D] -> (ids Long[N], dist2 Float[N]).

    Distances |x|^2 - 2<x, c> + |c|^2 are computed in `dtype` over row blocks of at most 4M entries.
    Ties go to the lowest id.
    """
    c = centers.to(dtype)
    c2 = c.square().sum(1)
    rows = max(1, _BLOCK // max(1, c.shape[0]))
    ids, dist = [], []
    for start in range(0, x.shape[0], rows):
        xb = x[start : start + rows].to(dtype)
        d = torch.addmm(c2[None, :], xb, c.T, alpha=-2.0)  # |c|^2 - 2 <x, c>
        best = d.argmin(1)
        ids.append(best)
        dist.append((d.gather(1, best[:, None]).squeeze(1) + xb.square().sum(1)).clamp_min(0))
    if not ids:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(ids), torch.cat(dist)


class PatchVQ(nn.Module):
    """Patch tokenizer: image Float[B, C, H, W] in [-1, 1] <-> ids Long[B, H/p, W/p]."""

    def __init__(self, config: PatchVQConfig | None = None, codebook: torch.Tensor | None = None) -> None:
        super().__init__()
        cfg = config or PatchVQConfig()
        cfg.validate()
        self.config = cfg
        dim = cfg.in_channels * cfg.patch_size**2
        if codebook is None:
            codebook = torch.zeros(cfg.num_vq_embeddings, dim)
        if tuple(codebook.shape) != (cfg.num_vq_embeddings, dim):
            raise ValueError(f"codebook must have shape [{cfg.num_vq_embeddings}, {dim}], "
                             f"got {list(codebook.shape)}.")
        self.register_buffer("codebook", codebook.detach().clone().float())
        self._groups: tuple | None = None

    @property
    def groups(self) -> torch.Tensor | None:
        """Long[K]: each entry's colour group (derived from the codebook, cached); None without groups."""
        if not self.config.colour_groups:
            return None
        key = (self.codebook.data_ptr(), self.codebook.device)
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, self.group_of(self.codebook))
        return self._groups[1]

    def group_of(self, patches: torch.Tensor) -> torch.Tensor:
        """Long[N]: the colour group of each flat patch Float[N, C*p*p] (see the module docstring)."""
        cfg = self.config
        colours = torch.tensor(cfg.colour_groups, dtype=torch.float32, device=patches.device) / 127.5 - 1
        pixels = patches.reshape(-1, cfg.in_channels, cfg.patch_size**2).transpose(1, 2).float()  # [N, P, C]
        nearest_colour = torch.cdist(pixels.reshape(-1, cfg.in_channels), colours).argmin(1).view(pixels.shape[:2])
        votes = torch.nn.functional.one_hot(nearest_colour, len(colours)).sum(1)
        votes[:, 0] = 0
        return torch.where(votes.amax(1) > 0, votes.argmax(1), 0)

    @property
    def num_embeddings(self) -> int:
        """K: codebook rows."""
        return self.config.num_vq_embeddings

    @property
    def spatial_stride(self) -> int:
        """Pixels per token side (the patch size)."""
        return self.config.patch_size

    def _check(self, images: torch.Tensor) -> None:
        p, c = self.config.patch_size, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] % p or images.shape[3] % p:
            raise ValueError(f"expected images [B, {c}, H, W] with H, W multiples of {p}, "
                             f"got {list(images.shape)}.")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float[B, C, H, W] in [-1, 1] -> Long[B, H/p, W/p]: nearest codebook patch (float64 distances)."""
        self._check(images)
        patches = patchify(images, self.config.patch_size)
        flat = patches.reshape(-1, patches.shape[-1])
        groups = self.groups
        if groups is None:
            return nearest(flat, self.codebook)[0].view(patches.shape[:3])
        want, ids = self.group_of(flat), torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for g in want.unique().tolist():
            rows, entries = (want == g).nonzero().squeeze(1), (groups == g).nonzero().squeeze(1)
            if entries.numel() == 0:  # no entry of this colour: search them all
                entries = torch.arange(self.num_embeddings, device=flat.device)
            ids[rows] = entries[nearest(flat[rows], self.codebook[entries])[0]]
        return ids.view(patches.shape[:3])

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[B, h, w] -> Float[B, C, h*p, w*p] in [-1, 1]: the codebook patches pasted side by side."""
        if ids.dim() != 3:
            raise ValueError(f"decode expects ids of shape [B, h, w], got {list(ids.shape)}.")
        patches = self.codebook[ids.long()]
        return unpatchify(patches, self.config.patch_size, self.config.in_channels).float().clamp(-1, 1)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors ({"codebook": Float[K, C*p*p]})."""
        save_folder(folder, self.config.to_dict(), self)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> PatchVQ:
        """Load a `vae/` folder written by `save_pretrained` (or a legacy .bin). Default dtype float32."""
        folder = Path(folder)
        dtype = resolve_dtype(dtype)
        data, path = read_config(folder, "vae/")
        config = PatchVQConfig.from_dict(data, source=str(path))
        with torch.device("meta"):
            model = cls(config)
        return load_weights(model, folder, dtype, device).eval()

    @classmethod
    def fit(
        cls, images: torch.Tensor, num_embeddings: int, patch_size: int = 8, iters: int = 25, seed: int = 0,
        colour_groups: list | None = None,
    ) -> PatchVQ:
        """Fit the codebook by k-means (k-means++ init) on the patches of Float[N, C, H, W] in [-1, 1].

        Identical patches are merged and weighted by their count first (flat backgrounds repeat a lot),
        so the work scales with the number of distinct patches. Deterministic for a seed: all sampling
        uses one `torch.Generator`. Empty clusters are re-seeded with the worst-served patches. With
        fewer distinct patches than `num_embeddings`, the spare entries are random colours (distinct,
        never the nearest entry of a training patch). With `colour_groups`, each group gets entries in
        proportion to its distinct patches (at least one) and its own k-means.
        """
        if images.dim() != 4 or images.shape[2] % patch_size or images.shape[3] % patch_size:
            raise ValueError(f"fit expects images [N, C, H, W] with H, W multiples of {patch_size}, "
                             f"got {list(images.shape)}.")
        n, c, h, w = images.shape
        config = PatchVQConfig(patch_size, num_embeddings, c, h if h == w else (h, w), colour_groups)
        config.validate()
        gen = torch.Generator().manual_seed(seed)
        x = patchify(images.detach().to("cpu", torch.float32), patch_size).reshape(-1, c * patch_size**2)
        points, counts = torch.unique(x, dim=0, return_counts=True)
        if not colour_groups:
            return cls(config, _kmeans(points, counts.double(), num_embeddings, iters, gen).clamp(-1, 1))
        labels = cls(config).group_of(points)
        present = labels.unique().tolist()
        sizes = [int((labels == g).sum()) for g in present]
        books = [_kmeans(points[labels == g], counts[labels == g].double(), k, iters, gen)
                 for g, k in zip(present, _allot(sizes, num_embeddings), strict=True)]
        return cls(config, torch.cat(books).clamp(-1, 1))


def _allot(sizes: list[int], k: int) -> list[int]:
    """k entries over groups in proportion to `sizes`, at least one each (largest remainders)."""
    if k < len(sizes):
        raise ValueError(f"{k} codebook entries cannot cover {len(sizes)} colour groups.")
    share = [(k - len(sizes)) * s / sum(sizes) for s in sizes]
    out = [1 + int(x) for x in share]
    for i in sorted(range(len(sizes)), key=lambda i: -(share[i] - int(share[i])))[: k - sum(out)]:
        out[i] += 1
    return out


def _kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means (k-means++ seeding, Lloyd's iterations) of distinct Float[M, D] points -> Float[k, D].
    Empty clusters are re-seeded with the worst-served points."""
    weighted = points.double() * weights[:, None]
    centers = _kmeans_pp(points, weights, k, gen)
    for _ in range(iters):
        ids, dist = nearest(points, centers, dtype=torch.float32)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, ids, weights)
        sums = torch.zeros(k, points.shape[1], dtype=torch.float64).index_add_(0, ids, weighted)
        filled = mass > 0
        new = torch.where(filled[:, None], sums / mass.clamp_min(1e-12)[:, None], centers.double()).float()
        empty = (~filled).nonzero().squeeze(1)
        if len(empty):  # re-seed with the distinct patches farthest from their current center
            worst = torch.topk(dist * weights.float(), min(len(empty), len(points))).indices
            exact = (points[worst].double() - centers[ids[worst]].double()).square().sum(1)
            worst = worst[exact > 0]  # float32 distances of exact matches are not exactly zero
            new[empty[: len(worst)]] = points[worst]
        if torch.equal(new, centers):
            break
        centers = new
    return centers


def _kmeans_pp(points: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of Float[M, D] distinct points with weights Float64[M] -> Float[k, D].

    Seeds are drawn from a uniform subsample of at most `_SEED_POOL * k` distinct points (each keeping
    its count), so seeding costs O(k^2 D) rather than O(k M D); Lloyd's iterations then use all points.
    """
    m, dim = points.shape
    # drawn first so the stream never depends on M
    spare = torch.rand(k, dim, generator=gen, device=gen.device).to(points.device) * 2 - 1
    if m <= k:
        return torch.cat([points, spare[: k - m]])
    if m > _SEED_POOL * k:
        pool = torch.randperm(m, generator=gen, device=gen.device)[: _SEED_POOL * k].sort().values.to(points.device)
        points, weights = points[pool], weights[pool]
    p64 = points.double()
    norms = p64.square().sum(1)
    chosen = [int(torch.multinomial(weights, 1, generator=gen))]
    dist = (norms - 2 * p64 @ p64[chosen[0]] + norms[chosen[0]]).clamp_min(0)
    dist[chosen[0]] = 0
    for _ in range(1, k):
        prob = dist * weights
        if not prob.sum() > 0:
            break
        i = int(torch.multinomial(prob, 1, generator=gen))
        chosen.append(i)
        dist = torch.minimum(dist, (norms - 2 * p64 @ p64[i] + norms[i]).clamp_min(0))
        dist[i] = 0
    centers = points[torch.tensor(chosen)]
    return torch.cat([centers, spare[: k - len(chosen)]])
