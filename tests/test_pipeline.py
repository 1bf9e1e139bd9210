"""URSAPipeline: the official folder layout round trip, invariants, generation."""

import json
import shutil

import numpy as np
import pytest
import torch

from udm_grpo.data.text_tokenizer import build_word_tokenizer
from udm_grpo.diffusion.paths import MetricPath
from udm_grpo.diffusion.scheduler import KineticOptimalScheduler
from udm_grpo.errors import CheckpointError
from udm_grpo.models.patch_vq import PatchVQ
from udm_grpo.models.pipeline import URSAPipeline
from udm_grpo.models.transformer import URSAConfig, URSATransformer
from udm_grpo.models.vq import AutoencoderVQ, VQConfig

K = 16


def tiny_pipeline(vae_kind="patch"):
    torch.manual_seed(0)
    tok = build_word_tokenizer(["a", "photo", "of", "red", "circle", "blue", "square"], 8)
    text_vocab = len(tok)
    if vae_kind == "patch":
        vae = PatchVQ.fit(torch.rand(8, 3, 16, 16) * 2 - 1, K, patch_size=4, seed=0)
    else:
        vae = AutoencoderVQ(VQConfig.from_dict({
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_vq_embeddings": K,
            "vq_embed_dim": 4, "latent_channels": 4, "spatial_stride": 2, "sample_size": 16}))
    cfg = URSAConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, head_dim=16, lm_vocab_size=text_vocab, lm_head_size=K,
                     vocab_size=text_vocab + K, bov_token_id=tok.convert_tokens_to_ids("<bov>"), rope_theta=1e4)
    transformer = URSATransformer(cfg)
    sched = KineticOptimalScheduler(MetricPath(vae.codebook.detach().clone(), alpha=0.9, c=3.0), shift=2.0,
                                    alpha=0.9, c=3.0)
    return URSAPipeline(transformer, vae, sched, tok, max_prompt_length=8)


@pytest.mark.parametrize("vae_kind", ["patch", "ibq"])
def test_round_trip_identical_outputs(tmp_path, vae_kind):
    pipe = tiny_pipeline(vae_kind)
    pipe.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    tok_config = json.loads((tmp_path / "m" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4 and 5 both load
    assert index["_class_name"] == "URSAPipeline"
    assert set(index) >= {"transformer", "vae", "scheduler", "tokenizer"}
    assert (tmp_path / "m" / "scheduler" / "scheduler_model.pth").is_file()
    loaded = URSAPipeline.from_pretrained(tmp_path / "m")
    a = pipe(["a photo of a red circle", "blue square"], num_inference_steps=4, guidance_scale=3.0, seed=1,
             height=16, width=16)
    b = loaded(["a photo of a red circle", "blue square"], num_inference_steps=4, guidance_scale=3.0, seed=1,
               height=16, width=16)
    assert torch.equal(a.ids, b.ids)
    assert np.array_equal(a.images, b.images)
    assert a.images.dtype == np.uint8 and a.images.shape[-1] == 3
    ids = torch.randint(0, K, (2, a.ids.shape[1]))
    text = pipe.encode_prompt(["red circle", ""])
    grid = pipe.grid(16, 16)
    assert torch.equal(pipe.transformer.image_logits(text, ids, grid), loaded.transformer.image_logits(text, ids, grid))
    assert torch.equal(pipe.vae.decode(ids.view(2, *grid)), loaded.vae.decode(ids.view(2, *grid)))


def test_left_padding_and_record(tmp_path):
    pipe = tiny_pipeline()
    text = pipe.encode_prompt(["red circle"])
    pad = pipe.tokenizer.pad_token_id
    assert text.shape == (1, 8) and (text[0, :6] == pad).all() and (text[0, 6:] != pad).all()
    out = pipe("red circle", num_inference_steps=3, guidance_scale=1.0, seed=0, height=16, width=16, record=True)
    assert len(out.trajectory.states) == 3 and torch.equal(out.trajectory.final, out.ids)


def test_missing_component_and_mismatched_k(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "n")
    shutil.rmtree(tmp_path / "n" / "vae")
    with pytest.raises(CheckpointError, match="'vae/'"):
        URSAPipeline.from_pretrained(tmp_path / "n")
    # A scheduler path embedding with a different number of rows than the codebook.
    torch.save({"path.emb": torch.randn(K + 1, 4)}, tmp_path / "m" / "scheduler" / "scheduler_model.pth")
    with pytest.raises(CheckpointError, match="codebook sizes disagree"):
        URSAPipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="model_index.json"):
        URSAPipeline.from_pretrained(tmp_path / "m" / "vae")


def test_unknown_config_field_type(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_hidden_layers"] = "two"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="num_hidden_layers"):
        URSAPipeline.from_pretrained(tmp_path / "m")
