"""`udm-grpo eval geneval / pickscore / ocr`: GenEval's folder layout, per-prompt seeds, results equal to
scoring the written images directly, resumption, refused setting changes, and two processes against one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from udm_grpo.cli import main
from udm_grpo.data.shapes import generate_records, write_metadata_jsonl
from udm_grpo.eval_suites import read_images
from udm_grpo.models.pipeline import URSAPipeline
from udm_grpo.rewards.shapeeval import ShapeEvalReward
from udm_grpo.stats import half_width, mean_of_groups_half_width

from .test_clip_rewards import build_tiny_clip
from .test_geneval_reward import tiny_models  # noqa: F401  (a module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--sampling-steps", "1"]


def world_records(n: int = 3) -> list[dict]:
    """The first test-split prompt of `n` different tags."""
    seen: dict[str, dict] = {}
    for r in generate_records("test"):
        seen.setdefault(r["tag"], r)
    return list(seen.values())[:n]


def geneval_args(meta: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "geneval", "--metadata", str(meta), "--reward", "shapeeval", "-n", "2", *STEPS, "-o", str(out),
            *extra]


def tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


class Counter:
    """Counts the calls of a method patched on its class."""

    def __init__(self, monkeypatch, cls, name="__call__"):
        self.calls, original = 0, getattr(cls, name)

        def wrapped(obj, *args, **kwargs):
            self.calls += 1
            return original(obj, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)


def test_geneval_layout_seeds_results_and_resumption(tmp_path, monkeypatch, capsys):
    records, meta, out = world_records(), tmp_path / "meta.jsonl", tmp_path / "out"
    write_metadata_jsonl(records, meta)
    assert main(geneval_args(meta, out, "--seed", "7")) == 0
    # GenEval's layout: one all-digit folder per prompt, its metadata line, samples/<5 digits>.png.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]
    assert {p.name for p in out.iterdir() if p.is_file()} == {"eval_config.json", "results.json", "grid.png"}
    for i, rec in enumerate(records):
        lines = (out / f"{i:05d}" / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0]) == rec
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["00000.png", "00001.png"]
    # Prompt i is sampled alone with a generator seeded seed + i.
    from udm_grpo.pipelines import load_pipeline

    pipe = load_pipeline(None)
    for i, rec in enumerate(records):
        direct = pipe([rec["prompt"]] * 2, num_inference_steps=1, guidance_scale=1.0, guidance_trunc=0.9,
                      generator=torch.Generator().manual_seed(7 + i)).images
        assert np.array_equal(read_images(out / f"{i:05d}", 2), direct) and not np.array_equal(*direct)
    # results.json = the reward on the written images, per tag, overall = mean over tags.
    result = json.loads((out / "results.json").read_text())
    strict = {}
    for i, rec in enumerate(records):
        strict[rec["tag"]] = ShapeEvalReward()(read_images(out / f"{i:05d}", 2), [rec["prompt"]] * 2,
                                               [rec] * 2).values["strict"].numpy()
    for tag, v in strict.items():
        row = result["per_tag"][tag]
        assert row["n"] == 2 and row["strict"] == pytest.approx(v.mean()) and row["strict_ci95"] == half_width(v)
    assert result["overall"]["strict"] == pytest.approx(np.mean([v.mean() for v in strict.values()]))
    assert result["overall"]["strict_ci95"] == pytest.approx(
        mean_of_groups_half_width([half_width(v) for v in strict.values()]))
    assert result["sampling"]["height"] == 64 and result["images_per_prompt"] == 2
    before = tree(out)

    # A rerun skips everything; a deleted image resamples (and rescores) only its prompt, to the same bytes.
    sampled, scored = Counter(monkeypatch, URSAPipeline, "generate"), Counter(monkeypatch, ShapeEvalReward)
    assert main(geneval_args(meta, out, "--seed", "7")) == 0
    assert (sampled.calls, scored.calls) == (0, 0)
    (out / "00001" / "samples" / "00001.png").unlink()
    (out / "00002" / "done.json").unlink()  # an interrupted prompt: images written, no marker
    (out / "00002" / ".00001.png.tmp").write_bytes(b"half")
    assert main(geneval_args(meta, out, "--seed", "7")) == 0
    assert (sampled.calls, scored.calls) == (2, 2)
    assert tree(out) == before
    assert main(geneval_args(meta, out, "--seed", "7", "--rescore")) == 0
    assert (sampled.calls, scored.calls) == (2, 5)
    assert tree(out) == before

    # Other settings are refused with one sentence naming the file; --rescore admits other reward settings only.
    capsys.readouterr()
    assert main(geneval_args(meta, out, "--seed", "8")) == 2
    err = capsys.readouterr().err
    assert "eval_config.json" in err and "seed 7, now 8" in err and len(err.strip().splitlines()) == 1
    write_metadata_jsonl(records[:2], tmp_path / "other.jsonl")
    assert main(geneval_args(tmp_path / "other.jsonl", out, "--seed", "7")) == 2
    assert "other prompts" in capsys.readouterr().err
    assert main(geneval_args(meta, out, "--seed", "7", "-p", "min_area=10")) == 2
    assert "--rescore" in capsys.readouterr().err
    assert main(geneval_args(meta, out, "--seed", "7", "-p", "min_area=10", "--rescore")) == 0
    assert (sampled.calls, scored.calls) == (2, 8)
    assert json.loads((out / "results.json").read_text())["reward_params"] == {"min_area": 10}
    assert main(geneval_args(meta, out, "--seed", "8", "--force")) == 0
    assert sampled.calls == 5


def test_a_folder_of_other_files_is_refused_and_bad_flags_are_one_sentence(tmp_path, capsys):
    meta, out = tmp_path / "meta.jsonl", tmp_path / "out"
    write_metadata_jsonl(world_records(1), meta)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(geneval_args(meta, out)) == 2
    assert "no readable eval_config.json" in capsys.readouterr().err and (out / "notes.txt").exists()
    for flags, needle in ((["--limit", "0"], "--limit"), (["--batch-size", "0"], "--batch-size"),
                          (["-p", "nokey"], "key=value"), (["--reward", "nope"], "'nope'")):
        assert main(geneval_args(meta, tmp_path / "new", *flags)) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["eval", "geneval", "--metadata", str(meta), "--reward", "shapeeval", "--batch-size", "1",
                 "-n", "2", *STEPS, "--limit", "1", "--force", "-o", str(out)]) == 0
    assert not (out / "notes.txt").exists() and (out / "00000" / "samples" / "00001.png").is_file()


def test_geneval_reward_on_a_tiny_mask2former(tiny_models, tmp_path):  # noqa: F811
    from udm_grpo.rewards.geneval import GenEvalReward

    detector, clip = tiny_models
    records = [{"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"},
               {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
                "prompt": "a photo of two dogs"}]
    meta, out = tmp_path / "meta.jsonl", tmp_path / "out"
    write_metadata_jsonl(records, meta)
    assert main(["eval", "geneval", "--metadata", str(meta), "-n", "1", *STEPS, "-o", str(out),
                 "-p", f"detector={detector}", "-p", f"clip={clip}"]) == 0
    result = json.loads((out / "results.json").read_text())
    reward = GenEvalReward(detector, clip, device="cpu")
    for i, rec in enumerate(records):
        direct = reward(read_images(out / f"{i:05d}", 1), [rec["prompt"]], [rec])
        row = result["per_tag"][rec["tag"]]
        assert row["strict"] == direct.values["strict"].item() and row["score"] == direct.values["score"].item()


def test_pickscore_results_and_reference_file(tmp_path):
    from udm_grpo.rewards.clip_score import PickScoreReward

    clip = build_tiny_clip(tmp_path)
    prompts = ["a red square", "two blue circles", "a green triangle"]
    (tmp_path / "test.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "pickscore", "--prompts", str(tmp_path / "test.txt"), *STEPS, "-o", str(out),
                 "-p", f"model={clip}", "-p", f"processor={clip}"]) == 0
    for i, p in enumerate(prompts):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == {"prompt": p}
    images = np.concatenate([read_images(out / f"{i:05d}", 1) for i in range(3)])
    raw = PickScoreReward(str(clip), str(clip), device="cpu")(images, prompts).values["pickscore"].numpy()
    overall = json.loads((out / "results.json").read_text())["overall"]
    assert overall["pickscore"] == pytest.approx(raw.mean(), abs=1e-5) and overall["n"] == 3
    assert overall["pickscore_ci95"] == pytest.approx(half_width(raw), rel=1e-4)
    mean, items = json.loads((out / "pickscore.json").read_text())["pickscore"]
    assert mean == pytest.approx(raw.mean(), abs=1e-5)
    assert [x["prompt"] for x in items] == prompts
    assert [x["image_path"] for x in items] == [str(out / f"{i:05d}" / "samples" / "00000.png") for i in range(3)]
    assert [x["score"] for x in items] == pytest.approx(raw.tolist(), abs=1e-5)


def test_ocr_results_and_prompts_without_a_target(tmp_path, capsys):
    from udm_grpo.rewards.ocr import OCRReward

    prompts = ['a sign that says "open"', 'a red square and the word "hi"']
    (tmp_path / "ocr.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "ocr", "--prompts", str(tmp_path / "ocr.txt"), *STEPS, "-o", str(out)]) == 0
    images = np.concatenate([read_images(out / f"{i:05d}", 1) for i in range(2)])
    direct = OCRReward()(images, prompts)
    overall = json.loads((out / "results.json").read_text())["overall"]
    assert overall["ocr"] == pytest.approx(direct.values["ocr"].mean().item())
    assert overall["ocr_exact"] == pytest.approx(direct.values["ocr_exact"].mean().item())
    (tmp_path / "bad.txt").write_text('a sign that says "open"\n\na plain square\n')
    capsys.readouterr()
    assert main(["eval", "ocr", "--prompts", str(tmp_path / "bad.txt"), "-o", str(tmp_path / "bad")]) == 2
    assert f"{tmp_path / 'bad.txt'}:3" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_two_processes_write_what_one_writes(tmp_path):
    meta = tmp_path / "meta.jsonl"
    write_metadata_jsonl(world_records(3), meta)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    trees = {}
    for procs in (1, 2):
        out = tmp_path / f"out{procs}"
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [])
        cmd = [sys.executable, *launcher, "-m", "udm_grpo", *geneval_args(meta, out)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # a hang fails
        assert done.returncode == 0, done.stderr[-3000:]
        trees[procs] = tree(out)
    assert len(trees[1]) == 3 + 3 * 5  # eval_config, results, grid + per prompt: metadata, 2 images, marker, scores
    assert trees[1].keys() == trees[2].keys()
    for name in trees[1]:
        assert trees[1][name] == trees[2][name], name  # results.json included: the same numbers
