"""Packing: how many of the processed tokens are useful, how many steps an epoch takes, how long packing takes.

Data: the 50,000 (height, width) pairs of benchmarks/assets/imagenet_like_sizes.csv at stride 32
(DC-AE f32, patch 1): 1 to 4,060 tokens an image, 170 on average. Budgets: 4,096 and 16,384
tokens a step (``--quick``: 4,096 only).

Methods (``nit_model.packing`` unless said otherwise):
  lpfhp          longest-pack-first histogram packing (best fit; the NiT paper's choice): ``pack_lpfhp``
  ffd            first-fit decreasing: ``pack_ffd``
  pad-random-k   random batches of a fixed k images, each padded to its longest image, with
                 k = budget // mean length (a batch of average images would fill the budget); such
                 a batch processes k * longest tokens, often more than the budget (the share of
                 batches above it is in the row's remark). Written here.
  pad-budget     padding to the longest in random order, a batch closed when one more image would
                 push n * longest over the budget: ``padding_stats(seed=0)``
  pad-sorted     the same over length-sorted images (length-grouped batching): ``padding_stats(sort_by_length=True)``
  buckets-pow2   fixed-shape buckets: each image padded to the next power of two, budget // L images
                 of bucket L a batch: ``bucket_stats``
Efficiency is useful tokens / processed tokens: a pack processes its budget (the unused tail is
waste), a padded batch n * longest, a bucket batch (budget // L) * L. ``batches`` is the number of
steps an epoch takes. The time is the median wall time of a whole packing of the 50,000 sizes
(pure Python/NumPy on one core); the packs themselves are checked (every image in exactly one
pack, none over the budget) before anything is recorded.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .harness import RunContext, RunOptions, Suite, _stats, describe_error, load_average, register, time_calls

__all__ = ["PackingSuite", "padding_fixed_k", "BUDGETS"]

BUDGETS = (4096, 16384)
STRIDE = 32


def padding_fixed_k(lengths, k: int, *, seed: int = 0):
    """Random batches of k items (the last may be short), each padded to its longest item.

    Returns (num_batches, useful tokens, processed tokens, largest processed tokens of a batch,
    processed tokens of every batch as int64 [num_batches]).
    """
    from nit_model.packing import PackingStats

    arr = np.asarray(lengths, dtype=np.int64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.random.default_rng(seed).permutation(len(arr))
    pad = -len(arr) % k
    rows = np.concatenate([arr[order], np.zeros(pad, dtype=np.int64)]).reshape(-1, k)
    counts = np.full(len(rows), k, dtype=np.int64)
    counts[-1] = k - pad
    per_batch = counts * rows.max(axis=1)
    stats = PackingStats(f"pad-random-k (k={k})", 0, len(arr), len(rows), int(arr.sum()), int(per_batch.sum()))
    return stats, per_batch


def _check_packing(p, n_items: int, budget: int) -> str:
    """Every index in exactly one pack, no pack above the budget; raises AssertionError otherwise."""
    seen = np.concatenate(p.packs) if p.packs else np.zeros(0, dtype=np.int64)
    if len(seen) != n_items or len(np.unique(seen)) != n_items:
        raise AssertionError(f"{len(seen)} slots for {n_items} images ({len(np.unique(seen))} distinct)")
    fills = p.fills
    if fills.max() > budget:
        raise AssertionError(f"a pack holds {int(fills.max())} tokens, above the budget {budget}")
    return f"ok: {n_items} images each in exactly one of {len(p.packs)} packs, fullest {int(fills.max())} <= {budget}"


class PackingSuite(Suite):
    name = "packing"
    description = ("LPFHP vs first-fit decreasing vs padding to the longest vs power-of-two buckets on the "
                   "ImageNet-like sizes: efficiency (useful / processed tokens), batches an epoch, packing time")

    method_names = ("lpfhp", "ffd", "pad-random-k", "pad-budget", "pad-sorted", "buckets-pow2")

    def budgets(self, opts: RunOptions) -> tuple:
        return BUDGETS[:1] if opts.quick else BUDGETS

    def methods(self, lengths: np.ndarray, budget: int) -> dict[str, Callable[[], tuple]]:
        """name -> packer() returning (PackingStats, check text, remark)."""
        from nit_model import packing

        n = len(lengths)
        k = max(1, budget // int(round(float(lengths.mean()))))

        def packed(method):
            def run():
                p = packing.pack(lengths, budget, method)
                return p.stats(), _check_packing(p, n, budget), ""
            return run

        def fixed_k():
            st, per_batch = padding_fixed_k(lengths, k)
            over = float((per_batch > budget).mean())
            return (st, f"ok: {n} images in {st.num_batches} batches of {k}",
                    f"k={k}; {over:.0%} of the batches process more than the budget (largest "
                    f"{int(per_batch.max())} tokens)")

        def stats(fn, **kw):
            def run():
                st = fn(lengths, budget, **kw)
                if st.num_items != n or st.processed_tokens < st.useful_tokens:
                    raise AssertionError(f"{st.num_items} items, {st.processed_tokens} processed < "
                                         f"{st.useful_tokens} useful")
                return st, f"ok: {n} images in {st.num_batches} batches", ""
            return run

        return {"lpfhp": packed("lpfhp"), "ffd": packed("ffd"), "pad-random-k": fixed_k,
                "pad-budget": stats(packing.padding_stats, seed=0),
                "pad-sorted": stats(packing.padding_stats, seed=0, sort_by_length=True),
                "buckets-pow2": stats(packing.bucket_stats)}

    def listing(self, opts):
        lines = [f"{self.name}: {self.description}"]
        lines += [f"  workload imagenet-50k/budget-{b}" for b in self.budgets(opts)]
        lines += [f"  method {m}" for m in self.method_names]
        return lines

    @staticmethod
    def lengths() -> np.ndarray:
        """Tokens of every image of the ImageNet-like table at stride 32, int64 [50000]."""
        from nit_model.packing import token_lengths
        from .workloads import imagenet_like_sizes_px

        return token_lengths(imagenet_like_sizes_px(), STRIDE)

    def run(self, ctx: RunContext):
        opts = ctx.opts
        lengths = self.lengths()
        for budget in self.budgets(opts):
            wl = f"imagenet-50k/budget-{budget}"
            config = (f"{len(lengths)} images, {int(lengths.sum())} tokens (1..{int(lengths.max())}, mean "
                      f"{lengths.mean():.0f}) at stride {STRIDE}; budget {budget} tokens")
            rows = []
            for name, packer in self.methods(lengths, budget).items():
                if not opts.wants(self.name, wl, name):
                    continue
                rows.append(self.measure(name, packer, wl, config, opts))
            if rows:
                load = load_average()
                yield [dict(r, load_avg=load) for r in rows]

    @staticmethod
    def measure(name: str, packer: Callable[[], tuple], workload: str, config: str, opts: RunOptions) -> dict:
        row = {"suite": "packing", "workload": workload, "config": config, "device": "cpu", "dtype": "int64",
               "provider": name, "pass": "pack"}
        t0 = time.perf_counter()
        try:
            st, check, remark = packer()
        except AssertionError as e:
            return dict(row, status="mismatch", check=f"FAILED: {e}", reason="the packing is invalid; not timed")
        except Exception as e:
            return dict(row, status="error", reason=describe_error(e))
        setup_s = time.perf_counter() - t0
        times = time_calls(lambda _: packer(), None, torch.device("cpu"), opts)
        return dict(row, status="ok", check=check, reason=remark, setup_s=setup_s, **_stats(times),
                    efficiency=st.efficiency, batches=st.num_batches,
                    padding_waste=st.processed_tokens / st.useful_tokens - 1,
                    throughput=st.num_items / (float(np.median(times)) / 1e3), unit="images/s")


register(PackingSuite())
