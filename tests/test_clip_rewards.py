"""CLIP-family rewards and composition on a tiny random CLIP saved in the Hugging Face format, and the
`udm-grpo score` command."""

import json

import numpy as np
import pytest
import torch

from udm_grpo.cli import main
from udm_grpo.errors import CheckpointError
from udm_grpo.rewards import build_reward
from udm_grpo.rewards.base import RewardOutput
from udm_grpo.rewards.clip_score import CLIPReward, PickScoreReward
from udm_grpo.rewards.compose import ComposedReward


def _byte_symbols() -> list[str]:
    """The 256 byte symbols of CLIP's byte-level BPE (printable bytes as themselves, the rest shifted)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(shifted))]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def build_tiny_clip(folder):
    """A 2-layer, width-32 CLIP (image 32 px, patch 8) with a character-level CLIP tokenizer, saved as a
    model + processor folder (`folder/model`): what `from_pretrained` reads for the real ones."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate([*syms, *(s + "</w>" for s in syms), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": bos,
                     "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder / "model")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(folder / "model")
    return folder / "model"


def images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)


PROMPTS = ["a red cat", "b", "a very long prompt " * 30, "two dogs", "x"]


def test_clipscore_is_the_scaled_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    reward = CLIPReward(model=str(tiny_clip), device="cpu", batch_size=2)
    out = reward(images(), PROMPTS, None)
    # By hand: towers and projections separately, truncated to 77 tokens, normalised dot product.
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    from PIL import Image

    with torch.no_grad():
        pix = proc(images=[Image.fromarray(im) for im in images()], return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        raw = []
        for i, p in enumerate(PROMPTS):
            ids = proc.tokenizer(p, truncation=True, max_length=77, return_tensors="pt")
            txt = model.text_projection(model.text_model(**ids).pooler_output)[0]
            raw.append(model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img[i], txt, dim=0))
    raw = torch.stack(raw)
    assert torch.allclose(out.values["clipscore"], raw, atol=1e-5)
    assert torch.allclose(out.scores, raw / 100, atol=1e-7)
    again = CLIPReward(model=str(tiny_clip), device="cpu", batch_size=8)(images(), PROMPTS, None)
    assert torch.allclose(again.values["clipscore"], out.values["clipscore"], atol=1e-5)  # batch-size invariant


def test_pickscore_scale_and_processor_source(tiny_clip):
    reward = PickScoreReward(model=str(tiny_clip), processor=str(tiny_clip), device="cpu")
    out = reward(images(3), PROMPTS[:3], None)
    assert torch.allclose(out.scores, out.values["pickscore"] / 26)
    assert PickScoreReward().processor_id == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_missing_model_is_one_sentence(tmp_path):
    reward = build_reward("clipscore", {"model": str(tmp_path / "nowhere"), "device": "cpu"})
    with pytest.raises(CheckpointError, match="nowhere") as e:
        reward(images(1), ["a cat"], None)
    assert "\n" not in str(e.value) and "reward.params.model" in str(e.value)


class Constant:
    def __init__(self, values):
        self.values = torch.tensor(values)

    def __call__(self, images, prompts, metadata):
        return RewardOutput(self.values, {"constant": self.values, "other": 2 * self.values})


def test_composition_weights_normalises_and_keeps_every_value():
    a, b = Constant([0.0, 1.0, 2.0]), Constant([10.0, 10.0, 40.0])
    out = ComposedReward({"constant": a, "b": b}, [1.0, 0.5])(images(3), ["p"] * 3, None)
    assert torch.allclose(out.scores, torch.tensor([5.0, 6.0, 22.0]))
    assert set(out.values) == {"constant", "constant/other", "constant/score", "b/constant", "b/other", "b/score"}
    norm = ComposedReward({"a": a, "b": b}, normalize=True)(images(3), ["p"] * 3, None)
    za = (a.values - a.values.mean()) / (a.values.std(unbiased=False) + 1e-6)
    zb = (b.values - b.values.mean()) / (b.values.std(unbiased=False) + 1e-6)
    assert torch.allclose(norm.scores, za + zb, atol=1e-5)


def test_config_composes_named_rewards(tiny_clip):
    params = {"clipscore": {"model": str(tiny_clip), "device": "cpu"},
              "pickscore": {"model": str(tiny_clip), "processor": str(tiny_clip), "device": "cpu"}}
    reward = build_reward(["clipscore", "pickscore"], params, weights=[1.0, 2.0])
    out = reward(images(2), PROMPTS[:2], None)
    assert torch.allclose(out.scores, out.values["clipscore"] / 100 + 2 * out.values["pickscore"] / 26, atol=1e-6)


def test_score_command(tiny_clip, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images(3)):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\ntwo dogs\nx\n")
    opts = ["--reward", "clipscore", "-p", f"model={tiny_clip}", "-p", "device=cpu"]
    assert main(["score", str(folder), *opts, "--prompts-file", str(prompts)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    direct = CLIPReward(model=str(tiny_clip), device="cpu")(images(3), ["a red cat", "two dogs", "x"], None)
    assert [r["image"].endswith(f"{i:04d}.png") for i, r in enumerate(lines[:3])] == [True] * 3
    assert [r["score"] for r in lines[:3]] == pytest.approx(direct.scores.tolist(), abs=1e-6)
    assert lines[3]["summary"]["images"] == 3
    assert main(["score", str(tmp_path / "missing.png"), *opts, "--prompt", "a cat"]) == 2
    assert main(["score", str(folder), str(folder / "0000.png"), *opts, "--prompts-file", str(prompts)]) == 2
    assert "3 prompts for 4 images" in capsys.readouterr().err


def test_trainer_builds_a_composed_reward_from_the_config_and_logs_each_part(tiny_clip, tmp_path):
    from udm_grpo.grpo.trainer import UDMGRPOTrainer

    from .test_pipeline import tiny_pipeline
    from .test_trainer import make_config

    params = {"clipscore": {"model": str(tiny_clip), "device": "cpu"},
              "pickscore": {"model": str(tiny_clip), "processor": str(tiny_clip), "device": "cpu"}}
    cfg = make_config(tmp_path, **{"reward.name": ["clipscore", "pickscore"], "reward.params": params,
                                   "reward.weights": [1.0, 0.5], "training.max_steps": 1})
    metrics = UDMGRPOTrainer(cfg, pipeline=tiny_pipeline(), progress=False).train_step()
    assert {"reward/clipscore", "reward/pickscore", "reward/clipscore/score", "reward/mean"} <= set(metrics)
    assert metrics["reward/mean"] == pytest.approx(metrics["reward/clipscore/score"]
                                                   + 0.5 * metrics["reward/pickscore/score"], abs=1e-5)


@pytest.mark.parametrize("over, needle", [
    ({"reward.name": ["clipscore", "clipscore"]}, "distinct"),
    ({"reward.name": "clipscore", "reward.weights": [1.0]}, "reward.weights"),
    ({"reward.name": ["clipscore", "pickscore"], "reward.weights": [1.0]}, "1 weights for 2"),
])
def test_composition_config_errors(over, needle, tmp_path):
    from udm_grpo.errors import ConfigError

    from .test_trainer import make_config

    with pytest.raises(ConfigError, match=needle):
        make_config(tmp_path, **over)
