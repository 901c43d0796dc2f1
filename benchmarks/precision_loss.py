"""bf16 against fp32 training on tiny-shapes: the loss at the same step count, same data and seeds.

    python -m benchmarks.precision_loss --steps 600 --window 100

Trains the demo's tiny model (``configs/tiny-shapes.yaml``, 1,024-token packs, warm-up a fifth of
the run at most, as ``nit demo`` does) twice from the same seed: ``train.precision=fp32`` and
``train.precision=bf16`` (autocast, fp32 master weights, AdamW and EMA). Flow-matching losses are
noisy from step to step (the timestep of each image is drawn at random), so the comparison is of
mean losses over windows of steps: per window, the mean loss of each run and the relative gap
(bf16 - fp32) / fp32. Prints a markdown table; the figure that matters is the last window.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch


def train_losses(precision: str, steps: int, seed: int, out_dir: str, threads: int | None) -> list:
    from nit_model.train import TrainConfig, train

    overrides = [f"train.steps={steps}", f"train.ckpt_every={steps}", "train.keep_last=1", f"train.seed={seed}",
                 "data.token_budget=1024", "train.log_every=1", f"train.precision={precision}"]
    if threads:
        overrides.append(f"train.num_threads={threads}")
    cfg = TrainConfig.from_yaml("tiny-shapes", overrides=overrides)
    if cfg.optim.warmup_steps > steps // 5:
        cfg = cfg.replace(optim={"warmup_steps": max(1, steps // 5)})
    return list(train(cfg, out_dir=out_dir, progress=False, overwrite=True).losses)


def windows(losses: dict, window: int) -> list:
    """[(first step, last step, fp32 mean, bf16 mean, relative gap)] over consecutive windows."""
    n = min(len(v) for v in losses.values())
    rows = []
    for a in range(0, n - window + 1, window):
        m = {p: sum(v[a:a + window]) / window for p, v in losses.items()}
        rows.append((a + 1, a + window, m["fp32"], m["bf16"], (m["bf16"] - m["fp32"]) / m["fp32"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--window", type=int, default=100, help="steps per averaged window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if not 1 <= a.window <= a.steps:
        raise SystemExit(f"--window must be between 1 and --steps ({a.steps}); got {a.window}")
    from nit_model.precision import check_precision
    check_precision("bf16", "cpu", where="bf16 training")
    with tempfile.TemporaryDirectory(prefix="nit-precision-") as tmp:
        losses = {prec: train_losses(prec, a.steps, a.seed, os.path.join(tmp, prec), a.threads)
                  for prec in ("fp32", "bf16")}
    print(f"tiny-shapes, {a.steps} steps, seed {a.seed}, torch {torch.__version__}")
    print("| steps | fp32 mean loss | bf16 mean loss | bf16 vs fp32 |")
    print("|---|---|---|---|")
    for s0, s1, f, b, gap in windows(losses, a.window):
        print(f"| {s0}-{s1} | {f:.4f} | {b:.4f} | {100 * gap:+.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
