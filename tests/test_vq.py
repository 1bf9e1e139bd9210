"""AutoencoderVQ (URSA IBQ VAE), PatchVQ (tiny-world tokenizer) and the vae/ loader."""

from __future__ import annotations

import json
import re

import pytest
import torch

from udm_grpo.errors import CheckpointError, ConfigError
from udm_grpo.models.io import WEIGHTS_NAME
from udm_grpo.models.patch_vq import PatchVQ, PatchVQConfig, nearest, patchify
from udm_grpo.models.vae import load_vae
from udm_grpo.models.vq import AutoencoderVQ, VQConfig


def tiny_config(**kw) -> VQConfig:
    base = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                num_vq_embeddings=32, vq_embed_dim=4, spatial_stride=2, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    base.update(kw)
    return VQConfig(**base)


@pytest.fixture(scope="module")
def vq() -> AutoencoderVQ:
    torch.manual_seed(0)
    return AutoencoderVQ(tiny_config()).eval()


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def shapes_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Flat-coloured rectangles on a light background, values on the uint8 grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), 0.9)
    for i in range(n):
        for _ in range(2):
            y0, x0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
            hh, ww = torch.randint(4, 12, (2,), generator=g).tolist()
            x[i, :, y0 : y0 + hh, x0 : x0 + ww] = (torch.randint(0, 256, (3, 1, 1), generator=g) / 127.5 - 1)
    return x


# ---- AutoencoderVQ ---------------------------------------------------------------------------------
def test_reference_key_names():
    cfg = tiny_config(attn_down_block=True, attn_up_block=True)
    keys = set(AutoencoderVQ(cfg).state_dict())
    enc, dec = "encoder.down_blocks", "decoder.up_blocks"
    for k in [
        "encoder.conv_in.weight", f"{enc}.0.resnets.0.norm1.weight", f"{enc}.0.resnets.0.conv2.bias",
        f"{enc}.0.downsamplers.0.conv.weight", f"{enc}.1.resnets.0.conv_shortcut.weight",
        f"{enc}.1.attentions.0.to_q.weight", f"{enc}.1.attentions.0.group_norm.bias",
        f"{enc}.1.attentions.0.to_out.0.weight", "encoder.mid_block.resnets.1.conv1.weight",
        "encoder.mid_block.attentions.0.to_v.bias", "encoder.conv_norm_out.weight", "encoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.bias", "quantizer.embedding.weight", "decoder.conv_in.weight",
        "decoder.mid_block.attentions.0.to_k.weight", f"{dec}.0.resnets.1.norm2.weight",
        f"{dec}.0.upsamplers.0.conv.weight", f"{dec}.0.attentions.1.to_out.0.bias",
        f"{dec}.1.resnets.0.conv_shortcut.weight", "decoder.conv_norm_out.bias", "decoder.conv_out.weight",
    ]:
        assert k in keys, k
    assert "encoder.down_blocks.0.resnets.0.conv_shortcut.weight" not in keys
    assert not any(k.startswith("encoder.down_blocks.1.downsamplers") for k in keys)
    assert not any(k.startswith("decoder.up_blocks.1.upsamplers") for k in keys)
    assert len([k for k in keys if k.startswith(f"{dec}.1.resnets.") and k.endswith("conv1.weight")]) == 2
    plain = set(AutoencoderVQ(tiny_config()).state_dict())
    assert not any(".attentions." in k and "mid_block" not in k for k in plain)


def test_encode_decode_shapes(vq):
    x = images(2, 16)
    ids = vq.encode(x)
    assert vq.spatial_stride == 2 and vq.num_embeddings == 32
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 32
    out = vq.decode(ids)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert float(out.detach().abs().max()) <= 1.0
    assert vq.codebook.shape == (32, 4)
    with pytest.raises(ValueError):
        vq.encode(images(1, 15))


def test_quantizer_is_inner_product_argmax(vq):
    z = torch.randn(3, 4, 5, 6)
    ids = vq.quantizer.quantize(z)
    scores = torch.einsum("bdhw,kd->bhwk", z, vq.codebook)
    assert torch.equal(ids, scores.argmax(-1))
    assert torch.equal(vq.quantizer.quantize(z, chunk=3), ids)
    assert torch.equal(vq.quantizer.quantize(z, chunk=1), ids)
    l2 = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook).argmin(1).view(3, 5, 6)
    assert not torch.equal(l2, ids)  # IBQ: inner product, not nearest code


def test_vq_save_load_bin_and_fp16(vq, tmp_path):
    x = images(2, 16)
    ids, out = vq.encode(x), vq.decode(vq.encode(x))
    vq.save_pretrained(tmp_path / "st")
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderVQ" and cfg["_quantizer_name"] == "VQuantizer"
    assert set(VQConfig().to_dict()) - {"_diffusers_version"} <= set(cfg)
    for d in (load_vae(tmp_path / "st"), AutoencoderVQ.from_pretrained(tmp_path / "st")):
        assert isinstance(d, AutoencoderVQ)
        assert torch.equal(d.encode(x), ids) and torch.equal(d.decode(ids), out)
    # legacy pickled .bin, stored in float16: loads, computes in float32
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    half_state = {k: v.half() for k, v in vq.state_dict().items()}
    torch.save(half_state, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    half = AutoencoderVQ.from_pretrained(tmp_path / "bin")
    assert half.codebook.dtype == torch.float32
    assert torch.allclose(half.decode(ids), out, atol=2e-2)
    assert torch.allclose(half.codebook, vq.codebook, atol=1e-2)


def _corrupt(tmp_path, vq, edit) -> str:
    from safetensors.torch import save_file

    folder = tmp_path / "bad"
    vq.save_pretrained(folder)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    edit(state)
    save_file(state, str(folder / WEIGHTS_NAME))
    return str(folder)


def test_vq_checkpoint_errors(vq, tmp_path):
    with pytest.raises(CheckpointError, match="quantizer.embedding.weight"):
        AutoencoderVQ.from_pretrained(_corrupt(tmp_path, vq, lambda s: s.pop("quantizer.embedding.weight")))
    with pytest.raises(CheckpointError, match="encoder.conv_in.weight.*shape"):
        AutoencoderVQ.from_pretrained(_corrupt(tmp_path, vq, lambda s: s.update(
            {"encoder.conv_in.weight": torch.zeros(32, 3, 1, 1)})))
    add_key = lambda s: s.update({"extra.weight": torch.ones(1)})  # noqa: E731
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        AutoencoderVQ.from_pretrained(_corrupt(tmp_path, vq, add_key))
    with pytest.raises(CheckpointError, match="config.json"):
        load_vae(tmp_path / "nowhere")



def test_truncated_weight_files_raise_checkpoint_error(vq, tmp_path):
    vq.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: cannot be read as a weight file")):
        load_vae(tmp_path / "vae")
    weights.unlink()
    legacy = tmp_path / "vae" / "diffusion_pytorch_model.bin"
    legacy.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=re.escape(f"{legacy}: cannot be read as a weight file")):
        load_vae(tmp_path / "vae")

def test_vq_config_errors(tmp_path):
    good = tiny_config().to_dict()
    with pytest.raises(ConfigError, match="cfg.json.*'layers_per_block'"):
        VQConfig.from_dict({**good, "layers_per_block": "2"}, source="cfg.json")
    with pytest.raises(ConfigError, match="'attn_down_block'"):
        VQConfig.from_dict({**good, "attn_down_block": 1})
    with pytest.raises(ConfigError, match="_quantizer_name.*FSQuantizer"):
        VQConfig.from_dict({**good, "_quantizer_name": "FSQuantizer"})
    with pytest.raises(ConfigError, match="block_out_channels"):
        VQConfig.from_dict({**good, "block_out_channels": [30, 64]})
    with pytest.raises(ConfigError, match="decoder_dtype"):
        VQConfig.from_dict({**good, "decoder_dtype": "float99"})
    cfg = VQConfig.from_dict({**good, "custom_key": 5, "decoder_dtype": "bfloat16"})
    assert cfg.to_dict()["custom_key"] == 5 and cfg.block_out_channels == (32, 64)
    (tmp_path / "config.json").write_text(json.dumps({**good, "_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match=r"config.json.*'AutoencoderKL'"):
        load_vae(tmp_path)


# ---- PatchVQ ---------------------------------------------------------------------------------------
def test_patch_vq_exact_round_trip():
    x = images(1, 32, seed=1)  # 16 distinct patches of 8x8
    codebook = torch.cat([patchify(x, 8).reshape(16, -1), torch.rand(4, 192) * 2 - 1])
    vq = PatchVQ(PatchVQConfig(8, 20, 3, 32), codebook)
    ids = vq.encode(x)
    assert ids.shape == (1, 4, 4) and torch.equal(ids.flatten(), torch.arange(16))
    assert torch.equal(vq.decode(ids), x)
    assert vq.spatial_stride == 8 and vq.num_embeddings == 20 and vq.codebook.shape == (20, 192)
    every = torch.arange(20).view(1, 4, 5)
    assert torch.equal(vq.encode(vq.decode(every)), every)


def test_kmeans_fit_deterministic_and_better_than_random():
    data = shapes_images(24, seed=3)
    a = PatchVQ.fit(data, 32, patch_size=8, iters=10, seed=7)
    b = PatchVQ.fit(data, 32, patch_size=8, iters=10, seed=7)
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, PatchVQ.fit(data, 32, patch_size=8, iters=10, seed=8).codebook)
    assert a.config.sample_size == 32 and float(a.codebook.abs().max()) <= 1
    pts = patchify(data, 8).reshape(-1, 192)
    fitted = nearest(pts, a.codebook)[1].mean()
    pick = torch.randperm(len(pts), generator=torch.Generator().manual_seed(0))[:32]
    assert fitted < nearest(pts, pts[pick])[1].mean()
    assert fitted < nearest(pts, torch.rand(32, 192) * 2 - 1)[1].mean()
    mse = (a.decode(a.encode(data)) - data).square().mean()
    assert mse < 0.05
    ids = torch.randint(0, 32, (3, 4, 4))
    if len(torch.unique(a.codebook, dim=0)) == 32:
        assert torch.equal(a.encode(a.decode(ids)), ids)


def test_kmeans_few_distinct_patches_and_speed():
    import time

    flat = torch.full((4, 3, 16, 16), -0.5)  # a single distinct patch
    vq = PatchVQ.fit(flat, 8, patch_size=8, seed=0)
    assert len(torch.unique(vq.codebook, dim=0)) == 8
    assert torch.equal(vq.decode(vq.encode(flat)), flat)
    colours = torch.randint(0, 256, (5, 3, 1, 1), generator=torch.Generator().manual_seed(1)) / 127.5 - 1
    tiles = colours.repeat_interleave(3, 0).expand(15, 3, 8, 8).reshape(1, 15, 3, 8, 8)
    mosaic = tiles.permute(0, 2, 3, 1, 4).reshape(1, 3, 8, 120)  # 15 patches, 5 distinct colours
    vq = PatchVQ.fit(mosaic, 16, seed=3)
    assert len(torch.unique(vq.codebook, dim=0)) == 16
    assert torch.equal(vq.decode(vq.encode(mosaic)), mosaic)
    noisy = torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 2560 distinct
    t0 = time.time()
    PatchVQ.fit(noisy, 64, iters=5)
    assert time.time() - t0 < 10


def test_patch_vq_save_load_and_errors(tmp_path):
    vq = PatchVQ.fit(shapes_images(8, seed=1), 16, iters=3)
    x = shapes_images(2, seed=9)
    vq.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg == {"_class_name": "PatchVQ", "_diffusers_version": cfg["_diffusers_version"], "patch_size": 8,
                   "num_vq_embeddings": 16, "in_channels": 3, "sample_size": 32}
    loaded = load_vae(tmp_path / "vae")
    assert isinstance(loaded, PatchVQ) and torch.equal(loaded.codebook, vq.codebook)
    ids = vq.encode(x)
    assert torch.equal(loaded.encode(x), ids) and torch.equal(loaded.decode(ids), vq.decode(ids))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    torch.save({"codebook": vq.codebook.half()}, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    half = PatchVQ.from_pretrained(tmp_path / "bin")
    assert half.codebook.dtype == torch.float32 and torch.allclose(half.codebook, vq.codebook, atol=1e-3)
    (tmp_path / "bin" / "config.json").write_text(json.dumps({**cfg, "patch_size": 4}))
    with pytest.raises(CheckpointError, match="'codebook' has shape"):
        PatchVQ.from_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps({**cfg, "num_vq_embeddings": 16.5}))
    with pytest.raises(ConfigError, match="config.json.*'num_vq_embeddings'"):
        load_vae(tmp_path / "bin")
    (tmp_path / "bin" / "diffusion_pytorch_model.bin").unlink()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weights"):
        load_vae(tmp_path / "bin")


def test_patch_vq_colour_groups_keep_reconstructed_shapes_one_colour(tmp_path):
    """Plain k-means blends the edge slivers of similar colours into mixed entries, so reconstructions of
    clean renders hold multi-coloured blobs; with colour groups every blob keeps its colour (ShapeEval's
    census: clean shapes / blobs), the file round-trips, and each entry belongs to one group."""
    import numpy as np

    from udm_grpo.data.shapes import BACKGROUND, COLORS, generate_records, render_batch
    from udm_grpo.models.patch_vq import _allot
    from udm_grpo.rewards.shapeeval import detect

    def to_float(batch):
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1

    train = to_float(render_batch(generate_records("train", None, 0)[::10], np.random.default_rng(0)))
    test = render_batch(generate_records("test")[::3], np.random.default_rng(1))
    groups = [list(BACKGROUND), *map(list, COLORS.values())]
    plain = PatchVQ.fit(train, 1024, 8, iters=10)
    grouped = PatchVQ.fit(train, 1024, 8, iters=10, colour_groups=groups)

    def clean_fraction(model):
        recon = ((model.decode(model.encode(to_float(test))) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        census: dict = {}
        for image in recon.numpy():
            detect(image, census=census)
        return census["clean"] / census["blobs"]

    # ~50 blobs, one is 2 points, and the fits differ by CPU: grouped >= 0.95 on the Intel Xeon this was written
    # on, 0.94 (46 / 49) on an AMD EPYC, where plain gives 0.54
    assert clean_fraction(grouped) >= 0.9 and clean_fraction(grouped) > clean_fraction(plain)
    assert sorted(set(grouped.groups.tolist())) == list(range(len(groups)))
    grouped.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert loaded.config.colour_groups == groups
    x = to_float(test[:8])
    assert torch.equal(loaded.encode(x), grouped.encode(x))
    assert _allot([5, 1, 94], 10) == [1, 1, 8] and sum(_allot([3, 3, 3], 100)) == 100
    with pytest.raises(ConfigError, match="colour_groups"):
        PatchVQConfig(colour_groups=[[0, 0, 0]]).validate()
