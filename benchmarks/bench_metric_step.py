"""One metric-path sampling step (draw x1_hat from logits + CTMC jump): udm_grpo vs a naive full table.

The naive formulation below materialises (tokens x K) tables the way the reference scheduler does:
softmax of the logits, multinomial, the distance table, p_t, the velocity and a second multinomial.
Each variant runs in its own process; "peak extra" is the rise of the process's peak RSS (CPU) or of
torch.cuda.max_memory_allocated (GPU) over what the inputs already hold.

    python benchmarks/bench_metric_step.py                       # K=65536, 8 x 1024 tokens, CPU
    python benchmarks/bench_metric_step.py --device cuda --repeat 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def naive_step(logits, x_t, emb, t, dt, alpha, c, gen):
    e = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    flat = logits.reshape(-1, logits.shape[-1])
    x1 = torch.multinomial(torch.softmax(flat.float(), -1), 1, generator=gen).squeeze(1)
    xt = x_t.reshape(-1)
    sq = (e * e).sum(-1)
    d = sq[x1][:, None] + sq[None, :] - 2 * e[x1] @ e.T
    beta = c * (t / (1 - t)) ** alpha
    dbeta = c * alpha * t ** (alpha - 1) / (1 - t) ** (alpha + 1)
    p = torch.softmax(-beta * d, -1)
    u = p * dbeta * (d.gather(1, xt[:, None]) - d).clamp_min(0)
    u.scatter_(1, xt[:, None], 0.0)
    rate = u.sum(-1)
    jump = torch.rand(rate.shape, generator=gen, device=rate.device) < 1 - torch.exp(-dt * rate)
    new = torch.multinomial(u[jump] / rate[jump, None], 1, generator=gen).squeeze(1)
    out = xt.clone()
    out[jump] = new
    return out.reshape(x_t.shape)


def ours_step(logits, x_t, emb, t, dt, alpha, c, gen):
    from udm_grpo.diffusion.categorical import sample_logits
    from udm_grpo.diffusion.paths import MetricPath

    path = MetricPath(emb, alpha=alpha, c=c)
    x1 = sample_logits(logits, gen)
    return path.jump(x_t, x1, t, dt, gen)


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def run_one(variant: str, args) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.batch, args.tokens, args.K, generator=gen, device=device) * 3
    x_t = torch.randint(0, args.K, (args.batch, args.tokens), generator=gen, device=device)
    emb = torch.randn(args.K, args.dim, generator=gen, device=device)
    fn = naive_step if variant == "naive" else ours_step
    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS counter
            base = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        fn(logits, x_t, emb, 0.3, 0.05, 0.9, 3.0, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
        times.append(time.perf_counter() - start)
    return {"variant": variant, "seconds": min(times), "peak_extra_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variant", choices=["naive", "ours"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_one(args.variant, args)))
        return
    results = {}
    for variant in ("naive", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print(f"metric-path step, K={args.K}, {args.batch} x {args.tokens} tokens, device={args.device}")
    for v, r in results.items():
        print(f"  {v:6s} time {r['seconds']:.3f} s   peak extra memory {r['peak_extra_bytes'] / gib:.3f} GiB")
    n, o = results["naive"], results["ours"]
    print(f"  memory ratio ours/naive = {o['peak_extra_bytes'] / n['peak_extra_bytes']:.3f} (target <= 0.25)")
    print(f"  time ratio   ours/naive = {o['seconds'] / n['seconds']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
