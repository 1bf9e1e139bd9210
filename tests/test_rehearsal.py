"""benchmarks/real_shape_rehearsal.py: its random pipeline at a tiny shape is a folder the loader reads, with the
shape folder's sizes (the rehearsal itself runs minutes at the real shape and is not in CI)."""

import json

import torch
from safetensors import safe_open

from udm_grpo.models.pipeline import URSAPipeline

from .benchmark_scripts import load_benchmark


def test_built_pipeline_loads_with_the_shape_folder_sizes(tmp_path):
    rehearsal = load_benchmark("real_shape_rehearsal")
    shape = rehearsal.small_shape(tmp_path / "shape", hidden=64, layers=1, codebook=64, vae_channels=8,
                                  lm_vocab_size=300)
    info = rehearsal.build_pipeline(shape, tmp_path / "model", codebook=96)
    folder = tmp_path / "model"
    t_cfg = json.loads((shape / "transformer" / "config.json").read_text())
    v_cfg = json.loads((shape / "vae" / "config.json").read_text())

    pipe = URSAPipeline.from_pretrained(folder)
    cfg = pipe.transformer.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (64, 1, 16)
    assert (cfg.lm_vocab_size, cfg.lm_head_size, cfg.vocab_size) == (300, 96, 396)  # --codebook wins over 64
    assert info["codebook"] == 96 and info["params"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert pipe.vae.num_embeddings == pipe.scheduler.num_embeddings == 96
    assert pipe.scheduler.path_embedding.shape == (96, v_cfg["vq_embed_dim"])
    assert pipe.vae.config.block_out_channels == (8,) * len(v_cfg["block_out_channels"])
    assert pipe.grid() == (32, 32)  # the shape's 512 px at stride 16
    assert pipe.max_prompt_length == 320 and len(pipe.tokenizer) <= cfg.lm_vocab_size
    # bf16 on disk, float32 (the default) once loaded; the random weights are finite and not all equal
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    weight = pipe.transformer.lm_head.weight
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all() and 0.01 < weight.std() < 0.03
    assert torch.equal(pipe.transformer.model.norm.weight, torch.ones(t_cfg["hidden_size"]))
    ids = pipe.encode_prompt(["a photo of a red circle"])
    assert ids.shape == (1, 320) and ids[0, 0] == pipe.tokenizer.pad_token_id
    out = pipe("a photo of a red circle", num_inference_steps=1, guidance_scale=1.0, seed=0, height=64, width=64)
    assert out.images.shape == (1, 64, 64, 3)
