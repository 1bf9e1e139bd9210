"""LoRA under every engine, offload keys, and LoRA checkpoints wherever a checkpoint goes.

Engines: DeepSpeed ZeRO-2/3 and FSDP2 train the adapters of the tiny random world on 2 CPU processes (gloo) as DDP
does (metrics, the skipped step, adapter weights, AdamW moments gathered from the shards, DDP's checkpoint
layout), then resume from their own checkpoint with offload switched on (DeepSpeed `offload_optimizer` /
`offload_param`, FSDP2 `CPUOffloadPolicy`) to DDP's 4th update. On a CPU, offload moves nothing (the tensors are
on the CPU already), so what is checked is that each engine received it and still computes the same update.

Checkpoints: a 2-step LoRA run's adapter is PEFT's format (`PeftModel.from_pretrained` loads it), `sample` and
`eval shapes` take it, and `export` merges it into a full pipeline folder whose weights are W + B A * scale.
"""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from udm_grpo.cli import main
from udm_grpo.config import load_config
from udm_grpo.errors import ConfigError
from udm_grpo.grpo.preflight import check_start
from udm_grpo.grpo.trainer import UDMGRPOTrainer
from udm_grpo.models.pipeline import URSAPipeline

from .test_distributed import launch
from .test_pipeline import tiny_pipeline
from .test_trainer import Brightness, make_config

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
ENGINES = [("deepspeed-2", "+offload_optimizer"), ("deepspeed-3", "+offload_optimizer+offload_param"),
           ("fsdp", "+offload_param")]


# ---- engines --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Two DDP processes train LoRA for 3 steps, then one more from their checkpoint."""
    root = tmp_path_factory.mktemp("lora-ddp")
    two = launch(root / "two", 2, "lora")
    return two, launch(root / "resumed", 2, "lora", "ddp", two["folder"])


def _run_or_skip(out, engine: str, resume=None, recipe: str = "lora") -> dict:
    """The run; skipped with the engine's message where it cannot run here (the engine itself, or DeepSpeed's
    CPUAdam op, which it compiles on first use, for offload_optimizer), failed on any other error."""
    run = launch(out, 2, recipe, engine, resume, check=False)
    if "error" in run:
        reason = [ln for ln in run["error"].splitlines() if "Error" in ln]
        if resume is not None and "cpu_adam" not in run["error"].lower():
            pytest.fail(run["error"][-3000:])
        pytest.skip(f"{engine} cannot run on this CPU: {reason[-1] if reason else run['error'][-300:]}")
    return run


def _same_update(a: dict, b: dict, before: dict | None) -> None:
    """Adapter weights equal within 1e-3 of how far they moved (from `before`, or from zero: lora_B starts there)."""
    assert a.keys() == b.keys() and any("lora_A" in k for k in a) and any("lora_B" in k for k in a)
    if before is None:
        moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    else:
        moved = max((a[k] - before[k]).abs().max().item() for k in a)
    assert moved > 1e-4
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * moved


def _same_moments(a, b) -> None:
    from safetensors.torch import load_file

    oa, ob = (load_file(str(r["folder"] / "optimizer.safetensors")) for r in (a, b))
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.allclose(oa[key], ob[key], rtol=1e-3, atol=1e-9), key


@pytest.mark.parametrize("engine, offload", ENGINES)
def test_lora_engine_matches_ddp_and_resumes_with_offload(tmp_path, ddp, engine, offload):
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'udm-grpo[deepspeed]')")
    two, resumed = ddp
    run = _run_or_skip(tmp_path / engine, engine)
    assert [r.get("train/skipped") for r in run["rows"]] == [None, "non-finite loss or gradient", None]
    for a, b in zip(two["rows"], run["rows"], strict=True):
        for key in ("reward/mean", "reward/std", "train/kl", "train/loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert run["rows"][0]["train/kl"] == 0.0 < run["rows"][2]["train/kl"]  # the reference is the adapter-free base
    _same_update(two["weights"], run["weights"], None)
    assert sorted(p.name for p in run["folder"].iterdir()) == sorted(p.name for p in two["folder"].iterdir())
    _same_moments(two, run)
    facts = run["engine"]  # only the adapters are optimised, sharded over the two processes
    assert facts["trained"] * 20 < facts["total"] and facts["optimized"] < facts["trained"]
    # Resumed with offload from its own checkpoint: DDP's 4th update (weights and moments restored into the shards).
    cont = _run_or_skip(tmp_path / f"{engine}-offload", engine + offload, run["folder"])
    assert [r["step"] for r in cont["rows"]] == [4]
    _same_update(resumed["weights"], cont["weights"], two["weights"])
    _same_moments(resumed, cont)
    facts = cont["engine"]
    if engine == "fsdp":
        assert facts["offload_policy"] == "CPUOffloadPolicy"
    else:
        assert facts["offload_optimizer"] is True and facts["optimizer"] == "DeepSpeedCPUAdam"
        assert facts["offload_param"] == ("cpu" if engine == "deepspeed-3" else None)


def test_fsdp_unit_mixes_a_bf16_frozen_base_with_float32_adapters(tmp_path):
    """FSDP2 shards each block as one unit, frozen bf16 base and float32 adapters together, and updates as DDP."""
    ddp = launch(tmp_path / "ddp", 2, "lora-bf16")
    fsdp = _run_or_skip(tmp_path / "fsdp", "fsdp", recipe="lora-bf16")
    assert fsdp["engine"]["dtypes"] == ["bfloat16", "float32"]
    assert [r.get("train/kl") for r in ddp["rows"]] == pytest.approx([r.get("train/kl") for r in fsdp["rows"]])
    _same_update(ddp["weights"], fsdp["weights"], None)


@pytest.mark.parametrize("engine, keys, needle", [
    ("ddp", {"offload_optimizer": True}, "'training.offload_optimizer' needs training.engine deepspeed or fsdp"),
    ("ddp", {"offload_param": True}, "'training.offload_param' needs training.engine deepspeed or fsdp"),
    ("deepspeed", {"offload_param": True, "zero_stage": 2}, "'training.offload_param' needs DeepSpeed ZeRO stage 3"),
    ("fsdp", {"offload_optimizer": True}, "'training.offload_optimizer' is DeepSpeed's"),
])
def test_offload_where_the_engine_has_none_is_one_sentence(tmp_path, engine, keys, needle):
    over = {"training.engine": engine, **{f"training.{k}": v for k, v in keys.items()}}
    with pytest.raises(ConfigError, match=needle) as e:
        make_config(tmp_path, **over)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")
    # engine 'auto' is resolved at the start: accelerate's environment without DeepSpeed/FSDP means DDP
    if engine == "ddp":
        cfg = make_config(tmp_path, **{f"training.{k}": v for k, v in keys.items()})
        with pytest.raises(ConfigError, match=needle):
            check_start(cfg, 1, tiny_pipeline(), reward_given=True)


# ---- checkpoints ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA run on a tiny random pipeline saved as a folder (model.path), a large lr so the images move."""
    root = tmp_path_factory.mktemp("lora-run")
    tiny_pipeline().save_pretrained(root / "base")
    cfg = make_config(root, **{"model.lora": LORA, "model.path": str(root / "base"), "training.max_steps": 2,
                               "training.lr": 0.05})
    UDMGRPOTrainer(cfg, reward=Brightness(), progress=False).train()
    return root


def _sample(tmp_path, name: str, *args: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    assert main(["sample", "a photo of a red circle", "blue square", "-n", "2", "--sampling-steps", "3",
                 "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out))


def test_lora_checkpoint_samples_exports_and_evaluates(tmp_path, lora_run):
    run, base = lora_run / "run", lora_run / "base"
    adapter = run / "checkpoints" / "step-000002" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["peft_type"] == "LORA"
    # export merges the adapter: a full pipeline folder, each target weight W + B A * alpha / r
    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(run), "-o", str(out), "--dtype", "float32"]) == 0
    merged, original = URSAPipeline.from_pretrained(out).transformer, URSAPipeline.from_pretrained(base).transformer
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = saved[f"{prefix}.lora_A.weight"], saved[f"{prefix}.lora_B.weight"]
    assert b.abs().max() > 1e-3
    expected = original.model.layers[0].self_attn.q_proj.weight + b @ a * (LORA["lora_alpha"] / LORA["r"])
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6)
    untouched = original.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, untouched)
    assert merged.state_dict().keys() == original.state_dict().keys()
    # sample --checkpoint RUN (the base found from the adapter) == the merged export, != the base model
    lora = _sample(tmp_path, "lora", "--checkpoint", str(run))
    assert np.array_equal(lora, _sample(tmp_path, "export", "--model", str(out)))
    assert not np.array_equal(lora, _sample(tmp_path, "base", "--model", str(base)))
    assert main(["eval", "shapes", "--checkpoint", str(run), "--limit", "2", "-n", "1", "--sampling-steps", "2",
                 "-o", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["checkpoint"] == str(adapter.parent) and result["checkpoint_step"] == 2


def test_adapter_is_peft_format(lora_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    from udm_grpo.models.lora import merge_adapter

    adapter = lora_run / "run" / "checkpoints" / "step-000002" / "adapter"
    peft_model = PeftModel.from_pretrained(URSAPipeline.from_pretrained(lora_run / "base").transformer, adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    params = dict(peft_model.named_parameters())
    for key, value in saved.items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")], value), key
    merged = merge_adapter(URSAPipeline.from_pretrained(lora_run / "base").transformer, adapter)
    text, image = torch.randint(0, 8, (2, 5)), torch.randint(0, merged.codebook_size, (2, 16))
    with torch.no_grad():
        logits = peft_model.image_logits(text, image, (4, 4)), merged.image_logits(text, image, (4, 4))
    torch.testing.assert_close(*logits, rtol=1e-5, atol=1e-5)


def _edited(lora_run, tmp_path, **changes):
    """A copy of the run's adapter folder (outside any run) with adapter_config.json fields changed."""
    folder = tmp_path / "adapter"
    shutil.copytree(lora_run / "run" / "checkpoints" / "step-000002" / "adapter", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, model, needle", [
    ({"base_model_name_or_path": "/nonexistent/base"}, False, "its base model /nonexistent/base cannot be found"),
    ({"base_model_name_or_path": None}, False, "it names no base model"),
    ({"target_modules": ["nope_proj"]}, True, "its target modules [\"nope_proj\"] do not fit the base model"),
    ({"r": 8}, True, "the adapter does not fit the base model"),
])
def test_bad_adapters_are_one_sentence(lora_run, tmp_path, capsys, changes, model, needle):
    folder = _edited(lora_run, tmp_path, **changes)
    args = ["--model", str(lora_run / "base")] if model else []
    assert main(["sample", "red circle", "--checkpoint", str(folder), "-o", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert str(folder / "adapter_config.json") in err or str(folder) in err


def test_offload_keys_round_trip_in_the_config(tmp_path):
    cfg = load_config(None, ["training.engine=deepspeed", "training.zero_stage=3", "training.offload_param=true",
                             "training.offload_optimizer=true"])
    assert cfg.training.offload_param and cfg.training.offload_optimizer
