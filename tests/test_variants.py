"""The GRPO variants (config keys), each checked against an independent computation: advantage scaling and
per-prompt baselines, dynamic sampling, rollout reuse with importance ratios against a saved copy of the old
weights, the loss normalisers, the curriculum, and the health signals."""

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch

from udm_grpo.data.prompts import PromptStream
from udm_grpo.grpo import dynamic
from udm_grpo.grpo.advantages import group_advantages
from udm_grpo.grpo.collect import Drawn
from udm_grpo.grpo.health import codebook_entropy, flip_rates, group_diversity, mean_where_known
from udm_grpo.grpo.objective import action_log_probs
from udm_grpo.grpo.policy import ImageLogits, micro_batch_logits
from udm_grpo.grpo.prompt_stats import PromptStats
from udm_grpo.rewards.base import RewardOutput
from udm_grpo.rewards.shapeeval import ShapeEvalReward

from .test_trainer import make_config, trainer, weights


def test_scale_none_and_per_prompt_history_against_numpy():
    rng = np.random.default_rng(0)
    grouped = rng.normal(size=(3, 4))
    none = group_advantages(torch.tensor(grouped), 4, scale="none", clip=None).numpy()
    np.testing.assert_allclose(none, grouped - grouped.mean(1, keepdims=True), rtol=1e-12)
    history = [[0.5, 1.5], [], [2.0, 2.0, 2.0]]
    adv = group_advantages(torch.tensor(grouped), 4, history=history, clip=None, eps=1e-4).numpy()
    for j, row in enumerate(grouped):
        pool = np.r_[row, history[j]]
        np.testing.assert_allclose(adv[j], (row - pool.mean()) / (pool.std() + 1e-4), rtol=1e-10)
    # a group of equal scores has no advantage on its own, but has one against the prompt's history
    equal = torch.ones(1, 4)
    assert group_advantages(equal, 4).abs().sum() == 0
    assert (group_advantages(equal, 4, history=[[0.0, 0.0, 1.0]]) > 0).all()
    assert group_advantages(equal, 4, history=[[1.0, 1.0]]).abs().sum() == 0


def test_dynamic_sampling_choice_and_refill():
    flags = [torch.tensor([True, False, False, False]), torch.tensor([True, True])]
    # 2 processes: process 0 owns groups 0-1 of round 0 and group 0 of round 1; process 1 the others
    assert dynamic.choose(flags, 0, 2, 2) == [(0, 0), (1, 0)]
    assert dynamic.choose(flags, 1, 2, 2) == [(1, 1), (0, 2)]  # informative first, then fill in draw order
    assert dynamic.lacking(flags[:1], 2, 2) == 2 and dynamic.lacking(flags, 2, 2) == 1
    assert dynamic.refill_size(3, 2, 8, 0, 64) == 6 and dynamic.refill_size(3, 2, 8, 40, 64) == 2
    assert dynamic.refill_size(3, 2, 8, 60, 64) == 0
    assert dynamic.informative(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == [False, True, False]


class HalfConstant:
    """Brightness for prompts with 'red', a constant for the others: their groups carry no advantage."""

    def __call__(self, images, prompts, metadata):
        s = torch.as_tensor(images).float().mean(dim=(1, 2, 3)) / 255
        s = torch.where(torch.tensor(["red" in p for p in prompts], dtype=torch.bool), s, torch.full_like(s, 0.5))
        return RewardOutput(scores=s, values={"brightness": s})


def test_dynamic_sampling_trains_groups_whose_rewards_differ(tmp_path):
    cfg = make_config(tmp_path, **{"sampling.dynamic_sampling": True, "sampling.max_extra_rollouts": 16,
                                   "experiment.save_every": 0})
    tr = trainer(cfg, HalfConstant())
    seen = []
    real = tr._micro_batches
    tr._micro_batches = lambda ro, adv, steps: seen.append(ro.prompts) or real(ro, adv, steps)
    tr.train(max_steps=4)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row, prompts in zip(rows, seen, strict=True):
        red = sum("red" in p for p in prompts[::4])  # one prompt per group of 4
        assert row["train/zero_std_fraction"] == pytest.approx(1 - red / 2)
        assert row["train/extra_rollouts"] <= 16 and row["train/extra_rollouts"] % 4 == 0
    # each step draws 8 images plus its refills; the counter adds them up
    assert rows[-1]["progress/rollout_images"] == sum(8 + r["train/extra_rollouts"] for r in rows)
    assert any(r["train/extra_rollouts"] for r in rows)
    # with refills, a step lacking informative groups ends with more of them than its first draw had
    assert np.mean([r["train/zero_std_fraction"] for r in rows]) < np.mean([r["reward/zero_var_frac"] for r in rows])


def test_reused_ratio_equals_recomputation_with_the_old_weights(tmp_path):
    """A reused sample's ratio is exp(mean_n [log p_now - log p_drawing policy]); the drawing policy's log-probs
    are recomputed with a saved copy of its weights."""
    cfg = make_config(tmp_path, **{"training.reuse_rollouts": 2, "experiment.save_every": 0, "reward.kl_beta": 0.0})
    tr = trainer(cfg)
    old_model = copy.deepcopy(tr.acc.unwrap_model(tr.policy).model)
    tr.train_step()  # draws rollout 1 with the old weights, then updates
    tr.step += 1
    (drawn, stored), = tr.replay.stored
    assert drawn == 0 and len(stored) == 4
    seen = []
    import udm_grpo.grpo.trainer as trainer_mod

    real = trainer_mod.grpo_loss
    trainer_mod.grpo_loss = lambda logp, adv, old, *a: seen.append((logp.detach(), old)) or real(logp, adv, old, *a)
    try:
        now = copy.deepcopy(tr.acc.unwrap_model(tr.policy).model)
        tr.train_step()
    finally:
        trainer_mod.grpo_loss = real
    reused = seen[-len(stored):]
    rollout_cfg = cfg.sampling.rollout
    for m, (logp_now, old) in zip(stored, reused, strict=True):
        with torch.no_grad():
            recomputed_old = action_log_probs(micro_batch_logits(ImageLogits(old_model), m, rollout_cfg), m.actions)
            recomputed_now = action_log_probs(micro_batch_logits(ImageLogits(now), m, rollout_cfg), m.actions)
        assert torch.allclose(old, recomputed_old, atol=1e-5)
        assert torch.allclose(logp_now, recomputed_now, atol=1e-5)
        ratio = torch.exp((recomputed_now - recomputed_old).mean(1))
        assert (ratio - 1).abs().max() > 1e-4  # the weights moved: an importance ratio, not 1
        assert torch.allclose(torch.exp((logp_now - old).mean(1)), ratio, atol=1e-5)
    assert all(o is None for _, o in seen[:-len(stored)])  # this rollout's own samples are on-policy


def test_staleness_cap_drops_old_rollouts(tmp_path):
    cfg = make_config(tmp_path, **{"training.reuse_rollouts": 3, "training.max_staleness": 1,
                                   "experiment.save_every": 0})
    tr = trainer(cfg)
    fractions = []
    for _ in range(4):
        fractions.append(tr.train_step()["train/reused_fraction"])
        tr.step += 1
    assert len(tr.replay.stored) == 2  # R - 1 rollouts are kept ...
    assert fractions == [0.0, 0.5, 0.5, 0.5]  # ... but only the one drawn 1 update ago is trained


def test_dr_grpo_normaliser_against_grpo(tmp_path):
    """With a reused rollout, grpo divides by the samples trained (2C), dr_grpo by the constant C: the same
    step's gradient is exactly twice as large; on-policy (step 1) they are equal."""
    norms = {}
    for loss_type in ("grpo", "dr_grpo"):
        cfg = make_config(tmp_path / loss_type, **{"training.reuse_rollouts": 2, "reward.loss_type": loss_type,
                                                   "experiment.save_every": 0, "training.max_grad_norm": None})
        tr = trainer(cfg)
        norms[loss_type] = []
        for _ in range(2):
            norms[loss_type].append(tr.train_step()["train/grad_norm"])
            tr.step += 1
    assert norms["dr_grpo"][0] == pytest.approx(norms["grpo"][0], rel=1e-6)
    assert norms["dr_grpo"][1] == pytest.approx(2 * norms["grpo"][1], rel=1e-4)


def test_variants_resume_exactly(tmp_path):
    over = {"sampling.dynamic_sampling": True, "training.reuse_rollouts": 2, "data.curriculum": True,
            "reward.per_prompt_stats": True, "reward.importance_sampling_level": "token",
            "reward.ratio_clipping": 0.2, "reward.ratio_clipping_high": 0.3}
    full = trainer(make_config(tmp_path / "a", **over), HalfConstant())
    full.train(max_steps=4)
    first = trainer(make_config(tmp_path / "b", **over), HalfConstant())
    first.train(max_steps=2)
    second = trainer(make_config(tmp_path / "b", **over), HalfConstant())
    second.train(max_steps=4, resume="latest")
    wa, wb = weights(full), weights(second)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = lambda p: [json.loads(x) for x in (p / "run" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("reward/mean", "train/reused_fraction", "progress/rollout_images")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "a")] == [[r[k] for k in keys] for r in rows(tmp_path / "b")]


def test_curriculum_prefers_undecided_prompts():
    stats = PromptStats(window=2)
    stats.update(["easy", "hard", "mixed"], torch.zeros(3, 4), torch.tensor([[1.0] * 4, [0.0] * 4, [1, 0, 0, 0]]))
    assert [stats.decided(p) for p in ("easy", "hard", "mixed", "new")] == [True, True, False, False]
    stats.update(["hard"], torch.zeros(1, 4), torch.tensor([[0, 1, 0, 0.0]]))
    assert not stats.decided("hard")  # a pass within the remembered window
    stats.update(["hard"], torch.zeros(1, 4), torch.zeros(1, 4))
    stats.update(["hard"], torch.zeros(1, 4), torch.zeros(1, 4))
    assert stats.decided("hard")  # the window forgot it
    records = [{"prompt": p} for p in ("easy", "hard", "mixed", "new")]
    stream = PromptStream(records, seed=3)
    counts = dict.fromkeys(("easy", "hard", "mixed", "new"), 0)
    for _ in range(3000):
        for r in stream.next(1, lambda r: stats.weight(r, 0.1)):
            counts[r["prompt"]] += 1
    # probabilities 0.1 : 0.1 : 1 : 1 over 2.2; binomial 99.9% bands
    for p, w in (("easy", 0.1), ("hard", 0.1), ("mixed", 1.0), ("new", 1.0)):
        q = w / 2.2
        assert abs(counts[p] - 3000 * q) < 3.3 * math.sqrt(3000 * q * (1 - q)), (p, counts)
    again = PromptStream(records, seed=3)
    again.load_state(stream.state())
    assert [r["prompt"] for r in again.next(3, lambda r: 1.0)] == [r["prompt"] for r in stream.next(3, lambda r: 1.0)]


def test_health_signals_against_direct_counts():
    g = torch.Generator().manual_seed(0)
    states = torch.randint(0, 5, (3, 4, 6), generator=g)
    final = torch.randint(0, 5, (4, 6), generator=g)
    seq = [*states, final]
    expected = [np.mean([int(seq[k + 1][b, n] != seq[k][b, n]) for b in range(4) for n in range(6)]) for k in range(3)]
    assert flip_rates(states, final).tolist() == pytest.approx(expected)
    counts = np.bincount(final.flatten().numpy(), minlength=7) / final.numel()
    assert codebook_entropy(final, 7) == pytest.approx(-sum(q * math.log(q) for q in counts if q))
    assert codebook_entropy(torch.zeros(2, 3, dtype=torch.long), 7) == 0
    # groups of 2 from row 1 on (the first row belongs to a group that started on another process)
    pairs = [(1, 2), (3, 4)]
    rows = torch.randint(0, 3, (5, 8), generator=g)
    want = np.mean([(rows[a] != rows[b]).float().mean().item() for a, b in pairs])
    assert group_diversity(rows, 2, offset=1) == pytest.approx(want)
    four = rows[:4]
    want = np.mean([(four[a] != four[b]).float().mean().item() for a, b in itertools.permutations(range(4), 2)])
    assert group_diversity(four, 4) == pytest.approx(want)
    assert group_diversity(four[:1].repeat(4, 1), 4) == 0.0
    assert math.isnan(group_diversity(rows[:1], 2))


def test_health_and_progress_are_logged(tmp_path):
    cfg = make_config(tmp_path, **{"experiment.eval_every": 2, "experiment.save_every": 0})
    trainer(cfg).train(max_steps=2)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    steps = cfg.sampling.rollout.num_inference_steps
    assert [f"health/flip/k{k:02d}" in row for k in range(steps)] == [True] * steps
    assert 0 <= row["health/group_diversity"] <= 1 and row["health/codebook_entropy"] > 0
    assert row["progress/rollout_images"] == 16 and row["progress/minutes"] > 0
    evals = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["progress/rollout_images"] for e in evals] == [0, 16]


def test_dynamic_sampling_needs_whole_groups_per_process(capsys):
    from udm_grpo.cli import main

    args = ["train", "--check", "--processes", "4", "sampling.num_prompts_per_step=6", "training.micro_batch_size=4"]
    assert main([*args, "sampling.dynamic_sampling=false"]) == 0
    capsys.readouterr()
    assert main([*args, "sampling.dynamic_sampling=true"]) == 2
    err = capsys.readouterr().err
    assert "sampling.dynamic_sampling needs each of the 4 processes to hold whole groups" in err
    assert "Traceback" not in err


def test_curriculum_counts_the_pass_the_reward_trains():
    assert ShapeEvalReward().pass_value == "strict" and ShapeEvalReward(exact=True).pass_value == "exact"
    # all four images pass GenEval's at-least rule; only the first draws no extra shape
    drawn = Drawn([{"prompt": "a photo of a square"}], None, torch.zeros(4),
                  {"strict": torch.ones(4), "exact": torch.tensor([1.0, 0, 0, 0])})
    for key, decided in (("strict", True), ("exact", False)):
        stats = PromptStats(window=2)
        stats.update(["a photo of a square"], torch.zeros(1, 4), drawn.passes(4, key))
        assert stats.decided("a photo of a square") is decided
    assert drawn.passes(4, "missing") is None


def test_health_mean_over_processes_skips_undefined_values():
    """Process 1 holds no complete group (diversity NaN): the mean is process 0's; a value NaN on every process
    stays NaN; defined values average over both."""
    process0 = {"health/group_diversity": 0.4, "health/codebook_entropy": 2.0, "x": math.nan}
    # process 1 has {diversity: NaN, entropy: 3.0, x: NaN}: its rows (values with NaN as 0; defined or not)
    process1 = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    out = mean_where_known(process0, lambda t: t + process1)  # process 0's view of the all-reduce sum
    assert out["health/group_diversity"] == pytest.approx(0.4)
    assert out["health/codebook_entropy"] == pytest.approx(2.5)
    assert math.isnan(out["x"])
