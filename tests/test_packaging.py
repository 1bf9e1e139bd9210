"""The package as users install it: every runtime import is a declared dependency; the packaged recipes resolve
by name; the built wheel, installed with its core dependencies only into a fresh virtual environment, trains
one step from an empty folder outside the repository and finds its recipes and launch configs."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from udm_grpo.cli import main
from udm_grpo.config import load_config
from udm_grpo.errors import UserError
from udm_grpo.recipes import CONFIGS, list_recipes, resolve_config_path
from udm_grpo.tinyworld import TinyWorldConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "udm_grpo"
TRAIN_RECIPES = {"geneval_ursa_1.7b", "pickscore_ursa_1.7b", "ocr_ursa_1.7b"}
ACCELERATE = {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}
# imports that no requirement can declare, and why
UNDECLARED = {"mmdet": "detector_backend 'mmdet' needs mmdetection 3.x with a matching mmcv build (README)"}
TIMEOUT = 1800  # s for the wheel's install (about 45 s here with the local package indexes)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalise(re.split(r"[\s<>=!~;\[(]", spec.strip(), maxsplit=1)[0])


def third_party_imports() -> dict[str, str]:
    """Top-level module -> first file importing it, for every absolute non-stdlib import in the package."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("udm_grpo", "__future__"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(s) for s in project["dependencies"]}
    extras = {requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}
    distributions = importlib.metadata.packages_distributions()  # installed module -> its distributions
    missing = []
    for module, where in third_party_imports().items():
        if module in UNDECLARED:
            continue
        names = {normalise(d) for d in distributions.get(module, [module])}
        if not names & (core | extras):
            missing.append(f"{module} ({where}; distribution {', '.join(sorted(names))})")
    assert not missing, f"imported but declared in no dependency list of pyproject.toml: {missing}"
    for module in ("scipy", "yaml", "huggingface_hub", "numpy", "PIL"):  # imported by the default training run
        assert {normalise(d) for d in distributions[module]} & core, module


def test_recipes_are_packaged_and_resolve_by_name(tmp_path, monkeypatch):
    assert set(list_recipes()) == TRAIN_RECIPES
    assert set(list_recipes("pretrain")) == {"tiny_world_pretrain"}
    assert set(list_recipes("accelerate")) == ACCELERATE
    assert all(p.is_relative_to(CONFIGS) for kind in ("recipes", "pretrain", "accelerate")
               for p in list_recipes(kind).values())
    geneval = str(CONFIGS / "recipes" / "geneval_ursa_1.7b.yaml")
    assert resolve_config_path("geneval_ursa_1.7b") == resolve_config_path("geneval_ursa_1.7b.yaml") == geneval
    pretrain = resolve_config_path("tiny_world_pretrain", "pretrain")
    assert pretrain == str(CONFIGS / "pretrain" / "tiny_world_pretrain.yaml")
    assert load_config(pretrain, schema=TinyWorldConfig).seed == 0
    assert load_config(resolve_config_path("ocr_ursa_1.7b")).reward.name == "ocr"
    for value in (None, "", "/nonexistent.yaml", "runs/my.yaml", "./geneval_ursa_1.7b"):  # paths stay paths
        assert resolve_config_path(value) == value
    monkeypatch.chdir(tmp_path)
    (tmp_path / "geneval_ursa_1.7b").write_text("training:\n  lr: 1.0e-5\n")
    assert resolve_config_path("geneval_ursa_1.7b") == "geneval_ursa_1.7b"  # an existing file wins
    with pytest.raises(UserError, match=r"--config my_run.yaml: no such file.*geneval_ursa_1\.7b, ocr_ursa_1\.7b"):
        resolve_config_path("my_run.yaml")
    with pytest.raises(UserError, match="--config tiny_world_pretrain: no such file"):  # not a run recipe
        resolve_config_path("tiny_world_pretrain")


@pytest.mark.parametrize("command", ["train", "ablate", "pretrain"])
def test_config_option_names_the_recipes(command, capsys):
    assert main([command, "--config", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    expected = "tiny_world_pretrain" if command == "pretrain" else "geneval_ursa_1.7b, ocr_ursa_1.7b, pickscore"
    assert err.count("\n") == 0 and "--config nope: no such file" in err and expected in err, err
    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "packaged recipe: " + ("tiny_world_pretrain" if command == "pretrain" else
                                  "geneval_ursa_1.7b, ocr_ursa_1.7b, pickscore_ursa_1.7b") in help_text


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that could lead the fresh venv back to this checkout or its venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run_ok(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh venv holding the built wheel with its core dependencies, environment, base folder);
    the venv (with torch, about 1 GB) is deleted afterwards."""
    base = tmp_path_factory.mktemp("packaging")
    try:
        src = base / "src"  # the sources alone: the build writes nothing into the checkout
        shutil.copytree(PACKAGE, src / "udm_grpo", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        env = clean_env(PIP_CONSTRAINT=str(ROOT / "constraints.txt"))  # the CPU torch, never a CUDA build
        run_ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "wheel", src], env=env,
               timeout=600)
        (wheel,) = (base / "wheel").glob("udm_grpo-*.whl")
        run_ok([sys.executable, "-m", "venv", base / "venv"], env=env, timeout=300)
        bin_dir = base / "venv" / ("Scripts" if os.name == "nt" else "bin")
        run_ok([bin_dir / "python", "-m", "pip", "install", "-q", wheel], env=env, timeout=TIMEOUT)
        (base / "work").mkdir()  # an empty folder outside the repository
        yield bin_dir, clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(base / "hf"),
                                 WANDB_MODE="offline", MPLCONFIGDIR=str(base / "mpl")), base / "work"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_wheel_imports_every_module_from_the_venv(installed):
    bin_dir, env, work = installed
    code = ("import importlib, pkgutil, udm_grpo\n"
            "names = [m.name for m in pkgutil.walk_packages(udm_grpo.__path__, 'udm_grpo.') "
            "if not m.name.endswith('__main__')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "print(len(names), udm_grpo.__file__)")
    count, location = run_ok([bin_dir / "python", "-c", code], cwd=work, env=env, timeout=300).stdout.split()
    assert int(count) > 40 and Path(location).is_relative_to(bin_dir.parent), location
    listing = run_ok([bin_dir / "python", "-m", "udm_grpo.recipes"], cwd=work, env=env, timeout=120).stdout
    for key in [f"recipes/{n}" for n in TRAIN_RECIPES] + [f"accelerate/{n}" for n in ACCELERATE]:
        line = next(ln for ln in listing.splitlines() if ln.startswith(key + " "))
        assert Path(line.split()[-1]).is_file() and Path(line.split()[-1]).is_relative_to(bin_dir.parent), line


def test_wheel_trains_one_step_outside_the_repository(installed):
    bin_dir, env, work = installed
    run_ok([bin_dir / "udm-grpo", "train", "-o", "run", "--steps", "1", "sampling.num_prompts_per_step=1",
            "sampling.num_images_per_prompt=2", "training.micro_batch_size=2", "experiment.eval_every=0"],
           cwd=work, env=env, timeout=900)
    assert (work / "run" / "checkpoints" / "step-000001").is_dir()
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == "step-000001"


def test_wheel_finds_the_packaged_recipe(installed):
    """`--config NAME --check` loads the recipe, then stops at its model (not on the hub cache, offline)."""
    bin_dir, env, work = installed
    done = subprocess.run([str(bin_dir / "udm-grpo"), "train", "--config", "geneval_ursa_1.7b", "--check"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "BAAI/URSA-1.7B-IBQ512" in done.stderr and "--config" not in done.stderr, done.stderr
