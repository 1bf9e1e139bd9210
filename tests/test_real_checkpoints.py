"""Real checkpoints: a hub snapshot in the HF cache (remote-code model_index entries, shim files that must
never run, safetensors or legacy .bin), the reference trainer's checkpoint folders as `--checkpoint`, and
pickles that hold more than tensors (refused, never executed)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from udm_grpo.cli import main
from udm_grpo.errors import CheckpointError, UserError
from udm_grpo.models.io import read_weights
from udm_grpo.models.pipeline import HUB_FILES, HUB_IGNORE, URSAPipeline
from udm_grpo.pipelines import load_pipeline

from .test_pipeline import tiny_pipeline

REPO = "tiny-owner/URSA-tiny-IBQ16"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["a photo of a red circle", "blue square"]
SHIM = "import pathlib\npathlib.Path({sentinel!r}).write_text('executed')\nraise RuntimeError('shim executed')\n"


class Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle payload)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def to_bin(folder: Path) -> None:
    """Replace a component folder's safetensors by the legacy torch.save'd state dict (as the reference saves)."""
    state = read_weights(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")


def hub_layout(folder: Path, sentinel: Path, legacy: bool = False) -> None:
    """Turn a saved pipeline folder into what the hub repo holds: remote-code entries, shims, .bin weights."""
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer=["diffnext", "URSATransformer3DModel"], vae=["__vae__", "AutoencoderVQ"],
                 scheduler=["__scheduler__", "KineticOptimalScheduler"])
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in ("transformer", "vae", "scheduler"):
        (folder / name / f"__{name}__.py").write_text(SHIM.format(sentinel=str(sentinel)))
    # The reference's scheduler file: a plain dict of tensors written by torch.save (weights_only reads it).
    emb = torch.load(folder / "scheduler" / "scheduler_model.pth", weights_only=True)["path.emb"]
    torch.save({"path.emb": emb.clone()}, folder / "scheduler" / "scheduler_model.pth")
    if legacy:
        to_bin(folder / "transformer")
        to_bin(folder / "vae")


def fake_cache(cache: Path, source: Path, repo: str = REPO) -> Path:
    """The HF cache layout `models--owner--name/{refs/main, snapshots/<commit>/...}` holding `source`."""
    import shutil

    storage = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, storage / "snapshots" / COMMIT)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)  # no newline: huggingface_hub reads it verbatim
    return storage / "snapshots" / COMMIT


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """(pipeline, its folder, the sentinel a shim would write): saved as a hub snapshot in a fake HF cache."""
    from huggingface_hub import constants

    pipe = tiny_pipeline("ibq")
    pipe.save_pretrained(tmp_path / "m")
    sentinel = tmp_path / "shim-ran"
    hub_layout(tmp_path / "m", sentinel)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pipe, tmp_path / "m", sentinel


def images(pipe):
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, seed=3).images


@pytest.mark.parametrize("legacy", [False, True])
def test_hub_id_loads_from_the_cache_like_the_folder(tmp_path, hub, legacy):
    pipe, folder, sentinel = hub
    if legacy:
        to_bin(folder / "transformer")
        to_bin(folder / "vae")
    fake_cache(tmp_path / "hub", folder)
    by_id = URSAPipeline.from_pretrained(REPO)
    by_folder = URSAPipeline.from_pretrained(folder)
    assert np.array_equal(images(by_id), images(by_folder))
    assert np.array_equal(images(by_id), images(pipe))
    assert not sentinel.exists()  # the shims were never imported
    assert (folder / "transformer" / "diffusion_pytorch_model.bin").is_file() == legacy


def test_missing_hub_id_offline_is_one_sentence(hub):
    with pytest.raises(CheckpointError) as e:
        URSAPipeline.from_pretrained("BAAI/URSA-1.7B-IBQ512")
    msg = str(e.value)
    assert "\n" not in msg and msg.count(". ") == 0
    assert "not in the Hugging Face cache" in msg and "hf download BAAI/URSA-1.7B-IBQ512" in msg
    # A relative path that does not exist but looks like a hub id reads the same way; other strings do not.
    with pytest.raises(CheckpointError, match="no such model folder"):
        URSAPipeline.from_pretrained("no/such/folder")


def test_hub_patterns_fetch_only_what_is_read():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["model_index.json", "README.md", "transformer/config.json", "transformer/__transformer__.py",
            "transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.bin",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json", "vae/__vae__.py",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
            "scheduler/scheduler_model.pth", "scheduler/__scheduler__.py", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenization_custom.py", "assets/teaser.png", "ema/diffusion_pytorch_model.bin"]
    got = set(filter_repo_objects(repo, allow_patterns=HUB_FILES, ignore_patterns=HUB_IGNORE))
    assert not any(name.endswith(".py") for name in got)
    assert got == set(repo) - {"README.md", "assets/teaser.png", "ema/diffusion_pytorch_model.bin",
                               "transformer/__transformer__.py", "vae/__vae__.py", "scheduler/__scheduler__.py",
                               "tokenizer/tokenization_custom.py"}


def reference_checkpoint(out: Path, step: int, base: URSAPipeline, scale: float) -> Path:
    """`<out>/checkpoints/checkpoint-<step>/transformer/` as the reference trainer writes it: config.json +
    a torch.save'd state dict in diffusion_pytorch_model.bin, here of perturbed weights."""
    folder = out / "checkpoints" / f"checkpoint-{step}" / "transformer"
    base.transformer.save_pretrained(folder)
    state = {k: v + scale for k, v in read_weights(folder).items()}
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder


def head(pipe) -> torch.Tensor:
    return pipe.transformer.lm_head.weight.detach()


def test_reference_training_checkpoint_as_checkpoint(tmp_path):
    base = tiny_pipeline("ibq")
    base.save_pretrained(tmp_path / "m")
    out = tmp_path / "ref-run"
    reference_checkpoint(out, 3, base, 0.5)
    seventh = reference_checkpoint(out, 7, base, 1.0)
    expected = head(base) + 1.0
    for spec in (out, seventh.parent, seventh):  # output folder (highest step), checkpoint-7, bare transformer
        pipe = load_pipeline(str(tmp_path / "m"), "cpu", str(spec))
        assert torch.allclose(head(pipe), expected), spec
    assert torch.equal(head(load_pipeline(str(tmp_path / "m"), "cpu", str(out / "checkpoints" / "checkpoint-3"))),
                       head(base) + 0.5)
    png = tmp_path / "s.png"
    assert main(["sample", *PROMPTS[:1], "-n", "2", "--sampling-steps", "2", "-o", str(png),
                 "--model", str(tmp_path / "m"), "--checkpoint", str(out)]) == 0
    assert png.is_file()


def test_reference_lora_and_empty_checkpoints_are_one_sentence(tmp_path, capsys):
    out = tmp_path / "ref-run"
    adapter = out / "checkpoints" / "checkpoint-5" / "transformer"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"")
    for spec in (out, adapter.parent, adapter):
        with pytest.raises(UserError, match="adapter_config.json: not a PEFT LoRA adapter config"):
            load_pipeline(None, "cpu", str(spec))
    # A LoRA config that names no base, outside a udm-grpo run: the base must be given.
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="it names no base model .*; pass the base pipeline with --model"):
        load_pipeline(None, "cpu", str(out))
    base = tiny_pipeline("ibq")
    base.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="adapter_model.bin: cannot be read as a weight file"):
        load_pipeline(str(tmp_path / "m"), "cpu", str(out))
    # The reference saves adapters as torch.save'd .bin (read with weights_only=True): merged into the base.
    q = base.transformer.model.layers[1].self_attn.q_proj.weight
    a, b = torch.randn(2, q.shape[1]), torch.randn(q.shape[0], 2)
    layers = range(len(base.transformer.model.layers))
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    torch.save({**{key.format(i, "A"): a for i in layers}, **{key.format(i, "B"): b for i in layers}},
               adapter / "adapter_model.bin")
    merged = load_pipeline(str(tmp_path / "m"), "cpu", str(out)).transformer.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(merged, q + b @ a * 2.0)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    for spec, needle in ((tmp_path / "empty", "no checkpoint in"), (tmp_path / "other", "neither a run folder")):
        assert main(["sample", "red circle", "--checkpoint", str(spec), "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "custom class"])
def test_pickles_beyond_tensors_are_refused_and_never_run(tmp_path, kind):
    base = tiny_pipeline("ibq")
    base.save_pretrained(tmp_path / "m")
    folder = reference_checkpoint(tmp_path / "run", 1, base, 0.0)
    weights, sentinel = folder / "diffusion_pytorch_model.bin", tmp_path / "payload-ran"
    state = {"lm_head.weight": torch.zeros(2), "evil": Payload(sentinel)}
    if kind == "pickle":
        weights.write_bytes(pickle.dumps(state, protocol=2))
    elif kind == "torch.save":
        torch.save(state, weights)
    else:
        torch.save({"lm_head.weight": torch.zeros(2), "cfg": np.dtype("float32").type}, weights)
    with pytest.raises(CheckpointError) as e:
        load_pipeline(str(tmp_path / "m"), "cpu", str(folder))
    msg = str(e.value)
    assert msg.startswith(f"{weights}: cannot be read as a weight file (refused by torch.load(weights_only=True)")
    assert "\n" not in msg and "weights_only=False" not in msg
    assert not sentinel.exists()


def test_cli_reads_the_cache_from_the_environment(tmp_path):
    """HF_HOME / HF_HUB_OFFLINE as a user sets them, in a fresh process: `udm-grpo sample --model OWNER/NAME`."""
    pipe = tiny_pipeline("ibq")
    pipe.save_pretrained(tmp_path / "m")
    sentinel = tmp_path / "shim-ran"
    hub_layout(tmp_path / "m", sentinel, legacy=True)
    fake_cache(tmp_path / "home" / "hub", tmp_path / "m")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    png = tmp_path / "s.png"
    cmd = [sys.executable, "-m", "udm_grpo", "sample", "red circle", "-n", "1", "--sampling-steps", "2", "-o", str(png)]
    done = subprocess.run([*cmd, "--model", REPO], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert png.is_file() and not sentinel.exists()
    missing = subprocess.run([*cmd, "--force", "--model", "BAAI/URSA-1.7B-IBQ512"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "not in the Hugging Face cache" in missing.stderr
    assert missing.stderr.count("\n") == 1
