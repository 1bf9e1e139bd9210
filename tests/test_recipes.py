"""The paper's recipes (udm_grpo/configs/recipes/*_ursa_1.7b.yaml), the accelerate configs, `train --check`
(layout, plan, memory estimate) and the memory model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from udm_grpo.cli import main
from udm_grpo.config import load_config
from udm_grpo.grpo.batching import plan_from_config
from udm_grpo.grpo.engine import engine_spec, world_layout
from udm_grpo.grpo.memory import Shape, estimate
from udm_grpo.models.transformer import URSAConfig

from .test_pipeline import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"geneval": 8, "pickscore": 16, "ocr": 16}  # task -> group size G of the paper
DEFAULT = ROOT / "udm_grpo" / "configs" / "tiny_world_grpo.yaml"
RECIPE_DIR = ROOT / "udm_grpo" / "configs" / "recipes"
ACCELERATE_DIR = ROOT / "udm_grpo" / "configs" / "accelerate"


@pytest.mark.parametrize("task", RECIPES)
def test_recipes_hold_the_papers_settings_and_split_over_8_and_32_gpus(task):
    cfg = load_config([DEFAULT, RECIPE_DIR / f"{task}_ursa_1.7b.yaml"])  # layered as `train --config`
    s, t = cfg.sampling, cfg.training
    assert (s.num_prompts_per_step, s.num_images_per_prompt) == (16, RECIPES[task])
    r = s.rollout
    assert (r.num_inference_steps, r.guidance_scale, s.train_steps, s.train_start) == (10, 1.0, 3, [0, 3])
    assert s.forward_process and s.clean_response and (s.rollout.height, s.rollout.width) == (512, 512)
    assert not s.dynamic_sampling  # the paper trains every group; the tiny world's dynamic sampling does not leak in
    assert (t.lr, t.betas, t.weight_decay, cfg.reward.kl_beta, t.lr_warmup_steps) == (1e-6, [0.9, 0.95], 0.01, 0.05, 0)
    assert (cfg.model.dtype, t.mixed_precision, cfg.model.gradient_checkpointing) == ("bfloat16", "bf16", 1)
    assert cfg.reward.name == task and cfg.model.path == "BAAI/URSA-1.7B-IBQ512"
    assert cfg.reward.params == {}  # the tiny world's ShapeEval parameters do not leak into the recipe
    for gpus in (8, 32):
        plan = plan_from_config(cfg, gpus)
        assert plan.images_per_process * gpus == 16 * RECIPES[task]
        assert plan.pairs_per_update == 16 * RECIPES[task] * 3
    assert plan_from_config(cfg, 32).grad_accum_steps == 3  # the reference's 32-GPU layout
    text = (RECIPE_DIR / f"{task}_ursa_1.7b.yaml").read_text()
    assert f"{16 * RECIPES[task]} / 8" in text and f"{16 * RECIPES[task]} / 32" in text  # the arithmetic is shown


@pytest.mark.parametrize("name, kind, stage", [("ddp", "ddp", 2), ("deepspeed_zero2", "deepspeed", 2),
                                               ("deepspeed_zero3", "deepspeed", 3), ("fsdp", "fsdp", 2)])
def test_accelerate_configs_select_their_engine(name, kind, stage):
    data = yaml.safe_load((ACCELERATE_DIR / f"{name}.yaml").read_text())
    env = {}  # what `accelerate launch` exports for these distributed types
    if data["distributed_type"] == "DEEPSPEED":
        env = {"ACCELERATE_USE_DEEPSPEED": "true",
               "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(data["deepspeed_config"]["zero_stage"])}
        assert data["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    elif data["distributed_type"] == "FSDP":
        env = {"ACCELERATE_USE_FSDP": "true"}
    assert engine_spec("auto", None, env) == engine_spec(kind, stage if kind == "deepspeed" else None, {})
    assert "main_process_ip" not in data and "main_process_port" not in data  # from the command line


def test_accelerate_launch_exports_the_engine_to_train():
    """The real launcher with the ZeRO-3 config: both processes see DeepSpeed ZeRO-3; only rank 0 reports."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE_DIR / "deepspeed_zero3.yaml"), "--num_processes", "2",
           "-m", "udm_grpo", "train", "--check", "training.micro_batch_size=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("2 process(es) on 1 machine(s) x 2; engine DeepSpeed ZeRO-3") == 1, done.stdout
    assert "16 per process" in done.stdout and "check passed" in done.stdout  # 4 prompts x 8 images over 2


def test_train_check_plans_for_a_process_count_and_estimates_memory(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\na blue square\n")
    args = ["train", "--check", "--processes", "4", f"model.path={tmp_path / 'model'}", "reward.name=clipscore",
            f"data.train={prompts}", f"data.test={prompts}", "sampling.rollout.height=16",
            "sampling.rollout.width=16", "training.micro_batch_size=4", "training.engine=fsdp"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 processes; engine FSDP2" in out and "8 per process" in out  # 4 prompts x 8 images over 4
    assert "memory per GPU" in out and "AdamW moments" in out and "check passed" in out
    assert main(args[:3] + ["0"] + args[4:]) == 2
    assert "--processes" in capsys.readouterr().err


def test_world_layout_reads_the_launcher_environment():
    spec = engine_spec("deepspeed", 2, {})
    env = {"LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "3"}
    expected = "32 process(es) on 4 machine(s) x 8, this is machine 3; engine DeepSpeed ZeRO-2"
    assert world_layout(32, spec, env) == expected
    assert world_layout(1, spec, {}) == "1 process(es) on 1 machine(s) x 1; engine DeepSpeed ZeRO-2"
    with pytest.raises(Exception, match="training.engine"):
        engine_spec("megatron", None, {})


def test_memory_model_counts_parameters_and_shards_as_documented():
    cfg = URSAConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=3, head_dim=16, vocab_size=1000 + 512, lm_vocab_size=1000, lm_head_size=512,
                     bov_token_id=999)
    s = Shape.from_config(cfg)
    d, i, hd = 64, 96, 16
    per_layer = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 3 * d * i + 2 * d + 2 * hd  # q, kv, o, MLP, norms
    assert s.params == 1512 * d + 3 * per_layer + d + 512 * d  # embeddings, blocks, final norm, image head
    kw = dict(bf16=True, reference=True, level=1, micro_batch=4, rollout_batch=16, text_tokens=320,
              image_tokens=1024, guidance=False)
    ddp8, ddp32 = (estimate(s, "ddp", 2, w, **kw) for w in (8, 32))
    z3_8, z3_32 = (estimate(s, "deepspeed", 3, w, **kw) for w in (8, 32))
    assert ddp8["optimizer"] == ddp32["optimizer"] == pytest.approx(8 * s.params / 1024**3)
    assert z3_8["optimizer"] == pytest.approx(4 * z3_32["optimizer"])
    z2_8 = estimate(s, "deepspeed", 2, 8, **kw)  # at this toy shape DeepSpeed's fixed 5e8-element bucket dominates
    assert z3_32["total"] < z3_8["total"] and z2_8["optimizer"] + z2_8["masters"] < ddp8["optimizer"] / 4
    key = "training activations (one micro-batch)"
    levels = [estimate(s, "ddp", 2, 8, **{**kw, "level": k})[key] for k in range(4)]
    assert levels == sorted(levels, reverse=True) and levels[0] > levels[3]


@pytest.mark.parametrize("engine, stage", [("ddp", None), ("deepspeed", 2)])  # float32 / bf16 module
def test_memory_estimate_agrees_with_the_simulation(tmp_path, engine, stage):
    """`estimate` (formulas) within 10% of `simulate_iteration` (fake tensors) at a mid shape (57M parameters,
    K = 4,096, 16 x 16 tokens) with bf16, checkpointing level 1 and the frozen reference: in total and in the
    training step's transient bytes (activations, logits, temporaries)."""
    from udm_grpo.grpo.simulate import simulate_iteration
    from udm_grpo.recipes import run_config
    from udm_grpo.tinyworld import SHIPPED_MODEL

    from .test_simulate import MID

    for sub in ("transformer", "vae"):
        (tmp_path / sub).mkdir()
    data = {**json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text()), **MID}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(data))
    vae = {**json.loads((SHIPPED_MODEL / "vae" / "config.json").read_text()), "num_vq_embeddings": 4096}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vae))
    index = json.loads((SHIPPED_MODEL / "model_index.json").read_text())
    cfg = run_config(overrides=[f"model.path={tmp_path}", "model.dtype=bfloat16", "training.mixed_precision=bf16",
                                "model.gradient_checkpointing=1", "sampling.num_prompts_per_step=2",
                                "sampling.num_images_per_prompt=8", "training.micro_batch_size=8",
                                "sampling.rollout.height=128", "sampling.rollout.width=128",
                                f"training.engine={engine}"])
    plan, spec = plan_from_config(cfg, 2), engine_spec(engine, stage, {})
    sim = simulate_iteration(cfg, tmp_path, index, plan, spec)
    gib = estimate(Shape.from_config(URSAConfig.from_dict(data)), spec.kind, spec.zero_stage, 2, True, True, 1,
                   plan.micro_batch_size, plan.images_per_process, index["_max_prompt_length"], 16 * 16, False)
    assert gib["total"] == pytest.approx(sim["peak_bytes"]["total"] / 1024**3, rel=0.1)
    step = sim["phases"]["training step"]["peak_bytes"]
    measured = sum(step.get(k, 0) for k in ("activations", "temporaries", "buffers")) / 1024**3
    formula = gib["training activations (one micro-batch)"] + gib["training logits and temporaries"]
    assert formula == pytest.approx(measured, rel=0.1)


def test_checkpoint_records_the_engine(tmp_path):
    """The trainer's state file names the engine that wrote it (checkpoints are engine-independent)."""
    from .test_trainer import make_config, trainer

    tr = trainer(make_config(tmp_path, **{"training.max_steps": 1, "experiment.save_every": 1}))
    tr.train()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["engine"] == "DDP" and state["world_size"] == 1


def test_slurm_script_derives_the_layout_from_the_allocation(tmp_path):
    """docs/slurm/udm_grpo.sbatch with srun / scontrol / accelerate replaced by shims that print."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
             "scontrol": "printf 'gpu-node-07\\ngpu-node-08\\n'",
             "accelerate": 'echo "accelerate $*"'}
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", UDM_GRPO=str(bin_dir), SLURM_JOB_ID="123456",
               SLURM_NNODES="4", SLURM_NODEID="2", SLURM_JOB_NODELIST="gpu-node-[07-10]", RUN=str(tmp_path / "run"))
    script = ROOT / "docs" / "slurm" / "udm_grpo.sbatch"

    def launch_line():
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return next(ln for ln in done.stdout.splitlines() if ln.startswith("accelerate "))

    line = launch_line()
    port = 20000 + 123456 % 20000
    assert (f"--num_machines 4 --num_processes 32 --machine_rank 2 --main_process_ip gpu-node-07 "
            f"--main_process_port {port}") in line and 1024 < port < 65536
    assert "geneval_ursa_1.7b" in line and "deepspeed_zero2.yaml" in line and "--resume" not in line
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000100")
    assert launch_line().endswith("--resume latest")


def test_checkpoint_alone_evaluates_on_the_runs_model(tmp_path):
    """`--checkpoint RUN` without `--model` uses the run's model.path (here a tiny pipeline that the shipped
    tiny-world model could not host: its transformer would fail the pipeline's invariants)."""
    from udm_grpo.pipelines import load_pipeline, run_model

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    pipe.transformer.save_pretrained(run / "checkpoints" / "step-000001" / "transformer")
    (run / "checkpoints" / "step-000001" / "trainer_state.json").write_text('{"step": 1}')
    (run / "checkpoints" / "latest").write_text("step-000001")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "model")}}))
    assert run_model(str(run)) == run_model(str(run / "checkpoints" / "step-000001")) == str(tmp_path / "model")
    loaded = load_pipeline(None, "cpu", str(run))
    assert loaded.transformer.config.lm_head_size == pipe.transformer.config.lm_head_size
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": None}}))
    assert run_model(str(run)) is None
