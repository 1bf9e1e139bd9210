"""Issue 22's bad-input probe, fixed by mechanism: the output gate (`outputs`), the one text reader
(`textfiles`), the folder lock, the shared start check (`preflight`), validated flags. Each defect the probe
found has a test here, and each mechanism is also tried on commands and inputs the probe did not list."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from udm_grpo.cli import build_parser, main
from udm_grpo.data.shapes import generate_records, write_metadata_jsonl
from udm_grpo.errors import UserError
from udm_grpo.outputs import LOCK_NAME, FolderLock, atomic_file, atomic_folder, check_output
from udm_grpo.tinyworld import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--sampling-steps", "2", "-n", "1"]
TINY = ["--steps", "1", "sampling.num_prompts_per_step=1", "sampling.num_images_per_prompt=2",
        "training.micro_batch_size=2", "experiment.eval_every=0"]


def _unwritable() -> Path | None:
    """A folder where even root cannot create a file (a read-only /sys or /proc), if this machine has one."""
    for p in ("/sys", "/proc"):
        try:
            fd, name = tempfile.mkstemp(dir=p)
        except OSError:
            return Path(p)
        os.close(fd)
        os.unlink(name)
    return None


UNWRITABLE = _unwritable()

shipped = pytest.mark.skipif(not (SHIPPED_MODEL / "model_index.json").is_file(),
                             reason="the shipped tiny-world model is not built")


def run(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    return code, [ln for ln in lines if ln.strip() and "%|" not in ln]  # progress bars are not messages


def refused(capsys, *args) -> str:
    """The one stderr line of a command that must exit 2."""
    code, err = run(capsys, *args)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def no_work(monkeypatch):
    """Make any model load, pretraining build or prompt generation fail loudly: refusals come before work."""
    from udm_grpo.data import geneval_prompts
    from udm_grpo.models.pipeline import URSAPipeline

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(URSAPipeline, "from_pretrained", classmethod(boom))
    monkeypatch.setattr("udm_grpo.tinyworld.build_pipeline", boom)
    monkeypatch.setattr(geneval_prompts, "generate", boom)


def make_run(folder: Path) -> Path:
    """A run folder in our layout with one checkpoint (the shipped transformer), without training."""
    step = folder / "checkpoints" / "step-000001"
    shutil.copytree(SHIPPED_MODEL / "transformer", step / "transformer")
    (step / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (folder / "checkpoints" / "latest").write_text("step-000001")
    (folder / "config.yaml").write_text("training:\n  max_steps: 1\n")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. data loss ---------------------------------------------------------------------------------------
@shipped
@pytest.mark.parametrize("where, relation", [(".", "is"), ("checkpoints", "lies inside"), ("..", "contains")])
def test_export_never_writes_over_its_own_source(tmp_path, capsys, where, relation):
    run_dir = make_run(tmp_path / "run1")
    before = tree(run_dir)
    out = (run_dir / where).resolve()
    line = refused(capsys, "export", "--checkpoint", run_dir, "-o", out, "--force")
    assert f"-o {out} {relation}" in line and "reads" in line
    assert tree(run_dir) == before


@shipped
def test_sample_and_eval_shapes_refuse_to_replace_results_without_force(tmp_path, capsys):
    png = tmp_path / "s.png"
    png.write_bytes(b"mine")
    line = refused(capsys, "sample", "a photo of a circle", *FAST, "-o", png)
    assert f"-o {png} already exists" in line and "--force" in line and png.read_bytes() == b"mine"
    meta = tmp_path / "m.jsonl"
    write_metadata_jsonl(generate_records("test")[:1], meta)
    ev = tmp_path / "ev"
    assert run(capsys, "eval", "shapes", "--metadata", meta, *FAST, "-o", ev)[0] == 0
    first = (ev / "results.json").read_bytes()
    assert run(capsys, "eval", "shapes", "--metadata", meta, *FAST, "-o", ev)[0] == 0  # the same evaluation again
    assert (ev / "results.json").read_bytes() == first
    line = refused(capsys, "eval", "shapes", "--metadata", meta, *FAST, "--seed", "1", "-o", ev)
    assert "records another evaluation (seed 0, now 1)" in line and (ev / "results.json").read_bytes() == first
    (ev / "notes.txt").write_text("mine")
    assert run(capsys, "eval", "shapes", "--metadata", meta, *FAST, "-o", ev)[0] == 0
    assert (ev / "notes.txt").exists()  # a repeat touches only its own files
    assert run(capsys, "eval", "shapes", "--metadata", meta, *FAST, "--seed", "1", "-o", ev, "--force")[0] == 0
    assert json.loads((ev / "results.json").read_text())["seed"] == 1


HOLDER = ("import sys, time; from udm_grpo.outputs import FolderLock; FolderLock(sys.argv[1]).acquire(); "
          "print('locked', flush=True); time.sleep(120)")


def hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@shipped
def test_a_run_folder_in_use_is_refused_and_a_killed_holder_does_not_block(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "-o", run_dir, *TINY)[0] == 0
    before = tree(run_dir)
    holder = hold_lock(run_dir)
    try:
        line = refused(capsys, "train", "-o", run_dir, "--resume", "latest", *TINY, "--steps", "2")
        assert line.endswith(f"run folder {run_dir} is in use by process {holder.pid}; wait for it to finish or "
                             "stop it first.")
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            FolderLock(run_dir).acquire()  # the trainer's own acquisition, not only the command's early check
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9 leaves its lock file behind
        holder.wait()
    assert tree(run_dir) == {**before, LOCK_NAME: f"{holder.pid}\n".encode()}
    assert run(capsys, "train", "-o", run_dir, "--resume", "latest", *TINY, "--steps", "2")[0] == 0
    assert (run_dir / "checkpoints" / "step-000002").is_dir() and not (run_dir / LOCK_NAME).exists()
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_folder_lock_is_reentrant_and_removes_its_file(tmp_path):
    folder = tmp_path / "new"
    with FolderLock(folder) as outer:
        assert outer.created and int((folder / LOCK_NAME).read_text()) == os.getpid()
        with FolderLock(folder):
            pass
        assert (folder / LOCK_NAME).exists()  # still held by the outer block
    assert not (folder / LOCK_NAME).exists() and folder.is_dir()


# ---- 2. outputs that cannot be written: every command with -o, checked before any work -------------------
def output_commands() -> dict[str, str]:
    """'command [action]' -> 'file' or 'folder', for every subcommand that has an -o/--output option."""
    found = {}

    def walk(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}".strip())
            elif action.dest == "output":
                found[name] = "file" if re.search(r"\b(file|PNG)\b", action.help or "") else "folder"

    walk(build_parser(), "")
    return found


def command_args(tmp_path: Path) -> dict[str, list]:
    meta = tmp_path / "m.jsonl"
    write_metadata_jsonl(generate_records("test")[:1], meta)
    quoted = tmp_path / "q.txt"
    quoted.write_text('a sign that says "open"\n')
    return {
        "train": ["train", *TINY],
        "ablate": ["ablate", "--steps", "1"],
        "compare": ["compare", "--steps", "1", "--variant", "a"],
        "pretrain": ["pretrain", "steps=1"],
        "sample": ["sample", "a photo of a circle", *FAST],
        "export": ["export", "--checkpoint", make_run(tmp_path / "run")],
        "eval shapes": ["eval", "shapes", "--metadata", meta, *FAST],
        "eval geneval": ["eval", "geneval", "--metadata", meta, "--reward", "shapeeval", *FAST],
        "eval pickscore": ["eval", "pickscore", "--prompts", quoted, *FAST],
        "eval ocr": ["eval", "ocr", "--prompts", quoted, *FAST],
        "data geneval": ["data", "geneval", "-n", "10"],
    }


def test_the_output_table_covers_every_command_that_writes(tmp_path):
    assert set(output_commands()) == set(command_args(tmp_path))


@shipped
@pytest.mark.parametrize("command", sorted(output_commands()))
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    kind = output_commands()[command]
    args = command_args(tmp_path)[command]
    no_work(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    under = blocker / "out"
    assert f"{under} lies under {blocker}, which is a file" in refused(capsys, *args, "-o", under)
    wrong = blocker if kind == "folder" else tmp_path
    wrong_line = refused(capsys, *args, "-o", wrong)
    assert str(wrong) in wrong_line and ("is a file, not a folder" if kind == "folder" else "is a folder") in wrong_line
    if UNWRITABLE is not None:
        line = refused(capsys, *args, "-o", UNWRITABLE / "out")
        assert "cannot be written" in line and str(UNWRITABLE / "out") in line
    assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/*.partial"))


def test_commands_write_only_through_the_output_gate():
    """No module of udm_grpo/commands writes a file itself; the writers it calls go through `udm_grpo.outputs`."""
    raw = re.compile(r"\.write_text\(|\.write_bytes\(|\.mkdir\(|shutil\.(rmtree|copy|move)|savefig\(|\.open\(|\bopen\("
                     r"|\.save\(|\.unlink\(|\.rename\(|os\.replace\(")
    for path in sorted((ROOT / "udm_grpo" / "commands").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not raw.search(line), f"{path.name}:{n} writes without udm_grpo.outputs: {line.strip()}"


# ---- 3. nothing half-written ----------------------------------------------------------------------------
def test_a_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    folder = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_folder(folder) as partial:
        (partial / "weights").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_folder(folder) as partial:
        (partial / "weights").write_text("whole")
    with atomic_folder(folder) as partial:  # replacing: the old folder goes only when the new one is complete
        (partial / "weights").write_text("newer")
    assert (folder / "weights").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model", "out.txt"]


@shipped
def test_sample_into_a_folder_and_export_onto_a_file_leave_no_temporaries(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_dir").mkdir()
    assert "is a folder" in refused(capsys, "sample", "a photo of a circle", *FAST, "-o", tmp_path / "a_dir")
    (tmp_path / "a_file").write_text("x")
    run_dir = make_run(tmp_path / "run")
    assert "is a file" in refused(capsys, "export", "--checkpoint", run_dir, "-o", tmp_path / "a_file", "--force")
    from PIL import Image

    def full(self, fp, *a, **k):
        Path(fp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)  # the write itself fails after the work
    line = refused(capsys, "sample", "a photo of a circle", *FAST, "-o", tmp_path / "s.png")
    assert "s.png could not be written (No space left on device)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file", "run"]


# ---- 4. text files: one reader for every file a user names ----------------------------------------------
def text_inputs(tmp_path: Path) -> dict[str, list]:
    png = tmp_path / "img.png"
    return {  # the first three are the probe's; the others are not listed in the issue
        "sample --prompts-file": ["sample", *FAST, "--prompts-file", "{F}"],
        "eval shapes --metadata": ["eval", "shapes", *FAST, "--metadata", "{F}"],
        "serve-reward --token-file": ["serve-reward", "--reward", "shapeeval", "--token-file", "{F}"],
        "train --config": ["train", "--check", "--config", "{F}"],
        "train data.train": ["train", "--check", "data.train={F}"],
        "data check": ["data", "check", "{F}", "--task", "pickscore"],
        "data geneval --exclude": ["data", "geneval", "-n", "5", "-o", tmp_path / "g.jsonl", "--exclude", "{F}"],
        "score --prompts-file": ["score", png, "--reward", "shapeeval", "--prompts-file", "{F}"],
        "eval geneval --metadata": ["eval", "geneval", "--reward", "shapeeval", *FAST, "--metadata", "{F}"],
    }


@pytest.mark.parametrize("name", sorted(text_inputs(Path("/tmp"))))
def test_binary_folder_and_device_inputs_are_one_sentence(tmp_path, capsys, monkeypatch, name):
    no_work(monkeypatch)
    binary = tmp_path / "bad.txt"
    binary.write_bytes(json.dumps(generate_records("test")[0]).encode() + b"\n\xff\xfe\x00 not text\n")
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    args = text_inputs(tmp_path)[name]
    for path, needle in ((binary, f"{binary}:2: not UTF-8 text."), (folder, f"{folder} is a folder, not a file."),
                         (Path(os.devnull), f"{os.devnull} is not a regular file")):
        line = refused(capsys, *[str(a).replace("{F}", str(path)) for a in args])
        assert needle in line, (name, line)


# ---- 6. --check runs what a start runs; a failed start leaves the folder as found --------------------------
@shipped
@pytest.mark.parametrize("override, needle", [("sampling.rollout.height=63", "sampling.rollout.height"),
                                              ("data.train={prompts}", "needs GenEval-schema metadata records")])
def test_check_refuses_what_training_refuses(tmp_path, capsys, override, needle):
    prompts = tmp_path / "a.txt"
    prompts.write_text("a photo of a circle\n")
    override = override.format(prompts=prompts)
    assert needle in refused(capsys, "train", "--check", *TINY, override)
    assert needle in refused(capsys, "train", "-o", tmp_path / "run", *TINY, override)
    assert not (tmp_path / "run").exists()


def test_check_and_start_share_one_check(tmp_path, capsys, monkeypatch):
    from udm_grpo.grpo import preflight

    def sentinel(*a, **k):
        raise UserError("the one start check ran.")

    monkeypatch.setattr(preflight, "check_start", sentinel)
    monkeypatch.setattr("udm_grpo.grpo.trainer.check_start", sentinel)
    assert "the one start check ran" in refused(capsys, "train", "--check")
    assert "the one start check ran" in refused(capsys, "train", "-o", tmp_path / "run")


@shipped
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_start_leaves_the_run_folder_as_found(tmp_path, capsys, existing):
    """A start that fails at its first step (an unreachable reward service) is retried without --force."""
    token = tmp_path / "token"
    token.write_text("t" * 32)
    run_dir = tmp_path / "run"
    if existing:
        run_dir.mkdir()
    remote = ["reward.name=remote", f"reward.params={{url: 'http://127.0.0.1:9', token_file: '{token}', "
              "retries: 0, timeout: 5}"]
    for _ in range(2):
        line = refused(capsys, "train", "-o", run_dir, *TINY, *remote)
        assert "cannot be reached" in line
        assert (list(run_dir.iterdir()) == []) if existing else not run_dir.exists()


# ---- 8. smaller ones --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["eval", "shapes", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["sample", "x", "--guidance", "nan"], "argument --guidance: expected a finite guidance scale >= 1"),
    (["sample", "x", "--guidance", "inf"], "argument --guidance"),
    (["serve-reward", "--reward", "shapeeval", "--token-file", "t", "--max-batch", "0"], "argument --max-batch"),
    (["data", "geneval", "-o", "x.jsonl", "-n", "999999999999"], "-n 999,999,999,999 is over the 10,000,000"),
    (["train", "--processes", "2"], "--processes only plans a --check"),
    (["train", "--print-template", "--resume", "latest"], "--print-template prints a config and exits"),
    (["pretrain", "--rescore", "-o", "/nonexistent/model"], "/nonexistent/model"),
])
def test_small_inputs_are_one_sentence(capsys, monkeypatch, args, needle):
    no_work(monkeypatch)
    start = time.perf_counter()
    assert needle in refused(capsys, *args)
    assert time.perf_counter() - start < 30  # no hang


def test_every_numeric_flag_is_validated():
    """No option parses with a bare int/float: each goes through a type that refuses NaN, inf and out-of-range."""
    bare = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}")
            elif action.type in (int, float) and action.dest != "port":
                bare.append(f"{name} {action.option_strings}")

    walk(build_parser(), "udm-grpo")
    assert bare == []


def test_print_template_shows_overrides(capsys):
    assert main(["train", "--print-template", "training.lr=0.25"]) == 0
    assert re.search(r"^\s+lr: 0\.25\b", capsys.readouterr().out, re.M)


def test_check_says_when_the_estimate_fits_no_gpu(tmp_path, capsys):
    from .test_pipeline import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "big")
    config = tmp_path / "big" / "transformer" / "config.json"
    cfg = json.loads(config.read_text())
    cfg.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=400, head_dim=128,
               num_attention_heads=128, num_key_value_heads=8)
    config.write_text(json.dumps(cfg))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\n")
    args = ["train", "--check", f"model.path={tmp_path / 'big'}", "reward.name=clipscore", f"data.train={prompts}",
            f"data.test={prompts}", "sampling.rollout.height=16", "sampling.rollout.width=16"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "check failed" in out and "fits no GPU" in out and "check passed" not in out


def test_check_output_names_the_source_relation(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    with pytest.raises(UserError, match="lies inside"):
        check_output(src / "x", "folder", sources=[src])
    check_output(tmp_path / "elsewhere", "folder", sources=[src, None])
