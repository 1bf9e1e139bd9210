"""Probability paths checked against a float64 re-derivation and by sampling statistics."""

import math

import pytest
import torch

from udm_grpo.diffusion.categorical import chunked_categorical, sample_logits
from udm_grpo.diffusion.paths import MetricPath, MixturePath, ProbPath
from udm_grpo.diffusion.scheduler import KineticOptimalScheduler

K, D = 12, 5


@pytest.fixture(scope="module")
def emb():
    return torch.randn(K, D, generator=torch.Generator().manual_seed(0))


def ref_tables(emb, y, x_t, t, alpha=0.9, c=3.0):
    """float64 p_t(. | y) and u_t(. | x_t, y), from |a - b|^2 directly (not the |a|^2 + |b|^2 - 2ab form)."""
    e = emb.double()
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    d = ((e[:, None, :] - e[None, y, :]) ** 2).sum(-1).T  # [M, K]: d(x, y_m)
    beta = c * (t / (1 - t)) ** alpha
    dbeta = c * alpha * t ** (alpha - 1) / (1 - t) ** (alpha + 1) if t > 0 else 0.0
    p = torch.softmax(-beta * d, dim=-1)
    d_t = d.gather(1, x_t[:, None])
    u = p * dbeta * (d_t - d).clamp_min(0)
    u.scatter_(1, x_t[:, None], 0.0)
    return p, u


def test_metric_probs_match_float64(emb):
    path = MetricPath(emb)
    y = torch.arange(K)
    for t in (0.1, 0.5, 0.9):
        p_ref, _ = ref_tables(emb, y, y, t)
        p = path.probs(y, t)
        assert torch.allclose(p.double(), p_ref, atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(K), atol=1e-5)


def test_metric_p0_uniform_and_concentrates(emb):
    path = MetricPath(emb)
    y = torch.arange(K)
    assert torch.allclose(path.probs(y, 0.0), torch.full((K, K), 1 / K), atol=1e-6)
    p = path.probs(y, 0.9999)
    assert (p.diagonal() > 0.999).all()
    # More mass on the data token as t grows.
    diag = [path.probs(y, t).diagonal().mean().item() for t in (0.1, 0.3, 0.6, 0.9)]
    assert diag == sorted(diag)


def test_metric_velocity_formula_and_support(emb):
    path = MetricPath(emb)
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, K, (40,), generator=gen)
    x_t = torch.randint(0, K, (40,), generator=gen)
    for t in (0.05, 0.4, 0.8):
        _, u_ref = ref_tables(emb, y, x_t, t)
        u = path.velocity(x_t, y, t).double()
        assert torch.allclose(u, u_ref, rtol=1e-3, atol=1e-5 * max(1.0, u_ref.abs().max().item()))
        e = emb.double() / emb.double().norm(dim=-1, keepdim=True)
        d = ((e[:, None, :] - e[None, y, :]) ** 2).sum(-1).T
        farther = d >= d.gather(1, x_t[:, None]) - 1e-9
        assert (u[farther].abs() < 1e-5).all()
        assert (u.gather(1, x_t[:, None]) == 0).all()
    assert path.velocity(x_t, y, 0.0).abs().max() == 0


def test_metric_add_noise_chunked_equals_unchunked(emb):
    x1 = torch.randint(0, K, (3, 50), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2, 0.5, 0.8])
    full = MetricPath(emb, chunk=K, row_chunk=10_000).add_noise(x1, t, torch.Generator().manual_seed(3))
    chunked = MetricPath(emb, chunk=5, row_chunk=10_000).add_noise(x1, t, torch.Generator().manual_seed(3))
    assert torch.equal(full, chunked)


def _tv(samples, probs):
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    return 0.5 * (counts / counts.sum() - probs.double()).abs().sum().item()


@pytest.mark.parametrize("chunk,row_chunk", [(K, 100_000), (5, 997)])
def test_metric_add_noise_follows_marginal(emb, chunk, row_chunk):
    path = MetricPath(emb, chunk=chunk, row_chunk=row_chunk)
    n = 60_000
    for t in (0.3, 0.7):
        x1 = torch.full((n,), 4)
        xt = path.add_noise(x1, t, torch.Generator().manual_seed(4))
        assert _tv(xt, path.probs(torch.tensor([4]), t)[0]) < 0.015


def _jump_law(emb, y, xt, t, dt):
    _, u = ref_tables(emb, torch.tensor([y]), torch.tensor([xt]), t)
    rate = u.sum()
    expected = (1 - math.exp(-dt * rate)) * u[0] / rate if rate > 0 else torch.zeros(emb.shape[0], dtype=u.dtype)
    expected[xt] += math.exp(-dt * rate)
    return expected


# table_max=0 forces the streamed blocks; the default takes the sorted-distance table for one time t.
@pytest.mark.parametrize("chunk,table_max", [(K, 0), (5, 0), (K, 2048)])
def test_metric_jump_distribution(emb, chunk, table_max):
    path = MetricPath(emb, chunk=chunk, row_chunk=4096, table_max=table_max)
    n = 60_000
    for y, xt, t, dt in ((2, 7, 0.4, 0.15), (0, 11, 0.1, 0.5), (4, 4, 0.5, 0.2)):
        x_next = path.jump(torch.full((n,), xt), torch.full((n,), y), t, dt, torch.Generator().manual_seed(5))
        assert _tv(x_next, _jump_law(emb, y, xt, t, dt)) < 0.015


def test_metric_jump_table_with_tied_codes_and_per_sample_times(emb):
    tied = torch.cat([emb[:6], emb[:6]])  # every code has a twin at distance 0
    path = MetricPath(tied)
    n = 60_000
    x_next = path.jump(torch.full((n,), 9), torch.full((n,), 1), 0.3, 0.4, torch.Generator().manual_seed(6))
    assert _tv(x_next, _jump_law(tied, 1, 9, 0.3, 0.4)) < 0.015
    assert (x_next != 3).all()  # code 3 is the twin of x_t = 9: no closer to y, so never a target
    # Two times in one call take the streamed route; each half follows its own law.
    t = torch.tensor([0.2, 0.7]).repeat_interleave(n // 2)
    x_next = path.jump(torch.full((n,), 9), torch.full((n,), 1), t, 0.3, torch.Generator().manual_seed(7))
    for half, tk in ((x_next[: n // 2], 0.2), (x_next[n // 2 :], 0.7)):
        assert _tv(half, _jump_law(tied, 1, 9, tk, 0.3)) < 0.02


def test_mixture_path():
    path = MixturePath(K)
    y = torch.arange(K)
    p = path.probs(y, 0.3)
    assert torch.allclose(p.sum(-1), torch.ones(K))
    assert torch.allclose(p.diagonal(), torch.full((K,), 0.3 + 0.7 / K))
    xt = torch.full((50_000,), 1)
    out = path.add_noise(torch.full((50_000,), 3), 0.3, torch.Generator().manual_seed(0))
    assert _tv(out, path.probs(torch.tensor([3]), 0.3)[0]) < 0.015
    u = path.velocity(xt[:2], torch.tensor([3, 1]), 0.5)
    assert u[0, 3] == pytest.approx(2.0) and u[0].sum() == pytest.approx(2.0) and u[1].sum() == 0
    moved = path.jump(xt, torch.full_like(xt, 3), 0.5, 0.1, torch.Generator().manual_seed(1))
    assert (moved == 3).float().mean().item() == pytest.approx(1 - math.exp(-0.2), abs=0.01)



def test_paths_share_the_prob_path_interface(emb):
    paths: list[ProbPath] = [MixturePath(K), MetricPath(emb)]
    for path in paths:
        assert path.num_embeddings == K and path.to("cpu") is path
        sched = KineticOptimalScheduler(path).to("cpu")
        assert sched.path is path and sched.path_embedding is path.embedding
    assert paths[0].embedding is None and torch.equal(paths[1].embedding, emb)

def test_chunked_categorical_matches_softmax():
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(0)) * 2
    logits[1, 5:] = float("-inf")
    n = 40_000
    rows = logits.repeat_interleave(n, 0)
    def score(a, b, idx):
        return (rows if idx is None else rows[idx])[:, a:b]

    for chunk in (4, 17):  # five blocks, and the one-block path
        draws = chunked_categorical(score, rows.shape[0], 17, chunk, torch.Generator().manual_seed(1))
        for r in range(3):
            assert _tv(draws[r * n:(r + 1) * n], torch.softmax(logits[r], -1)) < 0.015
        assert (draws[n:2 * n] < 5).all()
    # Rows without mass get class 0; a row with one finite class always draws it (both paths).
    edge = torch.full((2, 17), float("-inf"))
    edge[1, 16] = 0.0
    for chunk in (4, 17):
        assert sample_logits(edge, torch.Generator().manual_seed(3), chunk=chunk).tolist() == [0, 16]
    # sample_logits keeps leading dims and works on half precision inputs.
    out = sample_logits(logits.half()[None].expand(2, 3, 17), torch.Generator().manual_seed(2), chunk=4)
    assert out.shape == (2, 3) and out.dtype == torch.long
