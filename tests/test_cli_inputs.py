"""Inputs a new user gets wrong: blank or unknown prompts, foreign metadata, conflicting flags, devices, and
what `sample` / `eval shapes` write (captioned grids, the scored checkpoint)."""

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from udm_grpo.cli import main
from udm_grpo.data.shapes import generate_records, read_metadata_jsonl
from udm_grpo.data.text_tokenizer import build_word_tokenizer, tiny_world_vocabulary, unknown_words
from udm_grpo.errors import UserError
from udm_grpo.grpo.logger import plot_curves
from udm_grpo.images import make_grid, wrap_text
from udm_grpo.models.pipeline import URSAPipeline
from udm_grpo.tinyworld import SHIPPED_MODEL

FAST = ["--sampling-steps", "2", "-n", "1"]
TILE = 64 * 2 + 2  # a scale-2 tile and its padding

shipped = pytest.mark.skipif(not (SHIPPED_MODEL / "model_index.json").is_file(),
                             reason="the shipped tiny-world model is not built")


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- 1. prompts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", [[""], ["a photo of a circle", "   "]])
def test_blank_prompt_is_refused(prompts, capsys):
    assert main(["sample", *prompts, *FAST]) == 2
    assert f"prompt {len(prompts)} is blank" in error_line(capsys)


def test_unknown_words_only_with_an_unknown_token():
    tok = build_word_tokenizer(tiny_world_vocabulary(), 16)
    assert unknown_words(tok, ["a photo of a Zebra", "a dog and a zebra", "a photo of a red circle"]) == ["Zebra",
                                                                                                          "dog",
                                                                                                          "zebra"]
    assert unknown_words(tok, ["a photo of two circles"]) == []
    bpe = SimpleNamespace(unk_token_id=None, is_fast=True)  # like a byte-level BPE: nothing is unknown
    assert unknown_words(bpe, ["a photo of a zebra"]) == []


@shipped
def test_sample_warns_once_about_unknown_words(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", "a photo of a zebra", "a dog and a zebra", *FAST, "-o", str(out)]) == 0
    line = error_line(capsys)
    assert "warning" in line and "'zebra'" in line and "'dog'" in line
    assert main(["sample", "a photo of a red circle", *FAST, "-o", str(out), "--force"]) == 0
    assert "warning" not in capsys.readouterr().err


@shipped
def test_pipeline_refuses_an_empty_prompt_list():
    pipe = URSAPipeline.from_pretrained(SHIPPED_MODEL)
    with pytest.raises(UserError, match="at least one prompt"):
        pipe([], num_inference_steps=2)


# ---- 2. eval shapes inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("clause, needle", [({"class": "dog", "count": 1}, "'dog'"),
                                            ({"class": "circle", "count": 1, "color": "pink"}, "'pink'")])
def test_eval_refuses_what_the_world_lacks(tmp_path, capsys, clause, needle):
    recs = generate_records("test")[:2]
    recs[1] = {"tag": "single_object", "include": [clause], "prompt": "a photo of something"}
    meta = write_jsonl(tmp_path / "meta.jsonl", recs)
    assert read_metadata_jsonl(meta)[1] == recs[1]  # the generic GenEval reader accepts other classes
    assert main(["eval", "shapes", "--metadata", str(meta), *FAST, "-o", str(tmp_path / "ev")]) == 2
    line = error_line(capsys)
    assert f"{meta}:2" in line and needle in line
    assert not (tmp_path / "ev").exists()


def test_eval_refuses_n_with_per_tag(tmp_path, capsys):
    assert main(["eval", "shapes", "--per-tag", "2", "-n", "4", "--sampling-steps", "2",
                 "-o", str(tmp_path / "ev")]) == 2
    line = error_line(capsys)
    assert "--per-tag" in line and "--images-per-prompt" in line


# ---- 3. devices -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device, needle", [("cuda", "CUDA is not available"), ("cuda:x", "not a torch device"),
                                            ("banana", "not a torch device")])
def test_unusable_device_is_one_sentence(device, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", "a photo of a circle", *FAST, "--device", device, "-o", str(tmp_path / "s.png")]) == 2
    line = error_line(capsys)
    assert f"--device {device}" in line and needle in line


# ---- 4. eval shapes records the checkpoint it scored ----------------------------------------------
@shipped
def test_eval_records_checkpoint_and_step(tmp_path):
    meta = write_jsonl(tmp_path / "meta.jsonl", generate_records("test")[:2])
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (2, 5):
        shutil.copytree(SHIPPED_MODEL / "transformer", ckpts / f"step-{step:06d}" / "transformer")
        (ckpts / f"step-{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (ckpts / "latest").write_text("step-000005")
    assert main(["eval", "shapes", "--metadata", str(meta), *FAST, "--checkpoint", str(tmp_path / "run"),
                 "-o", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["checkpoint"] == str(ckpts / "step-000005") and result["checkpoint_step"] == 5
    assert main(["eval", "shapes", "--metadata", str(meta), *FAST, "--checkpoint", str(ckpts / "step-000002"),
                 "-o", str(tmp_path / "ev"), "--force"]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["checkpoint"] == str(ckpts / "step-000002") and result["checkpoint_step"] == 2
    assert main(["eval", "shapes", "--metadata", str(meta), *FAST, "-o", str(tmp_path / "ev"), "--force"]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["checkpoint"] is None and result["checkpoint_step"] is None


# ---- 5. grids -------------------------------------------------------------------------------------
def test_make_grid_stays_compatible_and_captions_each_tile():
    images = np.full((6, 64, 64, 3), 200, np.uint8)
    plain = make_grid(images, nrow=4, scale=2)
    assert plain.size == (4 * TILE + 2, 2 * TILE + 2)  # no labels, no captions: the old layout
    long = "a photo of a red circle and a blue square left of a green triangle"
    captioned = make_grid(images, nrow=4, scale=2, captions=[long] * 6, labels=["colors", "position"])
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1] + 4 * 12
    strip = np.asarray(captioned)[:, 2:2 + 128]  # the first column: its captions are drawn in black under it
    assert (strip < 100).all(axis=2).any(axis=1).sum() > 3 * 8
    from udm_grpo.images import caption_font

    lines = wrap_text(long, caption_font(12), 124)
    assert len(lines) >= 3 and " ".join(lines) == long
    sparse = make_grid([images[0], None, images[1]], nrow=3, captions=["a", "", "b"])
    assert sparse.size[0] == 3 * 66 + 2


@shipped
def test_eval_grid_uses_columns_and_captions(tmp_path):
    recs = [r for r in generate_records("test") if r["tag"] == "position"][:10]
    meta = write_jsonl(tmp_path / "meta.jsonl", recs)
    assert main(["eval", "shapes", "--metadata", str(meta), *FAST, "-o", str(tmp_path / "ev")]) == 0
    grid = Image.open(tmp_path / "ev" / "grid.png")
    assert grid.size[0] == 8 * TILE + 2 and grid.size[1] < 3 * (TILE + 60)  # 10 images: 8 + 2, not one column
    assert main(["sample", "a photo of a circle", "--sampling-steps", "2", "-n", "2",
                 "-o", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] == 2 * TILE + 2


# ---- 6. .gitignore --------------------------------------------------------------------------------
def test_default_outputs_are_ignored():
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["eval-shapes/results.json", "samples.png", "tiny-world/model_index.json", "runs/a/metrics.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=root, capture_output=True, text=True).stdout
    assert ignored.split() == paths
    shipped_file = "udm_grpo/assets/tiny-world/model_index.json"
    assert subprocess.run(["git", "check-ignore", "--no-index", "-q", shipped_file], cwd=root).returncode == 1


# ---- 7. curves ------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [("reward_mean", "kl", "strict", "score"),
                                   ("reward/mean", "train/kl", "eval/strict", "eval/score")])
def test_curves_have_one_labelled_panel_each(tmp_path, monkeypatch, names):
    reward, kl, strict, score = names
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, reward: 0.1 * s, kl: 0.01 * s} for s in range(1, 5)])
    write_jsonl(tmp_path / "eval.jsonl", [{"step": s, strict: 0.2, score: 0.5} for s in (0, 4)])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_curves(tmp_path).is_file()
    ax_reward, ax_eval, ax_kl = figures[0].axes
    assert [len(ax.lines) for ax in (ax_reward, ax_eval, ax_kl)] == [1, 2, 1]
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() for ax in figures[0].axes)
    assert list(ax_eval.lines[0].get_xdata()) == [0, 4] and list(ax_kl.lines[0].get_ydata())[-1] == 0.04
    (tmp_path / "eval.jsonl").unlink()  # no eval yet: that panel is empty, the others still drawn
    assert plot_curves(tmp_path).is_file() and [len(ax.lines) for ax in figures[1].axes] == [1, 0, 1]
