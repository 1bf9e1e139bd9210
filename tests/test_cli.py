"""The `udm-grpo` command: help, version, and one-sentence errors with exit status 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from udm_grpo import __version__
from udm_grpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "udm_grpo.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["--version"]) == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["train", "sampling.train_steps=-1", "--check"], "sampling.train_steps"),
    (["train", "sampling.num_image_per_prompt=4", "--check"], "did you mean"),
    (["train", "--config", "/nonexistent.yaml", "--check"], "/nonexistent.yaml"),
    (["train", "sampling.num_prompts_per_step=3", "sampling.num_images_per_prompt=4", "training.micro_batch_size=5",
      "--check"], "micro"),
    (["sample"], "at least one prompt"),
    (["sample", "x", "--steps", "0"], "--steps"),
    (["eval", "shapes", "--metadata", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["sample", "x", "--model", "/nonexistent-model"], "/nonexistent-model"),
    (["sample", ""], "prompt 1 is blank"),
    (["sample", "x", "--device", "banana"], "--device banana"),
])
def test_bad_input_is_one_sentence_exit_2(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_train_check_prints_plan():
    result = run_cli("train", "--check")
    assert result.returncode == 0, result.stderr
    assert "images/step" in result.stdout


def test_template_is_current_and_loads_as_the_tiny_world_defaults():
    from udm_grpo.commands.train import DEFAULT_CONFIG, ROOT_TEMPLATE, template_text
    from udm_grpo.config import config_to_dict, describe_schema, load_config

    text = template_text()
    assert ROOT_TEMPLATE.read_text() == text, "regenerate: udm-grpo train --print-template > configs/template.yaml"
    assert config_to_dict(load_config(ROOT_TEMPLATE)) == config_to_dict(load_config(DEFAULT_CONFIG))
    assert all(f"{key.rsplit('.', 1)[1]}:" in text for key, *_ in describe_schema())


def test_partial_config_is_layered_on_the_tiny_world(tmp_path):
    partial = tmp_path / "my.yaml"
    partial.write_text("training:\n  lr: 3.0e-4\n")
    result = run_cli("train", "--config", str(partial), "--check")
    assert result.returncode == 0, result.stderr
    from udm_grpo import run_config

    cfg = run_config(partial)
    assert cfg.training.lr == 3e-4 and cfg.reward.name == "shapeeval"


@pytest.mark.parametrize("args, needle", [
    (["train", "--steps", "-5"], "argument --steps: expected an integer >= 1, got '-5'"),
    (["train", "--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such folder"),
    (["train", "--check", "reward.name=nope"], "'reward.name' is 'nope'"),
    (["train", "--check", "reward.params={colour: 1}"], "reward.params"),
    (["train", "--check", "model.path=/nonexistent/model"], "/nonexistent/model: no such model folder"),
    (["train", "--check", "data.test=/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["train", "--check", "experiment.sample_every=5"], "experiment.eval_every"),
    (["eval", "shapes", "--checkpoint", "/nonexistent/run"], "--checkpoint /nonexistent/run: no such folder"),
    (["serve-reward", "--reward", "shapeeval", "--token-file", "/nonexistent/token"], "/nonexistent/token"),
    (["serve-reward", "--reward", "shapeeval", "--token-file", "t", "--port", "80"], "privileged"),
])
def test_train_inputs_are_one_sentence(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and needle in lines[0], result.stderr


def test_second_run_into_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("keep me\n")
    result = run_cli("train", "-o", str(run), "--steps", "1")
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--force" in result.stderr
    assert (run / "config.yaml").read_text() == "keep me\n"


def test_dev_py_help_and_pass_through_are_documented():
    result = subprocess.run([sys.executable, "dev.py", "--help"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0 and "dev.py COMMAND" in result.stdout and ".venv/bin/udm-grpo" in result.stdout


def test_verdict_reads_like_a_summary(tmp_path):
    from udm_grpo.commands.verdict import verdict

    records = [{"prompt": "p", "tag": t} for t in ("a", "b") for _ in range(16)]
    first = {"eval/strict": 0.2, "eval/strict/a": 0.1, "eval/strict/b": 0.3, "eval/ci95/strict": 0.05}
    last = {"eval/strict": 0.5, "eval/strict/a": 0.6, "eval/strict/b": 0.4, "eval/ci95/strict": 0.05,
            "eval/ci95/strict/a": 0.2, "eval/ci95/strict/b": 0.2, "eval/reward": 0.7, "eval/images": 32,
            "eval/strict_images": 0.5}
    text = verdict(first, last, records, 60, 7.5, tmp_path / "run", tiny_world=True)
    assert "60 steps in 7.5 min" in text and "16 images per tag" in text
    assert "0.100 -> 0.600 +-0.20" in text and "overall strict: +0.300, beyond the noise" in text
    assert "eval shapes --per-tag 64 --checkpoint" in text and str(tmp_path / "run") in text


def test_sampling_steps_has_its_own_name_and_the_old_one_still_works(tmp_path, capsys):
    """`--steps` counts optimiser steps in `train`; sampling commands call theirs --sampling-steps and still
    take --steps with a one-line deprecation warning (the same images)."""
    from udm_grpo.tinyworld import SHIPPED_MODEL

    if not (SHIPPED_MODEL / "model_index.json").is_file():
        pytest.skip("the shipped tiny-world model is not built")
    new, old = tmp_path / "new.png", tmp_path / "old.png"
    assert main(["sample", "a photo of a circle", "-n", "1", "--sampling-steps", "2", "-o", str(new)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["sample", "a photo of a circle", "-n", "1", "--steps", "2", "-o", str(old)]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["udm-grpo: warning: --steps is deprecated here; use --sampling-steps 2."]
    assert new.read_bytes() == old.read_bytes()


def test_python_api_example_trains_and_reports(tmp_path):
    """examples/python_api.py, as a user runs it (a fresh process), with 2 steps."""
    from udm_grpo.tinyworld import SHIPPED_MODEL

    if not (SHIPPED_MODEL / "model_index.json").is_file():
        pytest.skip("the shipped tiny-world model is not built")
    example = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(example), "--steps", "2", "-o", str(run)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"held-out strict accuracy: \d\.\d{3} -> \d\.\d{3} \(\+-\d\.\d{3}, 96 images\) after 2 "
                        rf"steps; run folder {re.escape(str(run))}", line), line
    evals = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and (run / "checkpoints" / "step-000002").is_dir()
    assert line.startswith(f"held-out strict accuracy: {evals[0]['eval/strict']:.3f} -> {evals[1]['eval/strict']:.3f}")
    import udm_grpo

    assert set(udm_grpo.__all__) <= set(dir(udm_grpo)) and all(getattr(udm_grpo, n) for n in udm_grpo.__all__)
