"""The OCR reward: target extraction and distance against hand-computed cases, the real rapidocr engine
reading rendered text, tesseract when installed, and prompt files refused at load time with file:line."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from udm_grpo.errors import UserError
from udm_grpo.rewards.ocr import OCRReward, normalise, ocr_distance, ocr_target

pytest.importorskip("rapidfuzz", reason="the OCR reward needs the 'ocr' extra: pip install 'udm-grpo[ocr]'")


def test_target_and_distance_by_hand():
    assert ocr_target('a neon sign that says "Open 24 H" and "closed"') == "open24h"
    assert ocr_target("a photo of a cat") is None and ocr_target('an empty "  " sign') is None
    assert normalise(" Hello\tWorld \n") == "helloworld"
    assert ocr_distance("thecafeisopen", "open") == 0  # a substring counts as read
    assert ocr_distance("opem", "open") == 1
    assert ocr_distance("xx", "open") == 4  # Levenshtein 4 (2 substitutions + 2 insertions)
    assert ocr_distance("abcdefghijklmnop", "open") == 4  # capped at len(target)


class Reading(OCRReward):
    def __init__(self, texts):
        super().__init__()
        self._reader = lambda im: texts[int(np.asarray(im)[0, 0, 0])]


def test_scores_and_exact_match():
    texts = ["OPEN now", "opem", "", "A B C N"]  # distances 0, 1, 4 (capped), 3
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(4)
    out = Reading(texts)(images, ['a sign "open"'] * 4, None)
    assert torch.allclose(out.scores, torch.tensor([1.0, 0.75, 0.0, 0.25]))
    assert out.values["ocr_exact"].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(UserError, match="prompt 2 .* quotes no text"):
        Reading(texts)(images[:2], ['a sign "open"', "a sign"], None)


def render(texts, size=(360, 96)):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=40)
    out = []
    for t in texts:
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).text((16, 24), t, fill="black", font=font)
        out.append(np.asarray(im))
    return np.stack(out)


WORDS = ["HELLO", "udm grpo", "Open 24h", "CAFE", "stop", "Rapid 2026"]


def test_rapidocr_reads_rendered_text():
    pytest.importorskip("rapidocr", reason="the default OCR engine is in the 'ocr' extra")
    out = OCRReward()(render(WORDS), [f'a sign that says "{w}"' for w in WORDS], None)
    assert out.scores.tolist() == [1.0] * 6 and out.values["ocr_exact"].tolist() == [1.0] * 6
    wrong = OCRReward()(render(["CAFE"]), ['a sign that says "CAKE"'], None)
    assert wrong.scores.tolist() == [0.75]


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="the tesseract program is not installed")
def test_tesseract_reads_rendered_text():
    pytest.importorskip("pytesseract", reason="pytesseract is not installed")
    out = OCRReward(engine="tesseract")(render(WORDS[:3]), [f'"{w}"' for w in WORDS[:3]], None)
    assert out.scores.mean().item() > 0.8


def test_prompt_file_without_quotes_is_refused_at_load(tmp_path):
    from .test_trainer import make_config

    prompts = tmp_path / "ocr.txt"
    prompts.write_text('a sign that says "open"\n\na poster of a cat\n')
    with pytest.raises(UserError, match=r"ocr\.txt:3: the prompt 'a poster of a cat' quotes no text"):
        from udm_grpo.grpo.trainer import UDMGRPOTrainer

        from .test_pipeline import tiny_pipeline

        cfg = make_config(tmp_path, **{"reward.name": "ocr", "data.train": str(prompts)})
        UDMGRPOTrainer(cfg, pipeline=tiny_pipeline(), progress=False)
    result = subprocess.run([sys.executable, "-m", "udm_grpo.cli", "train", "--check", "reward.name=ocr",
                             f"data.train={prompts}", f"data.test={prompts}"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "ocr.txt:3" in result.stderr and "Traceback" not in result.stderr


def test_score_command_reads_png_files(tmp_path, capsys):
    pytest.importorskip("rapidocr", reason="the default OCR engine is in the 'ocr' extra")
    import json

    from PIL import Image

    from udm_grpo.cli import main

    for i, im in enumerate(render(["CAFE", "stop"])):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign "cafe"\na sign "go"\n')
    assert main(["score", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--reward", "ocr",
                 "--prompts-file", str(prompts)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["values"]["ocr_exact"] for r in rows[:2]] == [1.0, 0.0]
    assert rows[2]["summary"]["mean ocr_exact"] == 0.5


def test_trainer_step_with_the_ocr_reward(tmp_path):
    pytest.importorskip("rapidocr", reason="the default OCR engine is in the 'ocr' extra")
    from udm_grpo.grpo.trainer import UDMGRPOTrainer

    from .test_pipeline import tiny_pipeline
    from .test_trainer import make_config

    prompts = tmp_path / "ocr.txt"
    prompts.write_text('a sign that says "open"\na poster that says "red circle"\n')
    cfg = make_config(tmp_path, **{"reward.name": "ocr", "data.train": str(prompts), "data.test": str(prompts),
                                   "training.max_steps": 1})
    metrics = UDMGRPOTrainer(cfg, pipeline=tiny_pipeline(), progress=False).train_step()
    assert {"reward/ocr", "reward/ocr_exact", "train/loss"} <= set(metrics)
