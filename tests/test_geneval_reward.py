"""The GenEval reward on a tiny random Mask2Former and a tiny random CLIP saved in the Hugging Face format,
and its post-processing and colour path with the models replaced at their boundary."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from udm_grpo.errors import ConfigError, UserError
from udm_grpo.rewards import build_reward
from udm_grpo.rewards.geneval import GenEvalReward, box_of, object_crop

from .test_clip_rewards import build_tiny_clip

OBJECT_NAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "object_names.txt"
LABELS = ["person", "mouse", "cup", "dog"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A 1.4 MB Mask2Former (Swin backbone, 20 queries) over four COCO names, and a tiny CLIP."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    folder = tmp_path_factory.mktemp("geneval")
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64, window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=20, id2label=dict(enumerate(LABELS)),
                            label2id={n: i for i, n in enumerate(LABELS)}, use_pretrained_backbone=False)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder / "detector")
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder / "detector")
    return str(folder / "detector"), str(build_tiny_clip(folder))


RECORDS = [
    {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": "red"}],
     "prompt": "a photo of a red computer mouse"},
]


def test_end_to_end_on_tiny_models(tiny_models):
    detector, clip = tiny_models
    images = np.random.default_rng(0).integers(0, 256, (3, 80, 96, 3), dtype=np.uint8)
    prompts = [r["prompt"] for r in RECORDS]
    one = GenEvalReward(detector, clip, device="cpu", batch_size=1)
    out = one(images, prompts, RECORDS)
    assert out.scores.shape == (3,) and set(out.values) == {"strict", "score"}
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    again = build_reward("geneval", {"detector": detector, "clip": clip, "device": "cpu", "batch_size": 3})
    assert torch.equal(again(images, prompts, RECORDS).scores, out.scores)  # deterministic, batch-size invariant
    assert one.labels[1] == "computer mouse"  # COCO's name mapped to GenEval's
    with pytest.raises(UserError, match=r"^metadata\[0\]: include\[0\] has class 'unicorn', which is not one of"):
        one(images[:1], ["a unicorn"], [{"tag": "single_object", "include": [{"class": "unicorn", "count": 1}],
                                         "prompt": "a unicorn"}])
    with pytest.raises(UserError, match="metadata record"):
        one(images[:1], ["a cup"], [None])


class Boundary(GenEvalReward):
    """Models replaced at their boundary: known instances, and colour = the dominant channel of the
    masked pixels of the crop (so the test sees which crop reached the colour classifier)."""

    def __init__(self, instances):
        super().__init__(device="cpu")
        self._detector, self.labels, self._instances = object(), {0: "cup", 1: "dog"}, instances

    def instances(self, images):
        return self._instances

    def colours(self, crops, cls):
        out = []
        for c in crops:
            fg = c[(c != 0x99).any(-1)]
            out.append(("red", "green", "blue")[int(fg.mean(0).argmax())])
        return out


def square(image, x0, y0, size, rgb):
    mask = np.zeros(image.shape[:2], bool)
    mask[y0:y0 + size, x0:x0 + size] = True
    image[mask] = rgb
    return mask


def test_crop_class_count_position_and_correctness():
    image = np.full((64, 64, 3), 255, np.uint8)
    red = square(image, 4, 20, 16, (220, 30, 30))
    blue = square(image, 40, 22, 14, (30, 30, 220))
    crop = object_crop(image, red, box_of(red))
    assert crop.shape == (16, 16, 3) and (crop == (220, 30, 30)).all()
    assert (object_crop(image, red, (0, 0, 64, 64))[0, 0] == 0x99).all()  # outside the mask: grey
    reward = Boundary([[("cup", 0.95, red), ("cup", 0.8, blue), ("dog", 0.2, blue)]])
    records = [
        {"tag": "position", "include": [{"class": "cup", "count": 1, "color": "blue"},
                                        {"class": "cup", "count": 1, "color": "red", "position": ["left of", 0]}],
         "prompt": "a photo of a red cup left of a blue cup"},
    ]
    # Two cups, the higher-scoring one red: the official rule takes the top-1 cup for "blue" -> wrong.
    out = reward(image[None], [records[0]["prompt"]], records)
    assert out.values["strict"].item() == 0.0
    colour_only = {"tag": "colors", "include": [{"class": "cup", "count": 2}], "prompt": "two cups"}
    assert reward(image[None], ["two cups"], [colour_only]).values["strict"].item() == 1.0  # the dog at 0.2 is dropped
    left = {"tag": "position", "include": [{"class": "cup", "count": 2}], "prompt": "x"}
    dets = reward.detections(image, left, reward._instances[0])
    assert [d.color for d in dets] == [None, None] and [d.box for d in dets] == [(4, 20, 20, 36), (40, 22, 54, 36)]


@pytest.mark.skipif(not OBJECT_NAMES.is_file(), reason=f"GenEval's object_names.txt not found at {OBJECT_NAMES}")
def test_class_names_are_checked(tiny_models, tmp_path):
    detector, clip = tiny_models
    names = OBJECT_NAMES.read_text().split("\n")
    assert "computer mouse" in names and "mouse" not in names
    reward = GenEvalReward(detector, clip, class_names=str(OBJECT_NAMES), device="cpu")
    reward._load()  # person, computer mouse, cup, dog are all GenEval names
    partial = tmp_path / "names.txt"
    partial.write_text("person\ncup\ndog\n")
    with pytest.raises(ConfigError, match="'computer mouse'"):
        GenEvalReward(detector, clip, class_names=str(partial), device="cpu")._load()


def test_mmdet_results_convert_to_instances():
    """The mmdet backend's conversion, on an object shaped like mmdetection 3.x's DetDataSample."""
    from types import SimpleNamespace

    from udm_grpo.rewards.geneval import mmdet_instances

    masks = np.zeros((3, 8, 8), bool)
    masks[0, :2, :2] = masks[1, 4:, 4:] = True  # the third mask is empty: no instance
    pred = SimpleNamespace(labels=torch.tensor([1, 2, 0]), scores=torch.tensor([0.9, 0.4, 0.8]),
                           masks=torch.from_numpy(masks))
    out = mmdet_instances(SimpleNamespace(pred_instances=pred), {0: "person", 1: "computer mouse", 2: "cup"})
    assert [(c, round(s, 3)) for c, s, _ in out] == [("computer mouse", 0.9), ("cup", 0.4)]
    assert out[0][2].sum() == 4 and out[1][2].sum() == 16
    with pytest.raises(ValueError, match="mmdet_config"):
        GenEvalReward(detector_backend="mmdet")


def test_mmdet_backend_reports_a_missing_checkpoint(tmp_path):
    pytest.importorskip("mmdet", reason="mmdetection is not installed (optional backend; see the README)")
    from udm_grpo.errors import CheckpointError

    reward = GenEvalReward(str(tmp_path / "missing.pth"), detector_backend="mmdet",
                           mmdet_config=str(tmp_path / "missing.py"), device="cpu")
    with pytest.raises(CheckpointError, match="missing.pth"):
        reward._load_mmdet()


def test_score_command_and_trainer_with_geneval(tiny_models, tmp_path, capsys):
    from PIL import Image

    from udm_grpo.cli import main
    from udm_grpo.grpo.trainer import UDMGRPOTrainer

    from .test_pipeline import tiny_pipeline
    from .test_trainer import make_config

    detector, clip = tiny_models
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    files = []
    for i, im in enumerate(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(files[-1])
    params = ["-p", f"detector={detector}", "-p", f"clip={clip}", "-p", "device=cpu"]
    assert main(["score", *files, "--reward", "geneval", *params, "--metadata", str(meta)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and set(rows[0]["values"]) == {"strict", "score"}
    cfg = make_config(tmp_path, **{"reward.name": "geneval", "data.train": str(meta), "data.test": str(meta),
                                   "reward.params": {"detector": detector, "clip": clip, "device": "cpu"},
                                   "sampling.num_prompts_per_step": 2, "training.max_steps": 1})
    metrics = UDMGRPOTrainer(cfg, pipeline=tiny_pipeline(), progress=False).train_step()
    assert {"reward/strict", "reward/score", "train/loss"} <= set(metrics)


def test_records_are_validated_before_the_models_load(tmp_path):
    """Schema-invalid metadata is refused naming the item and field without loading a model, and a plain-text
    prompt file is refused at load time naming file:1."""
    from udm_grpo.data.prompts import load_prompts
    from udm_grpo.rewards import check_prompt_source

    reward = GenEvalReward(detector=str(tmp_path / "absent"), clip=str(tmp_path / "absent"), device="cpu")
    image = np.zeros((1, 32, 32, 3), np.uint8)
    bad = {**RECORDS[1], "include": [{"class": "dog", "count": 0}]}
    with pytest.raises(UserError, match=r"^metadata\[0\]: include\[0\]: 'count' must be an integer >= 1\.$"):
        reward(image, [bad["prompt"]], [bad])
    assert reward._detector is None
    assert GenEvalReward.check_records(RECORDS) is None
    assert GenEvalReward.check_records([RECORDS[0], {**RECORDS[0], "tag": "shapes"}])[0] == 1
    text = tmp_path / "a.txt"
    text.write_text("a photo of a cup\n")
    with pytest.raises(UserError, match=rf"^{text}:1: the GenEval reward needs GenEval-schema metadata records "
                                        r"\(a \.jsonl of GenEval records, e\.g\. from `udm-grpo data geneval`\)"):
        check_prompt_source("geneval", load_prompts(str(text)), str(text))
