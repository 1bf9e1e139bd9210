"""URSA transformer: 3-D RoPE, shifted readout, checkpoint layout and loading (tiny CPU models)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from udm_grpo.errors import CheckpointError, ConfigError
from udm_grpo.models.transformer import (
    URSAConfig,
    URSATransformer,
    apply_rope,
    rope_angles,
    rope_axes,
    rope_positions,
)

REFERENCE_CONFIG_KEYS = {
    "_class_name", "_diffusers_version", "attn_implementation", "bov_token_id", "hidden_size",
    "intermediate_size", "lm_head_size", "lm_vocab_size", "max_window_layers", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "rope_theta", "vocab_size",
}  # fmt: skip
GRID = (2, 3)


def tiny_config(**overrides) -> URSAConfig:
    kw = dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, head_dim=16, rope_theta=10000.0, vocab_size=64, lm_vocab_size=40,
        lm_head_size=24, bov_token_id=39,
    )  # fmt: skip
    kw.update(overrides)
    return URSAConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> URSATransformer:
    torch.manual_seed(seed)
    return URSATransformer(tiny_config(**overrides)).eval()


def tiny_batch(batch: int = 2, text_len: int = 5, grid: tuple[int, int] = GRID, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 39, (batch, text_len), generator=g)
    image = torch.randint(0, 24, (batch, grid[0] * grid[1]), generator=g)
    return text, image


def full_sequence(model: URSATransformer, text: torch.Tensor, image: torch.Tensor, grid=GRID):
    bov = torch.full((text.shape[0], 1), model.config.bov_token_id)
    ids = torch.cat([text, bov, image + model.image_offset], 1)
    return ids, rope_positions(text.shape[1], grid)


# ----------------------------------------------------------------------------- RoPE


def test_rope_positions_text_bov_image():
    pos = rope_positions(3, (2, 3))
    assert pos.dtype == torch.long and pos.shape == (3 + 1 + 6, 3)
    assert pos[:4].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert pos[4:].tolist() == [[4, 0, 0], [4, 0, 1], [4, 0, 2], [4, 1, 0], [4, 1, 1], [4, 1, 2]]


def test_rope_axes_split():
    axes = rope_axes(128)  # section 1.5: pairs 0..47 cycle t,h,w; 48..63 alternate h,w
    assert len(axes) == 64
    assert axes[:48] == [i % 3 for i in range(48)]
    assert axes[48:] == [1 if (i - 48) % 2 == 0 else 2 for i in range(48, 64)]
    assert [axes.count(a) for a in range(3)] == [16, 24, 24]
    assert rope_axes(16) == [0, 1, 2, 0, 1, 2, 1, 2]
    assert rope_axes(32) == [0, 1, 2] * 4 + [1, 2, 1, 2]
    with pytest.raises(ValueError):
        rope_axes(24)  # 12 pairs = 9 cycled + 3 left: not an even h/w split (the reference breaks too)
    with pytest.raises(ConfigError, match="head_dim"):
        tiny_config(head_dim=24).validate()


@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_rope_matches_float64_formula(head_dim: int):
    theta, seq, heads = 1e6, 7, 2
    g = torch.Generator().manual_seed(head_dim)
    pos = torch.randint(0, 400, (seq, 3), generator=g)
    x = torch.randn(1, seq, heads, head_dim, generator=g, dtype=torch.float64)
    n_cycle, half = 3 * (head_dim // 8), head_dim // 2
    expected = torch.empty_like(x)
    for s in range(seq):
        for i in range(half):
            axis = i % 3 if i < n_cycle else (1 if (i - n_cycle) % 2 == 0 else 2)
            angle = pos[s, axis].item() * theta ** (-2 * i / head_dim)
            a, b = x[0, s, :, i], x[0, s, :, i + half]
            expected[0, s, :, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[0, s, :, i + half] = a * math.sin(angle) + b * math.cos(angle)
    axes = torch.tensor(rope_axes(head_dim))
    angles = rope_angles(pos, axes, theta).unsqueeze(-2)
    got = apply_rope(x.float(), angles.cos(), angles.sin())
    torch.testing.assert_close(got.double(), expected, atol=3e-4, rtol=0)


def test_rope_scores_depend_on_position_differences_only():
    head_dim, theta = 32, 1e4
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, head_dim, generator=g)
    axes = torch.tensor(rope_axes(head_dim))

    def score(p_q, p_k):
        aq, ak = (rope_angles(torch.tensor([p]), axes, theta).unsqueeze(-2) for p in (p_q, p_k))
        return (apply_rope(q, aq.cos(), aq.sin()) * apply_rope(k, ak.cos(), ak.sin())).sum()

    base = score([3, 1, 4], [5, 9, 2])
    torch.testing.assert_close(score([3 + 7, 1 - 1, 4 + 11], [5 + 7, 9 - 1, 2 + 11]), base, atol=1e-4, rtol=0)
    assert not torch.allclose(score([3, 1, 5], [5, 9, 2]), base, atol=1e-3)  # w offset alone matters


def test_reference_interleaved_layout_gives_same_scores():
    """The reference writes rotated pair i to channels (2i, 2i+1); that permutes q and k alike."""
    head_dim, half = 16, 8
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 1, 4, 2, head_dim, generator=g)
    axes = torch.tensor(rope_axes(head_dim))
    angles = rope_angles(torch.randint(0, 50, (1, 4, 3), generator=g), axes, 1e4).unsqueeze(-2)
    cos, sin = angles.cos(), angles.sin()

    def interleaved(x):
        a, b = x[..., :half], x[..., half:]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    qh, kh = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()
    torch.testing.assert_close(interleaved(q), qh[..., perm])
    scores_ref = torch.einsum("bshd,bthd->bhst", interleaved(q), interleaved(k))
    torch.testing.assert_close(torch.einsum("bshd,bthd->bhst", qh, kh), scores_ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- forward


def test_blocks_match_transformers_qwen3_with_a_full_mask():
    """Equal t/h/w positions reduce 3-D RoPE to 1-D RoPE; a zero 4-D mask makes HF Qwen3 bidirectional."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf_cfg = transformers.Qwen3Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, head_dim=16, rope_theta=10000.0, vocab_size=64, rms_norm_eps=1e-6,
        attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.Qwen3Model(hf_cfg).eval()
    hf.load_state_dict({k[6:]: v for k, v in model.state_dict().items() if k.startswith("model.")})
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.zeros(2, 1, 9, 9), position_ids=pos[None].expand(2, -1))
        ours = model.model.norm(model.hidden_states(ids, pos[:, None].expand(-1, 3)))
    torch.testing.assert_close(ours, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_full_size_config_builds_on_meta():
    with torch.device("meta"):
        model = URSATransformer(URSAConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 1.95e9 < n < 2.05e9  # "about 2.0B parameters with the enlarged embedding and the head"
    assert model.state_dict()["model.layers.27.self_attn.k_proj.weight"].shape == (1024, 2048)


def test_state_dict_keys_match_reference_layout():
    model = tiny_model()
    keys = set(model.state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        attn = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
        expected |= {p + f"self_attn.{n}.weight" for n in attn}
        expected |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    assert keys == expected
    assert not any(b.requires_grad for b in model.buffers()) and "rope_axes" not in keys
    assert model.state_dict()["lm_head.weight"].shape == (24, 64)
    assert model.state_dict()["model.embed_tokens.weight"].shape == (64, 64)


def test_default_head_dim_is_128_not_hidden_over_heads():
    cfg = URSAConfig.from_dict(
        {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 1, "vocab_size": 64, "lm_vocab_size": 40, "lm_head_size": 24,
         "bov_token_id": 39}
    )  # fmt: skip
    assert cfg.head_dim == 128
    model = URSATransformer(cfg)
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (512, 64)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (256, 64)
    assert sd["model.layers.0.self_attn.v_proj.weight"].shape == (256, 64)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (64, 512)
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (128,)
    text, image = tiny_batch()
    assert model.image_logits(text, image, GRID).shape == (2, 6, 24)


def test_image_logits_is_shifted_slice_of_full_logits():
    model = tiny_model()
    text, image = tiny_batch()
    ids, pos = full_sequence(model, text, image)
    full = model(ids, pos)
    assert full.shape == (2, 5 + 1 + 6, 24)
    shapes = []
    model.lm_head.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
    logits = model.image_logits(text, image, GRID)
    assert shapes == [(2, 6, 64)]  # the head runs on the N read-out positions only
    torch.testing.assert_close(logits, full[:, -7:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids, pos.expand(2, -1, -1)), full)
    with pytest.raises(ValueError, match="grid"):
        model.image_logits(text, image, (2, 2))


def test_logits_to_keep_equals_slicing():
    model = tiny_model()
    ids, pos = full_sequence(model, *tiny_batch())
    full = model(ids, pos)
    torch.testing.assert_close(model(ids, pos, logits_to_keep=7), full[:, -7:], atol=1e-5, rtol=1e-5)
    assert model(ids, pos, logits_to_keep=1).shape == (2, 1, 24)


def test_attention_is_bidirectional():
    model = tiny_model()
    text, image = tiny_batch()
    before = model(*full_sequence(model, text, image))
    image2 = image.clone()
    image2[:, -1] = (image2[:, -1] + 1) % 24
    after = model(*full_sequence(model, text, image2))
    assert not torch.allclose(before[:, 0], after[:, 0])  # a later token changes the first position


def test_properties_and_bf16_forward():
    model = tiny_model()
    assert model.image_offset == 40 and model.codebook_size == 24
    model = model.to(torch.bfloat16)
    assert model.rope_axes.dtype == torch.long
    logits = model.image_logits(*tiny_batch(), GRID)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_gradient_checkpointing_same_gradients():
    text, image = tiny_batch()
    grads = {}
    for level in (0, 1, 2, 3):
        model = tiny_model().train()
        model.set_gradient_checkpointing(level)
        assert model.gradient_checkpointing == bool(level)
        model.image_logits(text, image, GRID).logsumexp(-1).sum().backward()
        grads[level] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for level in (1, 2, 3):
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[level][n], g, atol=1e-6, rtol=1e-5, msg=f"level {level}: {n}")
    model.gradient_checkpointing = True
    assert all(layer.checkpoint_level == 3 for layer in model.model.layers)
    with torch.no_grad():
        model.image_logits(text, image, GRID)  # no checkpointing without grad
    with pytest.raises(ConfigError, match="level"):
        model.set_gradient_checkpointing(4)


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_ursa_1_7b():
    cfg = URSAConfig()
    cfg.validate()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 6144, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 8, 128)
    assert (cfg.vocab_size, cfg.lm_vocab_size, cfg.lm_head_size) == (215669, 151669, 64000)
    assert cfg.bov_token_id == 151652
    assert cfg.rope_theta == 1_000_000 and cfg.rms_norm_eps == 1e-6


def test_config_round_trip_keeps_extra_and_writes_reference_fields():
    d = {**tiny_config().to_dict(), "pad_token_id": 7, "_name_or_path": "x"}
    del d["head_dim"]
    cfg = URSAConfig.from_dict(d)
    assert cfg.head_dim == 128 and cfg.extra["pad_token_id"] == 7
    out = cfg.to_dict()
    assert set(out) == REFERENCE_CONFIG_KEYS | {"head_dim", "rms_norm_eps", "pad_token_id", "_name_or_path"}
    assert out["_class_name"] == "URSATransformer3DModel"
    assert URSAConfig.from_dict(out) == cfg


def test_config_errors_name_file_and_field():
    src = "transformer/config.json"
    with pytest.raises(ConfigError) as e:
        URSAConfig.from_dict({"hidden_size": "abc"}, source=src)
    assert str(e.value) == "transformer/config.json: field 'hidden_size' must be an integer, got 'abc'."
    with pytest.raises(ConfigError, match=r"^transformer/config.json: field 'vocab_size' \(100\)"):
        URSAConfig.from_dict({**tiny_config().to_dict(), "vocab_size": 100}, source=src)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        URSAConfig.from_dict({**tiny_config().to_dict(), "num_key_value_heads": 3}, source=src)
    with pytest.raises(ConfigError, match="rope_theta"):
        URSAConfig.from_dict({"rope_theta": "big"}, source=src)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        URSAConfig.from_dict({"num_hidden_layers": True}, source=src)
    with pytest.raises(ConfigError, match="_class_name"):
        URSAConfig.from_dict({"_class_name": "AutoencoderVQ"}, source=src)


# ----------------------------------------------------------------------------- disk


def test_save_from_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 16
    loaded = URSATransformer.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in loaded.parameters())
    assert loaded.rope_axes.device.type == "cpu" and all(p.requires_grad for p in loaded.parameters())
    text, image = tiny_batch()
    assert torch.equal(loaded.image_logits(text, image, GRID), model.image_logits(text, image, GRID))
    bf16 = URSATransformer.from_pretrained(tmp_path, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.parameters())


def test_legacy_bin_and_sharded_index(tmp_path):
    model = tiny_model()
    text, image = tiny_batch()
    expected = model.image_logits(text, image, GRID)
    config = json.dumps(model.config.to_dict())
    legacy, sharded = tmp_path / "legacy", tmp_path / "sharded"
    for folder in (legacy, sharded):
        folder.mkdir()
        (folder / "config.json").write_text(config)
    torch.save(model.state_dict(), legacy / "diffusion_pytorch_model.bin")
    assert torch.equal(URSATransformer.from_pretrained(legacy).image_logits(text, image, GRID), expected)
    sd = model.state_dict()
    names = sorted(sd)
    weight_map = {}
    for j, part in enumerate((names[::2], names[1::2])):
        shard = f"diffusion_pytorch_model-0000{j + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(sharded / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(URSATransformer.from_pretrained(sharded).image_logits(text, image, GRID), expected)


def test_fp16_stored_weights_load_as_float32(tmp_path):
    model = tiny_model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    half = {k: v.half() for k, v in model.state_dict().items()}
    save_file(half, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = URSATransformer.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.half().float())
    text, image = tiny_batch()
    got, want = loaded.image_logits(text, image, GRID), model.image_logits(text, image, GRID)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def _write(folder, model, state):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def test_checkpoint_errors_name_folder_and_key(tmp_path):
    model = tiny_model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    _write(tmp_path / "a", model, missing)
    with pytest.raises(CheckpointError, match=r"a: weights lack key 'model.layers.1.mlp.up_proj.weight'"):
        URSATransformer.from_pretrained(tmp_path / "a")
    _write(tmp_path / "b", model, {**sd, "lm_head.weight": torch.zeros(25, 64)})
    with pytest.raises(CheckpointError, match=r"b: weight 'lm_head.weight' has shape \[25, 64\]"):
        URSATransformer.from_pretrained(tmp_path / "b")
    _write(tmp_path / "c", model, {**sd, "lm_head.bias": torch.zeros(24)})
    with pytest.raises(CheckpointError, match="unexpected key 'lm_head.bias'"):
        URSATransformer.from_pretrained(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        URSATransformer.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(CheckpointError, match="no weights found"):
        URSATransformer.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        URSATransformer.from_pretrained(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({**model.config.to_dict(), "hidden_size": "abc"}))
    with pytest.raises(ConfigError, match=r"e/config.json: field 'hidden_size' must be an integer"):
        URSATransformer.from_pretrained(tmp_path / "e")


def test_unreadable_weights_and_adapter_folders(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "transformer")
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: cannot be read as a weight file")):
        URSATransformer.from_pretrained(tmp_path / "transformer")
    weights.unlink()
    (tmp_path / "transformer" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        URSATransformer.from_pretrained(tmp_path / "transformer")
