"""The UDM-GRPO trainer on a tiny random pipeline: learning, exact resume, atomic saves, guardrails."""

import json
import math

import pytest
import torch

from udm_grpo.config import load_config
from udm_grpo.errors import TrainingError
from udm_grpo.grpo import checkpoint as ckpt_mod
from udm_grpo.grpo.rollout import Rollout
from udm_grpo.grpo.states import training_states
from udm_grpo.grpo.trainer import UDMGRPOTrainer
from udm_grpo.rewards.base import RewardOutput

from .test_pipeline import tiny_pipeline


class Brightness:
    """Toy reward: mean pixel value in [0, 1]."""

    def __call__(self, images, prompts, metadata):
        s = torch.as_tensor(images).float().mean(dim=(1, 2, 3)) / 255
        return RewardOutput(scores=s, values={"brightness": s})


class NaNReward:
    def __call__(self, images, prompts, metadata):
        s = torch.full((len(prompts),), float("nan"))
        return RewardOutput(scores=s, values={})


def make_config(tmp_path, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\na blue square\nred square\nblue circle\n")
    base = {
        "model.dtype": "float32", "model.gradient_checkpointing": 0,
        "sampling.num_prompts_per_step": 2, "sampling.num_images_per_prompt": 4, "sampling.train_steps": 2,
        "sampling.train_start": [0, 2], "sampling.rollout.num_inference_steps": 4,
        "sampling.rollout.height": 16, "sampling.rollout.width": 16,
        "reward.kl_beta": 0.05, "training.lr": 3e-3, "training.mixed_precision": "no", "training.seed": 0,
        "training.micro_batch_size": 4, "training.max_steps": 4,
        "experiment.output_dir": str(tmp_path / "run"), "experiment.log_every": 1, "experiment.eval_every": 0,
        "experiment.save_every": 2, "experiment.num_eval_prompts": 2, "experiment.eval_num_inference_steps": 3,
        "data.train": str(prompts), "data.test": str(prompts),
    }
    base.update(over)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def trainer(cfg, reward=None):
    return UDMGRPOTrainer(cfg, pipeline=tiny_pipeline(), reward=reward or Brightness(), progress=False)


def weights(tr):
    return {k: v.clone() for k, v in tr.acc.unwrap_model(tr.policy).model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    full = trainer(make_config(tmp_path / "a"))
    full.train(max_steps=4)
    first = trainer(make_config(tmp_path / "b"))
    first.train(max_steps=2)
    second = trainer(make_config(tmp_path / "b"))
    second.train(max_steps=4, resume="latest")
    wa, wb = weights(full), weights(second)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = lambda p: [json.loads(x) for x in (p / "run" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["reward/mean"] for r in ra] == [r["reward/mean"] for r in rb]
    # On-policy, the ratio is exactly 1 in value.
    assert all(r["train/ratio_mean"] == 1.0 and r["train/clip_frac"] == 0.0 for r in ra)
    assert all(r["train/kl"] >= 0 for r in ra)


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    tr = trainer(cfg)
    tr.train(max_steps=2)
    real = ckpt_mod.save_file

    def dying(tensors, path, *a, **k):
        if path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt("killed")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        tr.train(max_steps=4)
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000002"
    resumed = trainer(cfg)
    folder = resumed.resume("latest")
    assert folder.name == "step-000002" and resumed.step == 2
    resumed.train(max_steps=4)
    assert (checkpoints / "latest").read_text() == "step-000004"
    assert not list(checkpoints.glob("*.tmp"))


def test_nan_rewards_skip_updates_then_stop(tmp_path):
    cfg = make_config(tmp_path, **{"training.max_nonfinite": 2, "experiment.save_every": 0})
    tr = trainer(cfg, NaNReward())
    before = weights(tr)
    with pytest.raises(TrainingError, match="consecutive"):
        tr.train(max_steps=10)
    after = weights(tr)
    assert all(torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Two skipped steps were logged; the third raised before its line.
    assert [ln["train/skipped_total"] for ln in lines] == [1, 2] and lines[0]["train/skipped"] == "non-finite reward"


def test_short_run_raises_toy_reward(tmp_path):
    cfg = make_config(tmp_path, **{"training.max_steps": 30, "experiment.save_every": 0, "reward.kl_beta": 0.0,
                                   "training.lr": 1e-2, "sampling.num_images_per_prompt": 8})
    tr = trainer(cfg)
    tr.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["reward/mean"] for r in rows[:5]) / 5
    late = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert late > early + 0.02, (early, late)


def test_reused_rollouts_clip(tmp_path):
    cfg = make_config(tmp_path, **{"training.updates_per_rollout": 3, "reward.ratio_clipping": 1e-4,
                                   "experiment.save_every": 0, "training.max_steps": 1})
    tr = trainer(cfg)
    metrics = tr.train_step()
    assert metrics["train/clip_frac"] > 0
    assert math.isfinite(metrics["train/grad_norm"])


def test_forward_process_states_follow_marginal():
    pipe = tiny_pipeline()
    n = 20000
    final = torch.full((1, n), 5)
    ro = Rollout(["p"], [None], torch.zeros(1, 8, dtype=torch.long), None, (1, n), final,
                 torch.zeros(4, 1, n, dtype=torch.long), torch.zeros(4, 1, n, dtype=torch.long),
                 torch.tensor([0.0, 0.3, 0.6, 0.8], dtype=torch.float64), None)
    path = pipe.scheduler.path
    out = training_states(ro, [1, 2], path, True, True, torch.Generator().manual_seed(0))
    for ts in out:
        assert torch.equal(ts.actions, final)
        freq = torch.bincount(ts.states.flatten(), minlength=path.num_embeddings).double() / n
        expected = path.probs(torch.tensor([5]), ts.t)[0].double()
        assert 0.5 * (freq - expected).abs().sum() < 0.02
    naive = training_states(ro, [1], path, False, False, None)[0]
    assert torch.equal(naive.states, ro.states[1]) and torch.equal(naive.actions, ro.predictions[1])


def test_ablation_ladder_writes_table_and_plot(tmp_path, capsys):
    from udm_grpo.commands.ablation import VARIANTS, run_ablation

    cfg = make_config(tmp_path)
    overrides = [f"data.train={cfg.data.train}", f"data.test={cfg.data.test}", "experiment.eval_every=2",
                 "experiment.save_every=0", "sampling.rollout.height=16", "sampling.rollout.width=16",
                 "sampling.num_prompts_per_step=2", "sampling.num_images_per_prompt=2", "sampling.train_steps=1",
                 "sampling.train_start=[0,2]", "sampling.rollout.num_inference_steps=3", "model.dtype=float32",
                 "training.mixed_precision=no", "model.gradient_checkpointing=0",
                 "experiment.num_eval_prompts=2", "experiment.eval_num_inference_steps=2"]
    rows = run_ablation(None, overrides, tmp_path / "abl", steps=2, cfg_scale=2.0, make_trainer=trainer)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    out = capsys.readouterr().out
    assert all(f"ablation run {i}/4: {name} seed 0 (" in out for i, name in enumerate(VARIANTS, 1))
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert all(f"| {name} | 0 |" in table for name in VARIANTS)
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 0
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["results"]["metric"] == "eval/reward"
    # The CFG variants ran guided rollouts, the last one did not.
    import yaml

    guidance = [yaml.safe_load((tmp_path / "abl" / v / "seed-0" / "config.yaml").read_text())["sampling"]["rollout"]
                ["guidance_scale"] for v in VARIANTS]
    assert guidance == [2.0, 2.0, 2.0, 1.0]


def test_evaluate_reports_tag_means(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n"
                            for p, t in [("red circle", "x"), ("blue square", "x"), ("a blue circle", "y")]))
    cfg = make_config(tmp_path, **{"data.test": str(test), "experiment.eval_images_per_tag": 3})
    tr = trainer(cfg)
    result = tr.evaluate()
    v = torch.as_tensor(tr._last_eval_images).float().mean(dim=(1, 2, 3)) / 255  # the Brightness values
    assert [r["tag"] for r in tr.eval_records] == ["x"] * 3 + ["y"] * 3
    assert result["eval/brightness/x"] == pytest.approx(v[:3].mean().item())
    assert result["eval/brightness"] == pytest.approx((v[:3].mean().item() + v[3:].mean().item()) / 2)
    assert result["eval/brightness_images"] == pytest.approx(v.mean().item())


def test_lora_trains_only_adapters_and_resumes(tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = make_config(tmp_path, **{"model.lora": lora, "training.max_steps": 2})
    tr = trainer(cfg)
    model = tr.acc.unwrap_model(tr.policy).model
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}
    tr.train()
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and max(after[k].abs().max().item() for k in lora_b) > 0  # lora_B starts at zero
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/kl"] == 0.0  # the reference is the adapter-disabled base: equal to the policy at step 1
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()
    again = trainer(cfg)
    again.resume("latest")
    loaded = dict(again.acc.unwrap_model(again.policy).model.named_parameters())
    assert again.step == 2 and all(torch.equal(after[k], loaded[k].detach()) for k in after)
