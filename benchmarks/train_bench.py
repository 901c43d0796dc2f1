"""Time NiT training steps on one ImageNet-like pack of random latents, through the real trainer.

    python -m benchmarks.train_bench --preset NiT-S --tokens 4096 --steps 5

The images of ``benchmarks.workloads.imagenet_like_pack(tokens)`` (DC-AE f32 token sizes) get
random 32-channel latents, written as a LatentDataset; with a token budget equal to their total
the whole dataset is one pack, so every step of ``train()`` (data, forward, backward, clipping,
AdamW, EMA) runs on that pack. The time of a step is its tokens over the tokens/s that the log
reports for it (log_every=1: the window is one step, data fetch included). The first step is
reported apart (allocator and kernel warm-up). Peak memory is the process's peak resident set
(``ru_maxrss``) during the run, next to its value before it (imports, data) for reference.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile

import torch


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench(preset: str = "NiT-S", tokens: int = 4096, steps: int = 5, threads: int | None = None, seed: int = 0,
          backend: str | None = None) -> dict:
    from nit_model.data import LatentWriter
    from nit_model.train import TrainConfig, train

    from .workloads import imagenet_like_pack

    sizes = imagenet_like_pack(tokens, seed=seed)
    total = sum(h * w for h, w in sizes)
    g = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="nit-bench-") as tmp:
        lat = os.path.join(tmp, "latents")
        with LatentWriter(lat, dtype=torch.float32, meta={"classes": [str(i) for i in range(1000)]}) as w:
            for i, (h, w_) in enumerate(sizes):
                w.add(i, torch.randn(32, h, w_, generator=g), i % 1000, f"random{i}")
        cfg = TrainConfig.from_dict({
            "model": {"preset": preset, "backend": backend},
            "data": {"kind": "latents", "path": lat, "token_budget": total, "num_workers": 0, "shuffle": False},
            "train": {"steps": steps, "log_every": 1, "ckpt_every": 10 ** 9, "keep_last": 1, "num_threads": threads,
                      "seed": seed},
        })
        rss_before = _maxrss_mb()
        r = train(cfg, out_dir=os.path.join(tmp, "run"), progress=False)
        rss_peak = _maxrss_mb()
    times = [total / row["tokens_per_s"] for row in r.history]
    rest = times[1:] or times
    q = statistics.quantiles(rest, n=5) if len(rest) >= 2 else [rest[0]] * 4
    return {"preset": preset, "images": len(sizes), "tokens": total, "max_seqlen": max(h * w for h, w in sizes),
            "threads": torch.get_num_threads(), "first_step_s": times[0], "median_step_s": statistics.median(rest),
            "p20_s": q[0], "p80_s": q[-1], "tokens_per_s": total / statistics.median(rest),
            "params": sum(p.numel() for p in r.model.parameters()), "rss_before_mb": rss_before,
            "rss_peak_mb": rss_peak, "losses": r.losses}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="NiT-S")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default=None)
    a = p.parse_args(argv)
    r = bench(a.preset, a.tokens, a.steps, a.threads, backend=a.backend)
    print(f"{r['preset']} ({r['params'] / 1e6:.1f}M params), {r['images']} images, {r['tokens']} tokens "
          f"(longest {r['max_seqlen']}), {r['threads']} threads, backend {a.backend or 'auto'}")
    print(f"training step: median {r['median_step_s']:.3f} s (p20 {r['p20_s']:.3f}, p80 {r['p80_s']:.3f}) over "
          f"{a.steps - 1} steps; first step {r['first_step_s']:.3f} s; {r['tokens_per_s']:,.0f} tokens/s")
    print(f"peak RSS {r['rss_peak_mb']:,.0f} MB (before training {r['rss_before_mb']:,.0f} MB)")


if __name__ == "__main__":
    main()
