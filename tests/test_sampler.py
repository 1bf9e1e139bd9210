"""Scheduler grid, CTMC sampler end states and the sampler's final distribution."""

import pytest
import torch

from udm_grpo.diffusion.paths import MetricPath, MixturePath
from udm_grpo.diffusion.sampler import SamplingOptions, sample_tokens
from udm_grpo.diffusion.scheduler import KineticOptimalScheduler, shift_time
from udm_grpo.errors import CheckpointError, ConfigError

K = 8


def test_shift_and_grid():
    assert float(shift_time(0.5, 3.0)) == pytest.approx(0.5 / (0.5 + 1.5))
    sched = KineticOptimalScheduler(MixturePath(K), shift=3.0)
    sched.set_timesteps(10)
    assert sched.timesteps == list(range(10))
    assert sched.t_of(0) == 0.0 and float(sched.t[-1]) == 1.0
    s = torch.arange(11, dtype=torch.float64) / 10
    # The code form of the reference: sigma = 1 - s, t = 1 - l sigma / (1 + (l - 1) sigma).
    sigma = 1 - s
    assert torch.allclose(sched.t, 1 - 3 * sigma / (1 + 2 * sigma))
    t = sched.sample_train_t(10_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1
    # shift > 1 spends more time at high noise: median below 0.5.
    assert t.median() < 0.5


class FixedModel:
    def __init__(self, target):
        self.target = target

    def image_logits(self, text_ids, image_ids, grid):
        logits = torch.full((*image_ids.shape, K), -30.0)
        return logits.scatter(-1, self.target.expand_as(image_ids)[..., None], 30.0)


@pytest.mark.parametrize("path", [MixturePath(K), MetricPath(torch.randn(K, 3))])
def test_sampler_reaches_fixed_prediction(path):
    target = torch.randint(0, K, (1, 16), generator=torch.Generator().manual_seed(0))
    sched = KineticOptimalScheduler(path, shift=2.0)
    out, traj = sample_tokens(FixedModel(target).image_logits, sched, torch.zeros(3, 4, dtype=torch.long), (4, 4),
                              SamplingOptions(6, 1.0), generator=torch.Generator().manual_seed(1), record=True)
    assert torch.equal(out, target.expand(3, 16))
    assert len(traj.states) == 6 and len(traj.predictions) == 6 and traj.t[0] == 0.0
    assert torch.equal(traj.final, out)
    # The states move towards the target (never away) under a fixed x1.
    hits = [(s == target).float().mean().item() for s in traj.states]
    assert hits[-1] > hits[0]


class PosteriorModel:
    """The exact posterior p(x1 | x_t) of a one-token data distribution; t read from the scheduler."""

    def __init__(self, path, sched, p_data):
        self.path, self.sched, self.p_data, self.k = path, sched, p_data, 0

    def image_logits(self, text_ids, image_ids, grid):
        t = self.sched.t_of(self.k)
        self.k += 1
        lik = self.path.probs(torch.arange(K), t)  # [x1, x_t]
        post = self.p_data[:, None] * lik  # p(x1) p_t(x_t | x1)
        post = post / post.sum(0, keepdim=True)
        return post.T[image_ids].clamp_min(1e-30).log()


_EMB = torch.randn(K, 3, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("path", [MixturePath(K), MetricPath(_EMB)])
def test_sampler_final_distribution_matches_data(path):
    p_data = torch.tensor([0.3, 0.02, 0.15, 0.05, 0.25, 0.08, 0.1, 0.05])
    sched = KineticOptimalScheduler(path, shift=1.0)
    n = 40_000
    model = PosteriorModel(path, sched, p_data)
    out = sample_tokens(model.image_logits, sched, torch.zeros(1, 1, dtype=torch.long), (1, n),
                        SamplingOptions(60, 1.0), generator=torch.Generator().manual_seed(4))
    freq = torch.bincount(out.flatten(), minlength=K).double() / n
    assert 0.5 * (freq - p_data.double()).abs().sum() < 0.03


def test_guidance_needs_uncond():
    sched = KineticOptimalScheduler(MixturePath(K))
    with pytest.raises(ValueError):
        sample_tokens(FixedModel(torch.zeros(1, 4, dtype=torch.long)).image_logits, sched,
                      torch.zeros(1, 2, dtype=torch.long), (2, 2), SamplingOptions(2, 3.0))


def test_cfg_mixes_logits_until_trunc():
    calls = []

    class Recorder:
        def image_logits(self, text_ids, image_ids, grid):
            calls.append(text_ids.shape[0])
            return torch.zeros(*image_ids.shape, K)

    sched = KineticOptimalScheduler(MixturePath(K), shift=1.0)
    sample_tokens(Recorder().image_logits, sched, torch.ones(2, 3, dtype=torch.long), (2, 2),
                  SamplingOptions(10, 5.0, 0.5), uncond_ids=torch.zeros(2, 3, dtype=torch.long))
    # t_k = k/10: steps with t < 0.5 (k = 0..4) run both branches in one batch of 4.
    assert calls == [4] * 5 + [2] * 5


def test_scheduler_round_trip(tmp_path):
    emb = torch.randn(K, 3)
    sched = KineticOptimalScheduler(MetricPath(emb, alpha=0.8, c=2.5), shift=4.0, alpha=0.8, c=2.5)
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = KineticOptimalScheduler.from_pretrained(tmp_path / "scheduler")
    assert isinstance(loaded.path, MetricPath) and loaded.shift == 4.0
    assert loaded.path.alpha == 0.8 and loaded.path.c == 2.5
    assert torch.equal(loaded.path.raw_emb, emb)
    x1 = torch.randint(0, K, (2, 5))
    assert torch.allclose(loaded.path.probs(x1, 0.4), sched.path.probs(x1, 0.4))


def test_scheduler_errors(tmp_path):
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        KineticOptimalScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"alpha": "x", "c": 3, "shift": 1}')
    with pytest.raises(ConfigError, match="'alpha'"):
        KineticOptimalScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"alpha": 0.9, "c": 3, "shift": 1}')
    with pytest.raises(CheckpointError, match="scheduler_model.pth"):
        KineticOptimalScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"alpha": null, "c": 3, "shift": 1}')
    assert isinstance(KineticOptimalScheduler.from_pretrained(tmp_path, num_embeddings=K).path, MixturePath)
