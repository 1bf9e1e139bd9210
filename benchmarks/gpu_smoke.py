"""GPU smoke check, for a session that is lent a GPU: the sampler, the pretraining loss, forward noise
and two UDM-GRPO steps of the tiny world on the accelerator, with generators on that device and bf16
compute. One line per check; exits non-zero at the first failure. `--device cpu` runs the same code on
the CPU.

    python benchmarks/gpu_smoke.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)

    from udm_grpo import run_config
    from udm_grpo.diffusion.loss import pretraining_loss
    from udm_grpo.grpo.trainer import UDMGRPOTrainer
    from udm_grpo.models.pipeline import URSAPipeline
    from udm_grpo.tinyworld import SHIPPED_MODEL

    def check(name, fn):
        start = time.perf_counter()
        fn()
        print(f"ok  {name} ({time.perf_counter() - start:.2f} s)", flush=True)

    pipe = URSAPipeline.from_pretrained(SHIPPED_MODEL, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    check("sample with guidance, generator on the device",
          lambda: pipe(["a photo of a red circle"] * 4, num_inference_steps=8, guidance_scale=2.0, generator=gen))
    x1 = torch.randint(0, pipe.scheduler.num_embeddings, (4, 64), device=device, generator=gen)
    check("forward noise on the metric path", lambda: pipe.scheduler.path.add_noise(x1, 0.5, gen))
    check("pretraining loss", lambda: pretraining_loss(pipe.transformer, pipe.scheduler, pipe.encode_prompt(
        ["a photo of a red circle"] * 4), pipe.encode_prompt([""]), x1, (8, 8), gen, 0.5)[0].backward())
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(overrides=["model.dtype=bfloat16", "training.max_steps=2", "experiment.eval_every=0",
                                    "sampling.num_prompts_per_step=4", "training.micro_batch_size=32",
                                    f"experiment.output_dir={out}/run"])
        trainer = UDMGRPOTrainer(cfg, progress=False)
        assert trainer.acc.device.type == device.type, f"the trainer runs on {trainer.acc.device}"
        check("two UDM-GRPO steps in bf16 with float32 masters", trainer.train)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    print("all GPU checks passed")


if __name__ == "__main__":
    main()
