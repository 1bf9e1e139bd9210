"""The `udm-grpo` command: help, version, and one-sentence errors with exit status 2."""

import subprocess
import sys

import pytest

from udm_grpo import __version__
from udm_grpo.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "udm_grpo.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


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
