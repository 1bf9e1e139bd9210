"""Probability paths of uniform discrete flow matching (t = 0 noise, t = 1 data).

Tokens are codebook ids in [0, K). A path gives, per token independently,

* the conditional marginal p_t(x | x1) (`probs`, `add_noise`),
* the kinetic-optimal conditional velocity u_t(x | x_t, x1) (`velocity`),
* one CTMC Euler jump x_t -> x_{t+dt} towards a sampled clean token (`jump`).

`probs` and `velocity` build full (tokens, K) tables: they are for small K, tests and research.
`add_noise` and `jump` never hold more than one (row_chunk x chunk) float block per operation.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .categorical import chunked_categorical, draw_device

TimeLike = float | torch.Tensor


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _jumping(rate: torch.Tensor, dt: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the tokens that jump within dt: each with probability 1 - exp(-dt R) (one uniform per token)."""
    u = torch.rand(rate.numel(), generator=generator, device=draw_device(generator, rate.device)).to(rate.device)
    return ((u < -torch.expm1(-dt * rate)) & (rate > 0)).nonzero().squeeze(1)


def expand_time(t: TimeLike, x: torch.Tensor) -> torch.Tensor:
    """Broadcast t (a float, Float[B] per sample or a tensor of x's shape) to Float32 of x.shape."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 1 and x.dim() > 1 and t.shape[0] == x.shape[0]:
        t = t.view(-1, *([1] * (x.dim() - 1)))
    return t.expand(x.shape)


class ProbPath(Protocol):
    """What the scheduler needs of a path. Tokens are Long codebook ids in [0, K); t, dt are floats or
    tensors broadcast by `expand_time`; tables are Float[..., K]."""

    @property
    def num_embeddings(self) -> int:
        """K: codebook size."""
        ...

    @property
    def embedding(self) -> torch.Tensor | None:
        """The raw path embedding Float[K, D] as given (saved as `path.emb`), or None if there is none."""
        ...

    def probs(self, x1: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Float[..., K] table of p_t(. | x1)."""
        ...

    def velocity(self, x_t: torch.Tensor, x1: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Float[..., K] table of u_t(. | x_t, x1) (0 at x_t)."""
        ...

    def add_noise(self, x1: torch.Tensor, t: TimeLike, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ p_t(. | x1) per token, Long of x1's shape."""
        ...

    def jump(
        self, x_t: torch.Tensor, x1: torch.Tensor, t: TimeLike, dt: TimeLike, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One CTMC Euler step x_t -> x_{t+dt} towards x1, Long of x_t's shape."""
        ...

    def to(self, device: torch.device | str) -> ProbPath:
        """Move the path's tensors to `device` (in place); returns self."""
        ...


class MixturePath:
    """Uniform mixture path: keep x1 with probability t, else a uniform token.

    p_t(x | x1) = t * [x = x1] + (1 - t) / K;  u_t(x | x_t, x1) = [x = x1] / (1 - t) for x != x_t.
    """

    def __init__(self, num_embeddings: int):
        self.num_embeddings = int(num_embeddings)

    @property
    def embedding(self) -> None:
        """The mixture path has no embedding."""
        return None

    def to(self, device: torch.device | str) -> MixturePath:
        """No tensors to move; returns self."""
        return self

    def probs(self, x1: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Float[..., K] table of p_t(. | x1)."""
        t = expand_time(t, x1)[..., None]
        onehot = torch.nn.functional.one_hot(x1, self.num_embeddings).float()
        return t * onehot + (1 - t) / self.num_embeddings

    def add_noise(self, x1: torch.Tensor, t: TimeLike, generator: torch.Generator | None = None) -> torch.Tensor:
        t = expand_time(t, x1)
        dev = draw_device(generator, x1.device)
        keep = torch.rand(x1.shape, generator=generator, device=dev).to(x1.device) < t
        noise = torch.randint(0, self.num_embeddings, x1.shape, generator=generator, device=dev).to(x1.device)
        return torch.where(keep, x1, noise)

    def velocity(self, x_t: torch.Tensor, x1: torch.Tensor, t: TimeLike) -> torch.Tensor:
        t = expand_time(t, x1)[..., None]
        u = torch.nn.functional.one_hot(x1, self.num_embeddings).float() / (1 - t)
        return u.scatter(-1, x_t[..., None], 0.0)

    def jump(
        self, x_t: torch.Tensor, x1: torch.Tensor, t: TimeLike, dt: TimeLike, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Jump to x1 with probability 1 - exp(-dt / (1 - t)) where x_t != x1, else stay."""
        t = expand_time(t, x1)
        rate = torch.where(x1 != x_t, 1.0 / (1.0 - t), torch.zeros_like(t))
        u = torch.rand(x_t.shape, generator=generator, device=draw_device(generator, x_t.device)).to(x_t.device)
        moves = u < 1 - torch.exp(-dt * rate)
        return torch.where(moves, x1, x_t)


class MetricPath:
    """URSA's metric-induced path over L2-normalised codebook embeddings e_hat.

    d(x, y) = |e_hat_x - e_hat_y|^2 = |e_hat_x|^2 + |e_hat_y|^2 - 2 <e_hat_x, e_hat_y>  in [0, 4]
    beta_t = c (t / (1 - t))^alpha,   beta'_t = c alpha t^(alpha-1) / (1 - t)^(alpha+1)  (0 at t = 0)
    p_t(x | x1) = softmax_x(-beta_t d(x, x1))
    u_t(x | x_t, x1) = p_t(x | x1) beta'_t max(0, d(x_t, x1) - d(x, x1))   (kinetic-optimal; u_t(x_t) = 0)

    Args:
        embedding: Float[K, D] path embedding (the tokenizer codebook, `path.emb` on disk).
        chunk: codebook columns per block; row_chunk: tokens per block.
        table_max: largest K for which `jump` works from a cached K x K table of sorted distances
            (see `_jump_sorted`); larger codebooks (URSA's 64K) stream blocks instead.
    """

    def __init__(
        self,
        embedding: torch.Tensor,
        alpha: float = 0.9,
        c: float = 3.0,
        eps: float = 1e-5,
        chunk: int = 4096,
        row_chunk: int = 1024,
        table_max: int = 2048,
    ):
        emb = embedding.detach().float()
        self.raw_emb = emb
        self.emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(eps)
        self.sq_norm = (self.emb * self.emb).sum(-1)
        self.alpha, self.c, self.eps = float(alpha), float(c), float(eps)
        self.chunk, self.row_chunk, self.table_max = int(chunk), int(row_chunk), int(table_max)
        self._sorted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_embeddings(self) -> int:
        return self.emb.shape[0]

    @property
    def embedding(self) -> torch.Tensor:
        """The raw path embedding Float[K, D] (before L2 normalisation)."""
        return self.raw_emb

    def to(self, device: torch.device | str) -> MetricPath:
        self.emb, self.sq_norm, self.raw_emb = self.emb.to(device), self.sq_norm.to(device), self.raw_emb.to(device)
        self._sorted = None
        return self

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.c * (t / (1 - t)).pow(self.alpha)

    def dbeta(self, t: torch.Tensor) -> torch.Tensor:
        safe = t.clamp_min(1e-12)
        d = self.c * self.alpha * safe.pow(self.alpha - 1) / (1 - t).pow(self.alpha + 1)
        return torch.where(t > 0, d, torch.zeros_like(d))

    def distance(self, y: torch.Tensor, k0: int = 0, k1: int | None = None) -> torch.Tensor:
        """Float[M, k1 - k0]: d(x, y_m) for codes x in [k0, k1) and flat targets y: Long[M]."""
        e = self.emb[k0:k1]
        d = torch.addmm(self.sq_norm[y][:, None] + self.sq_norm[k0:k1][None, :], self.emb[y], e.T, alpha=-2.0)
        return d.clamp_min_(0.0)

    def probs(self, x1: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Float[..., K] table of p_t(. | x1) (full table: small K only)."""
        beta = self.beta(expand_time(t, x1)).reshape(-1, 1)
        table = torch.softmax(-beta * self.distance(x1.reshape(-1)), dim=-1)
        return table.reshape(*x1.shape, -1)

    def velocity(self, x_t: torch.Tensor, x1: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Float[..., K] table of u_t(. | x_t, x1) (full table: small K only)."""
        tt = expand_time(t, x1).reshape(-1, 1)
        y, xt = x1.reshape(-1), x_t.reshape(-1)
        d = self.distance(y)
        d_t = d.gather(1, xt[:, None])
        u = torch.softmax(-self.beta(tt) * d, dim=-1) * self.dbeta(tt) * (d_t - d).clamp_min(0.0)
        return u.scatter(1, xt[:, None], 0.0).reshape(*x1.shape, -1)

    def add_noise(self, x1: torch.Tensor, t: TimeLike, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ p_t(. | x1) per token, Long of x1's shape (the forward process)."""
        beta = self.beta(expand_time(t, x1)).reshape(-1)
        y = x1.reshape(-1)
        out = torch.empty_like(y)
        for r0 in range(0, y.numel(), self.row_chunk):
            yy, bb = y[r0 : r0 + self.row_chunk], beta[r0 : r0 + self.row_chunk, None]
            out[r0 : r0 + self.row_chunk] = chunked_categorical(
                lambda k0, k1, idx, yy=yy, bb=bb: _take(-bb, idx) * self.distance(_take(yy, idx), k0, k1),
                yy.numel(), self.num_embeddings, self.chunk, generator, y.device,
            )
        return out.reshape(x1.shape)

    def _rate_terms(self, yy, xx, bb, k0, k1):
        """Unnormalised log-velocity block: -beta d(x, y) + log max(0, d(x_t, y) - d(x, y)), -inf at x_t."""
        d = self.distance(yy, k0, k1)
        cross = (self.emb[xx] * self.emb[yy]).sum(-1)
        d_t = (self.sq_norm[xx] + self.sq_norm[yy] - 2 * cross).clamp_min(0.0)[:, None]
        gap = (d_t - d).clamp_min(0.0)
        cols = torch.arange(k0, k1, device=yy.device)
        gap = gap.masked_fill(cols[None, :] == xx[:, None], 0.0)
        return -bb * d, gap

    def jump(
        self,
        x_t: torch.Tensor,
        x1: torch.Tensor,
        t: TimeLike,
        dt: TimeLike,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One CTMC Euler step: jump with probability 1 - exp(-dt R), R = sum_{x != x_t} u_t(x);
        a jumping token takes x ~ u_t(.) / R, the others keep x_t. Returns Long of x_t's shape."""
        tt = expand_time(t, x1).reshape(-1)
        dtt = expand_time(dt, x1).reshape(-1)
        y, xt = x1.reshape(-1), x_t.reshape(-1)
        if self.num_embeddings <= self.table_max and y.numel() and bool((tt == tt[0]).all()):
            return self._jump_sorted(xt, y, tt[0], dtt, generator).reshape(x_t.shape)
        beta, dbeta = self.beta(tt), self.dbeta(tt)
        out = xt.clone()
        for r0 in range(0, y.numel(), self.row_chunk):
            sl = slice(r0, r0 + self.row_chunk)
            yy, xx, bb = y[sl], xt[sl], beta[sl, None]
            # Pass 1: R = beta' * sum_x exp(-beta d) gap / sum_x exp(-beta d); the max of -beta d is 0 (x = y).
            z = torch.zeros(yy.numel(), dtype=torch.float64, device=y.device)
            s = torch.zeros_like(z)
            for k0 in range(0, self.num_embeddings, self.chunk):
                logp, gap = self._rate_terms(yy, xx, bb, k0, min(k0 + self.chunk, self.num_embeddings))
                w = torch.exp(logp)
                z += w.sum(1, dtype=torch.float64)
                s += (w * gap).sum(1, dtype=torch.float64)
            rate = (dbeta[sl].double() * s / z).float()
            idx = _jumping(rate, dtt[sl], generator)
            if idx.numel() == 0:
                continue
            ym, xm, bm = yy[idx], xx[idx], bb[idx]

            def score(k0, k1, sel, ym=ym, xm=xm, bm=bm):
                logp, gap = self._rate_terms(_take(ym, sel), _take(xm, sel), _take(bm, sel), k0, k1)
                return logp + torch.log(gap)

            out[r0 + idx] = chunked_categorical(
                score, idx.numel(), self.num_embeddings, self.chunk, generator, y.device
            )
        return out.reshape(x_t.shape)

    def sorted_distances(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached (ds, order, rank), each [K, K]: row y holds d(., y) sorted ascending (stable), the codes in
        that order, and each code's position in it (ds[y, rank[y, x]] = d(x, y))."""
        if self._sorted is None:
            codes = torch.arange(self.num_embeddings, device=self.emb.device)
            ds, order = self.distance(codes).sort(dim=1, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, codes.expand_as(order).contiguous())
            self._sorted = (ds, order, rank)
        return self._sorted

    def _jump_sorted(self, xt: torch.Tensor, y: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """`jump` for one time t over flat tokens, from prefix sums along each target's sorted distances.

        With w_i = exp(-beta d_i) over row y sorted by d, W_j = sum_{i<=j} w_i, V_j = sum_{i<=j} w_i d_i and
        r = rank of x_t: sum_{x != x_t} e^{-beta d(x)} max(0, d_t - d(x)) = d_t W_{r-1} - V_{r-1} (codes at or past
        r are no closer to y than x_t), so R = beta' (d_t W_{r-1} - V_{r-1}) / W_{K-1}. A jumping token draws
        u ~ U(0, 1) and takes the first sorted code whose cumulative mass d_t W_i - V_i exceeds u times the total
        (a binary search: that mass is nondecreasing in i < r). Costs K^2 per call instead of tokens x K.
        """
        ds, order, rank = self.sorted_distances()
        w = torch.exp(-self.beta(t) * ds).double()
        cw, cv = w.cumsum(1), (w * ds.double()).cumsum(1)
        r = rank[y, xt]
        d_t = ds[y, r].double()
        before = (r - 1).clamp_min(0)
        mass = torch.where(r > 0, d_t * cw[y, before] - cv[y, before], 0.0).clamp_min(0.0)
        rate = (self.dbeta(t).double() * mass / cw[y, -1]).float()
        out = xt.clone()
        idx = _jumping(rate, dt, generator)
        if idx.numel() == 0:
            return out
        ym, dm, rm = y[idx], d_t[idx], r[idx]
        v = torch.rand(idx.numel(), generator=generator, device=draw_device(generator, y.device), dtype=torch.float64)
        target = v.to(y.device) * mass[idx]
        lo, hi = torch.zeros_like(rm), rm - 1  # the answer lies in [0, r - 1]
        for _ in range(max(1, (self.num_embeddings - 1).bit_length())):
            mid = (lo + hi) // 2
            below = dm * cw[ym, mid] - cv[ym, mid] <= target
            lo, hi = torch.where(below, mid + 1, lo), torch.where(below, hi, mid)
        out[idx] = order[ym, lo.clamp_max(rm - 1)]
        return out


def build_path(
    num_embeddings: int, embedding: torch.Tensor | None, alpha: float | None, c: float, eps: float
) -> ProbPath:
    """The scheduler's rule: `alpha` None selects the mixture path, otherwise the metric path."""
    if alpha is None:
        return MixturePath(num_embeddings)
    if embedding is None:
        raise ValueError("the metric path needs a path embedding")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return MetricPath(embedding, alpha=alpha, c=c, eps=eps)
