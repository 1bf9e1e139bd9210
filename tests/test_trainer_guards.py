"""Trainer hardening: fp32 master weights under bf16, device-explicit random draws, train mode, run-folder
protection, checkpoint retention, Ctrl-C, damaged checkpoints."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from udm_grpo.errors import CheckpointError, UserError
from udm_grpo.grpo import checkpoint as ckpt_mod

from .test_pipeline import tiny_pipeline
from .test_trainer import Brightness, make_config, trainer


def test_bf16_compute_trains_float32_master_weights(tmp_path):
    cfg = make_config(tmp_path, **{"model.dtype": "bfloat16", "training.lr": 1e-6, "training.max_steps": 3,
                                   "experiment.save_every": 0, "reward.kl_beta": 0.05})
    tr = trainer(cfg)
    model = tr.acc.unwrap_model(tr.policy).model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert next(tr.reference.parameters()).dtype == torch.bfloat16
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    tr.train()
    hook.remove()
    assert {dtype for grad, dtype in seen if grad} == {torch.bfloat16}  # training forwards ran in bf16
    assert {dtype for grad, dtype in seen if not grad} == {torch.bfloat16}  # and so did the rollouts
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-000003" / "transformer" /
                          "diffusion_pytorch_model.safetensors"))
    initial = tiny_pipeline().transformer.state_dict()
    matrices = [k for k, v in saved.items() if v.dim() == 2]
    assert all(saved[k].dtype == torch.float32 for k in matrices)
    changed = sum((saved[k] != initial[k]).sum().item() for k in matrices)
    total = sum(saved[k].numel() for k in matrices)
    assert changed / total >= 0.9, changed / total  # bf16 weights would round almost every update away


@pytest.fixture
def explicit_devices(monkeypatch):
    """Random draws that take a generator must name a device that agrees with it (a CUDA generator
    without device= is rejected by PyTorch; on the CPU the omission goes unnoticed)."""
    checked = []

    def strict(fn):
        def draw(*args, generator=None, device=None, **kwargs):
            if generator is not None:
                assert device is not None, f"torch.{fn.__name__} with a generator but no device"
                assert torch.device(device) == generator.device, (device, generator.device)
                checked.append(fn.__name__)
            return fn(*args, generator=generator, device=device, **kwargs)
        return draw

    for name in ("rand", "randint", "randn", "randperm"):
        monkeypatch.setattr(torch, name, strict(getattr(torch, name)))
    return checked


def test_random_draws_name_their_device(tmp_path, explicit_devices):
    from udm_grpo.diffusion.loss import pretraining_loss

    tr = trainer(make_config(tmp_path, **{"training.max_steps": 1}))
    tr.train_step()  # rollout, forward-process states on the metric path, Reduced-Step start
    pipe = tiny_pipeline()
    gen = torch.Generator().manual_seed(0)
    pipe(["a red circle"], num_inference_steps=3, guidance_scale=2.0, generator=gen)
    x1 = torch.randint(0, pipe.scheduler.num_embeddings, (2, 16))
    pretraining_loss(pipe.transformer, pipe.scheduler, pipe.encode_prompt(["a", "b"]), pipe.encode_prompt([""]), x1,
                     (4, 4), gen, 0.5)
    assert {"rand", "randint"} <= set(explicit_devices)


def test_lora_dropout_is_active_while_training(tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_dropout": 0.5}
    tr = trainer(make_config(tmp_path, **{"model.lora": lora, "training.max_steps": 1}))
    model = tr.acc.unwrap_model(tr.policy).model
    dropout = next(m for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
    modes = []
    dropout.register_forward_hook(lambda mod, inp, out: modes.append((torch.is_grad_enabled(), mod.training)))
    tr.train_step()
    assert {training for grad, training in modes if grad} == {True}
    assert {training for grad, training in modes if not grad} == {False}  # rollouts sample without dropout


def test_existing_run_folder_is_refused_unless_force_or_resume(tmp_path):
    cfg = make_config(tmp_path, **{"training.max_steps": 1})
    trainer(cfg).train()
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run.*--resume latest.*--force"):
        trainer(cfg).train()
    assert (run / "metrics.jsonl").read_text() == before
    with pytest.raises(UserError, match="already reaches"):
        trainer(cfg).train(resume="latest")  # asked for 1 step, the checkpoint is at 1
    trainer(cfg).train(force=True)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # replaced, not appended


def test_retention_keeps_the_checkpoint_just_written(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (20, 40, 60):  # a later run's leftovers
        (checkpoints / f"step-{step:06d}").mkdir(parents=True)
        (checkpoints / f"step-{step:06d}" / "trainer_state.json").write_text("{}")
    tmp = ckpt_mod.begin_checkpoint(checkpoints, 1)
    old_mask = os.umask(0o022)
    try:
        final = ckpt_mod.commit_checkpoint(tmp, lambda d: None, {"state": {}, "param_groups": []}, {"step": 1}, keep=2)
    finally:
        os.umask(old_mask)
    assert final.is_dir() and (checkpoints / "latest").read_text() == "step-000001"
    assert sorted(p.name for p in ckpt_mod.list_checkpoints(checkpoints)) == ["step-000001", "step-000060"]
    assert ckpt_mod.resolve_checkpoint("latest", tmp_path) == final
    assert (final / "optimizer.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone writes 0600


class Interrupting(Brightness):
    """Sends SIGINT to this process during the reward of step `at`."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().__call__(images, prompts, metadata)


def test_ctrl_c_finishes_the_step_and_saves(tmp_path):
    cfg = make_config(tmp_path, **{"experiment.save_every": 0, "training.max_steps": 4})
    result = trainer(cfg, Interrupting(at=2)).train()
    assert result["interrupted"] and result["step"] == 2
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000002"
    resumed = trainer(cfg).train(resume="latest")
    assert resumed["step"] == 4 and not resumed["interrupted"]


def test_damaged_checkpoint_is_one_sentence(tmp_path):
    cfg = make_config(tmp_path, **{"training.max_steps": 1})
    trainer(cfg).train()
    opt = tmp_path / "run" / "checkpoints" / "step-000001" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.safetensors: cannot be read") as e:
        trainer(make_config(tmp_path, **{"training.max_steps": 2})).train(resume="latest")
    assert "\n" not in str(e.value)
    for spec, needle in (("/nonexistent/run", "no such folder"), (str(tmp_path), "neither a run folder")):
        with pytest.raises(UserError, match=needle):
            trainer(cfg).resume(spec)
    run = tmp_path / "run"
    assert ckpt_mod.resolve_checkpoint(str(run)).name == "step-000001"  # a run folder means its latest


def test_eval_reports_intervals(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in [("red circle", "x"),
                                                                                     ("blue square", "y")]))
    tr = trainer(make_config(tmp_path, **{"data.test": str(test), "experiment.eval_images_per_tag": 4}))
    result = tr.evaluate()
    hx, hy = result["eval/ci95/brightness/x"], result["eval/ci95/brightness/y"]
    assert 0 < hx < 1 and result["eval/ci95/brightness"] == pytest.approx((hx**2 + hy**2) ** 0.5 / 2)
