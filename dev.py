#!/usr/bin/env python3
"""The two quick-start commands. Needs only Python 3.10+; everything else goes into ./.venv.

    python3 dev.py run  [ARGS...]   set up, then `udm-grpo train ARGS` on the tiny world
    python3 dev.py test [ARGS...]   set up, then `ruff check` and `pytest ARGS`
    python3 dev.py COMMAND [ARGS...]  set up, then any other `udm-grpo COMMAND ARGS`
                                    (e.g. `python3 dev.py eval shapes --per-tag 64`)

The commands are also in the environment: `.venv/bin/udm-grpo ...`, or `source .venv/bin/activate`
and then `udm-grpo ...`. Set-up is skipped when pyproject.toml and constraints.txt have not changed
since the last one. `constraints.txt` keeps pip on the CPU build of torch; set UDM_GRPO_CONSTRAINTS to
another file (or to an empty string) to install a different torch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
EXTRAS = "dev,ocr,serve,deepspeed"  # test tools, the OCR engine (models in its wheel), the reward service, DeepSpeed


def setup() -> None:
    constraints = os.environ.get("UDM_GRPO_CONSTRAINTS", str(ROOT / "constraints.txt"))
    stamp_src = (ROOT / "pyproject.toml").read_bytes() + (Path(constraints).read_bytes() if constraints else b"") \
        + EXTRAS.encode()
    stamp = VENV / f".installed-{hashlib.sha256(stamp_src).hexdigest()[:16]}"
    if stamp.exists():
        return
    if not PY.exists():
        print("udm-grpo: creating .venv", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if constraints:
        env["PIP_CONSTRAINT"] = constraints  # also reaches build environments
    print("udm-grpo: installing the project and its test tools into .venv", flush=True)
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{EXTRAS}]"], env=env)
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    setup()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    if argv[0] == "run":
        return subprocess.call([str(BIN / "udm-grpo"), "train", *argv[1:]], env=env)
    if argv[0] != "test":
        return subprocess.call([str(BIN / "udm-grpo"), *argv], env=env)
    rc = subprocess.call([str(BIN / "ruff"), "check", "."], cwd=ROOT, env=env)
    if rc:
        return rc
    return subprocess.call([str(PY), "-m", "pytest", *argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
