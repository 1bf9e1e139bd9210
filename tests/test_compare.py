"""`udm-grpo compare` (and `comparison`): real tiny runs of variants x seeds, the table read back from the runs'
eval.jsonl, resumption that trains only what is missing, and the refusals (changed manifest, bad names)."""

import json
import math
import re
import shutil

import pytest
from scipy.stats import t

from udm_grpo.cli import main
from udm_grpo.commands.comparison import Variant, collect, run_comparison
from udm_grpo.errors import UserError

from .test_trainer import trainer


def overrides(tmp_path) -> list[str]:
    """A run of seconds: the tiny test pipeline (injected), 2 prompts x 2 images, 16 px, 2 held-out prompts."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\na blue square\nred square\nblue circle\n")
    return [f"data.train={prompts}", f"data.test={prompts}", "experiment.eval_every=1", "experiment.save_every=1",
            "experiment.log_every=1", "experiment.eval_images_per_tag=null", "experiment.num_eval_prompts=2",
            "experiment.eval_num_inference_steps=2", "sampling.rollout.height=16", "sampling.rollout.width=16",
            "sampling.num_prompts_per_step=2", "sampling.num_images_per_prompt=2", "sampling.train_steps=1",
            "sampling.train_start=[0,2]", "sampling.rollout.num_inference_steps=3", "model.dtype=float32",
            "training.mixed_precision=no", "model.gradient_checkpointing=0", "training.micro_batch_size=4",
            "training.lr=3e-3", "training.lr_warmup_steps=0"]


class Counting:
    """make_trainer that counts the trainers it builds."""

    def __init__(self):
        self.built = []

    def __call__(self, cfg):
        self.built.append(cfg.experiment.output_dir)
        return trainer(cfg)


VARIANTS = [Variant("base"), Variant("hot", None, ("training.lr=3e-2",))]


def evals(folder) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (folder / "eval.jsonl").read_text().splitlines())}


def test_two_variants_two_seeds_table_from_the_runs_then_resume_only_what_is_missing(tmp_path, capsys):
    out, count = tmp_path / "cmp", Counting()
    result = run_comparison(None, overrides(tmp_path), VARIANTS, out, 2, [0, 1], make_trainer=count)
    assert len(count.built) == 4 and not result["interrupted"]
    folders = [out / v / f"seed-{s}" for v in ("base", "hot") for s in (0, 1)]
    assert all((f / "checkpoints" / "step-000002").is_dir() for f in folders)
    key = result["metric"]
    assert key == "eval/reward"  # the toy reward logs no strict value: the documented fallback
    table = (out / "compare.md").read_text()
    gains = {}
    for f, row in zip(folders, result["runs"]):
        e = evals(f)
        assert sorted(e) == [0, 1, 2]
        before, after = e[0][key], e[2][key]
        gains.setdefault(f.parent.name, []).append(after - before)
        assert row["before"] == before and row["after"] == after
        assert row["rollout_images"] == e[2]["progress/rollout_images"] == 8  # 2 steps x 2 prompts x 2 images
        assert row["minutes"] == e[2]["progress/minutes"]
        line = (f"| {f.parent.name} | {f.name[5:]} | {before:.3f} -> {after:.3f} | {after - before:+.3f} | 8 "
                f"| {e[2]['progress/minutes']:.2f} |")
        assert line in table
    for v in result["variants"]:
        g = gains[v["variant"]]
        mean = sum(g) / 2
        half = t.ppf(0.975, 1) * math.sqrt(sum((x - mean) ** 2 for x in g)) / math.sqrt(2)
        assert math.isclose(v["mean_gain"], mean, abs_tol=1e-12) and math.isclose(v["gain_ci95"], half, rel_tol=1e-9)
        assert f"| {v['variant']} | 2 | {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] | {min(g):+.3f} |" in table
    assert "t(0.975, n - 1)" in table and "eval/reward" in table and (out / "compare.png").stat().st_size > 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["steps"] == 2 and saved["seeds"] == [0, 1] and saved["results"]["runs"] == result["runs"]
    capsys.readouterr()

    # The same comparison again: nothing trains.
    run_comparison(None, overrides(tmp_path), VARIANTS, out, 2, [0, 1], make_trainer=count)
    assert len(count.built) == 4 and capsys.readouterr().out.count("finished earlier, skipped") == 4
    # One run lost its last checkpoint (stopped after step 1), another its whole folder.
    shutil.rmtree(folders[1] / "checkpoints" / "step-000002")
    (folders[1] / "checkpoints" / "latest").write_text("step-000001")
    shutil.rmtree(folders[2])
    again = run_comparison(None, overrides(tmp_path), VARIANTS, out, 2, [0, 1], make_trainer=count)
    assert count.built[4:] == [str(folders[1]), str(folders[2])]
    printed = capsys.readouterr().out
    assert "compare run 2/4: base seed 1: resuming from step 1" in printed
    assert "compare run 3/4: hot seed 0: training" in printed and printed.count("skipped") == 2
    assert sorted(evals(folders[1])) == [0, 1, 2] and (folders[1] / "checkpoints" / "step-000002").is_dir()
    assert [r["after"] for r in again["runs"]] == [evals(f)[2][key] for f in folders]


def test_cli_refuses_a_changed_manifest_and_force_replaces(tmp_path, capsys, monkeypatch):
    count = Counting()
    monkeypatch.setattr("udm_grpo.grpo.trainer.UDMGRPOTrainer", count)
    out = tmp_path / "cmp"
    args = ["compare", "-o", str(out), *overrides(tmp_path), "--variant", "base", "--variant", "hot",
            "training.lr=3e-2"]
    assert main([*args, "--steps", "1"]) == 0 and len(count.built) == 2
    assert "| hot | 0 |" in capsys.readouterr().out
    before = (out / "compare.json").read_text()
    for extra, what in [(["--steps", "2"], "steps 1, now 2"), (["--steps", "1", "--seeds", "0", "1"],
                                                              "seeds [0], now [0, 1]"),
                        (["--steps", "1", "--variant", "cold", "training.lr=1e-4"], "variant(s) cold added")]:
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and what in err and "--force" in err, err
    assert main([*args[:-1], "training.lr=1e-2", "--steps", "1"]) == 2
    assert "variant hot was training.lr=3e-2, now training.lr=1e-2" in capsys.readouterr().err
    assert (out / "compare.json").read_text() == before and len(count.built) == 2
    assert main([*args, "--steps", "2", "--force"]) == 0 and len(count.built) == 4
    assert json.loads((out / "compare.json").read_text())["steps"] == 2
    assert sorted(evals(out / "hot" / "seed-0")) == [0, 1, 2]


@pytest.mark.parametrize("variants, message", [
    (["a/b"], "variant name 'a/b' cannot be a folder name"),
    ([".."], "variant name '..' cannot be a folder name"),
    (["compare.md"], "variant name 'compare.md' cannot be a folder name"),
    (["lr=1"], "the first word must be the variant's name"),
    (["a", "A"], "variant name 'A' is given twice"),
    (["a x.yaml"], "--variant a x.yaml: no such file, and not a packaged recipe"),
    (["a {tmp}/x.yaml {tmp}/y.yaml"], "--variant a: '{tmp}/y.yaml' is not KEY=VALUE, and only one config file"),
])
def test_bad_variants_are_refused_in_one_sentence(tmp_path, capsys, variants, message):
    args = [w for v in variants for w in ["--variant", *v.format(tmp=tmp_path).split()]]
    message = message.format(tmp=tmp_path)
    assert main(["compare", "-o", str(tmp_path / "cmp"), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "cmp").exists()


def test_refusals_before_any_training(tmp_path):
    out, o = tmp_path / "cmp", overrides(tmp_path)
    with pytest.raises(UserError, match="experiment.eval_every is 0"):
        run_comparison(None, [*o, "experiment.eval_every=0"], VARIANTS, out, 1, make_trainer=pytest.fail)
    changed = [Variant("base"), Variant("short", None, ("experiment.eval_num_inference_steps=1",))]
    with pytest.raises(UserError, match=r"variant short changes the held-out evaluation \(experiment.eval_num_infer"):
        run_comparison(None, o, changed, out, 1, make_trainer=pytest.fail)
    (out / "hot" / "seed-0").mkdir(parents=True)
    (out / "hot" / "seed-0" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds a run that no manifest of this comparison records"):
        run_comparison(None, o, VARIANTS, out, 1, make_trainer=pytest.fail)
    assert not (out / "compare.json").exists()


def fake_run(folder, rows, config=True):
    folder.mkdir(parents=True)
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (folder / "config.yaml").write_text("sampling:\n  num_prompts_per_step: 3\n  num_images_per_prompt: 4\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time/total": 30.0}) + "\n" for s in (1, 2)))


def test_collect_reads_strict_and_progress_and_falls_back_for_older_runs(tmp_path):
    out = tmp_path / "cmp"
    for seed, after in ((0, 0.5), (1, 0.7)):
        fake_run(out / "new" / f"seed-{seed}", [
            {"step": 0, "eval/strict": 0.25, "eval/ci95/strict": 0.1, "progress/rollout_images": 0,
             "progress/minutes": 0.0},
            {"step": 2, "eval/strict": after, "eval/ci95/strict": 0.12, "progress/rollout_images": 40,
             "progress/minutes": 1.5}])
        fake_run(out / "old" / f"seed-{seed}", [{"step": 0, "eval/strict": 0.25}, {"step": 2, "eval/strict": 0.5}])
    result = collect(out, [Variant("new"), Variant("old")], [0, 1], 2)
    assert result["metric"] == "eval/strict"
    new, old = result["runs"][:2], result["runs"][2:]
    assert [r["gain"] for r in new] == [0.25, pytest.approx(0.45)] and new[0]["after_ci95"] == 0.12
    assert new[0]["rollout_images"] == 40 and new[0]["minutes"] == 1.5
    assert old[0]["rollout_images"] == 24 and old[0]["minutes"] == 1.0  # 2 x 3 x 4; 2 x 30 s
    assert any("2 run(s) log no progress/rollout_images" in n for n in result["notes"])
    assert result["variants"][1]["gain_ci95"] == 0.0 and result["curves"]["new"][1]["rollout_images"] == 40
    with pytest.raises(UserError, match=r"--metric clean: not in every run's last evaluation; choose one of strict"):
        collect(out, [Variant("new")], [0, 1], 2, metric="clean")
    assert re.search(r"\bnan\b", json.dumps(result).lower()) is None


def test_the_table_shows_partial_credit_and_shapes_beside_strict(tmp_path):
    """Runs whose reward logs `score` / `blobs` show them before -> after, so a gain bought by drawing more shapes
    is seen in the same table."""
    from udm_grpo.commands.comparison import definition, write_report

    out = tmp_path / "cmp"
    for seed, (blobs, score) in enumerate(((4.0, 0.30), (3.0, 0.40))):
        fake_run(out / "v" / f"seed-{seed}", [
            {"step": 0, "eval/strict": 0.3, "eval/score": 0.5, "eval/blobs": 2.0, "progress/rollout_images": 0,
             "progress/minutes": 0.0},
            {"step": 2, "eval/strict": 0.5, "eval/score": score, "eval/blobs": blobs, "progress/rollout_images": 8,
             "progress/minutes": 1.0}])
    result = collect(out, [Variant("v")], [0, 1], 2)
    assert result["runs"][0]["also"] == {"score": [0.5, 0.3], "blobs": [2.0, 4.0]}
    assert result["variants"][0]["also"] == {"score": pytest.approx(0.35), "blobs": 3.5}
    write_report(result, definition([], [], [Variant("v")], [0, 1], 2), out, "compare", "Comparison")
    table = (out / "compare.md").read_text()
    assert "| score before -> after | blobs before -> after |" in table
    assert "| 0.500 -> 0.300 | 2.000 -> 4.000 |" in table and "| 0.350 | 3.500 |" in table
