"""How clean can the tiny world's shapes be after the tokenizer? ShapeEval's census (clean shapes / blobs drawn)
of the VQ reconstructions of clean renders of the test split, for the shipped PatchVQ and for tokenizers fitted
by `udm-grpo pretrain`'s recipe with 1,024 or 256 codes, by plain k-means or with colour groups
(`tokenizer_colour_groups: true`). A generated image cannot be cleaner than its tokenizer lets it be, so this
is the ceiling of `eval shapes`' clean-shape fraction.

    python benchmarks/bench_tokenizer_clean.py
"""

from __future__ import annotations

import numpy as np
import torch


def census_of(vae, images: np.ndarray) -> dict:
    from udm_grpo.rewards.shapeeval import detect

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x))
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    census: dict = {}
    for image in recon:
        detect(image, census=census)
    return census


def main() -> None:
    from udm_grpo.data.shapes import generate_records, render_batch
    from udm_grpo.models.pipeline import URSAPipeline
    from udm_grpo.stats import half_width
    from udm_grpo.tinyworld import SHIPPED_MODEL, TinyWorldConfig, build_pipeline

    torch.set_num_threads(2)
    records = generate_records("test")
    images = render_batch(records, np.random.default_rng(0))
    vaes = {"shipped": URSAPipeline.from_pretrained(SHIPPED_MODEL).vae}
    for k in (1024, 256):
        for groups in (False, True):
            name = f"K = {k}, {'colour groups' if groups else 'plain k-means'}"
            vaes[name] = build_pipeline(TinyWorldConfig(codebook_size=k, tokenizer_colour_groups=groups)).vae
    print(f"ShapeEval census of VQ reconstructions, {len(records)} clean renders of the test split "
          f"({vaes['shipped'].config.patch_size} px patches; shipped K = {vaes['shipped'].num_embeddings})")
    for name, vae in vaes.items():
        c = census_of(vae, images)
        frac = c["clean"] / c["blobs"]
        ci = half_width(np.r_[np.ones(c["clean"]), np.zeros(c["blobs"] - c["clean"])])
        print(f"  {name:30s} clean {frac:.3f} +-{ci:.3f} ({c['clean']} of {c['blobs']} blobs)")


if __name__ == "__main__":
    main()
