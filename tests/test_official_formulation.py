"""benchmarks/official_formulation.py at the tiny world's shape: what the official formulation costs beyond ours
follows from the sequence layout alone, so the benchmark cannot silently drift."""

import json

from udm_grpo.models.transformer import URSAConfig
from udm_grpo.tinyworld import SHIPPED_MODEL

from .benchmark_scripts import load_benchmark

B, L, GRID, D = 4, 16, (8, 8), 8  # micro-batch, text tokens, image grid, path-embedding width


def _config(codebook: int) -> URSAConfig:
    data = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())
    return URSAConfig.from_dict({**data, "lm_head_size": codebook, "vocab_size": data["lm_vocab_size"] + codebook})


def test_official_costs_the_lm_head_at_the_text_positions_and_the_sampler_product():
    bench = load_benchmark("official_formulation")
    from udm_grpo.grpo.simulate import simulate_phases

    k = 320  # != hidden (256), so the lm head's matrix products are told apart from the projections
    config = _config(k)
    h, n = config.hidden_size, GRID[0] * GRID[1]
    s = L + 1 + n
    with bench.counted_flops(config, D) as events:
        ours = simulate_phases(config, B, B, L, GRID, reference=True)
    ours_by = bench.split_by_phase(events, ours)
    with bench.counted_flops(config, D) as events:
        official = bench.simulate_official(config, B, B, L, GRID, D)
    official_by = bench.split_by_phase(events, official)
    assert list(official) == ["rollout step", "reference forward", "training step", "optimizer step"]
    assert ours_by is not None and official_by is not None
    # every row through the head: forward (1) + the gradients of input and weight (2); the backbone is the same
    assert official["training step"].flops - ours["training step"].flops == 3 * 2 * B * (L + 1) * h * k
    assert official_by["training step"]["lm head"] == 3 * 2 * B * s * h * k
    assert ours_by["training step"]["lm head"] == 3 * 2 * B * n * h * k
    reference = next(name for name in ours if bench.kind(name) == "reference")
    assert official["reference forward"].flops - ours[reference].flops == 2 * B * (L + 1) * h * k
    # the rollout step is the same forward plus the distances of B * N draws to the whole codebook
    assert official["rollout step"].flops - official["reference forward"].flops == 2 * B * n * D * k
    assert official_by["rollout step"]["sampler"] == 2 * B * n * D * k


def test_benchmark_json_adds_up(capsys):
    bench = load_benchmark("official_formulation")
    assert bench.main(["--shape", str(SHIPPED_MODEL), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"]["micro_batch"] == 4 and out["recipe"]["grad_accum"] == 3
    for side in ("ours", "official"):
        phases = [pair[side] for pair in out["phases"].values() if pair[side]]
        assert out["totals"][side]["flops"] == sum(p["flops"] for p in phases)
        assert out["totals"][side]["peak_bytes"] == max(p["peak_bytes"] for p in phases)
        for p in phases:  # what ZeRO-2 stores per GPU plus what the phase measured beyond the module's own bytes
            assert p["peak_bytes"] == sum(p["engine_bytes"].values()) + p["transient_bytes"] > p["transient_bytes"]
        assert sum(out["consumers"][side].values()) == out["totals"][side]["flops"]
    assert out["phases"]["reference"]["official"]["calls"] == 2 * out["phases"]["reference"]["ours"]["calls"] == 6
    assert out["ratio"]["flops"] == out["totals"]["ours"]["flops"] / out["totals"]["official"]["flops"] < 1
