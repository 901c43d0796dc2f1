"""Mixed-resolution packed sampling against one resolution per batch (images/s), per model size.

The same images (token sizes, labels, seeds) are sampled twice by ``nit_model.sampling``:
  packed          every image of the mix, whatever its size, in as few packs as the token budget
                  allows (the conditional and unconditional halves share the pack): one forward a
                  solver step here.
  per-resolution  one batch per size (the official NiT sampler's way): a forward per size a step.
Euler, 8 steps (``--quick``: 1), guidance scale 3 on every step (both halves evaluated), no
decoding; the two modes are timed interleaved, repetition by repetition, so that drifting machine
load hits both alike (``nit_model.sampling.benchmark_packed_vs_per_resolution``). The speed-up is
per-resolution time / packed time, measured side by side in one run.

Mixes (sizes in tokens; the demo's, ``nit_model.demo.BENCH_MIXES``):
  4-sizes      16 images over 4 sizes, 4 each: 8x8, 16x16, 8x16, 24x8 (256x256, 512x512,
               256x512, 768x256 px for a DC-AE f32 latent model; 32-96 px for tiny's 4 px patches)
  16-sizes     16 images of 16 distinct sizes from 4x4 to 16x16 tokens
Models: ``tiny`` (depth 4, D 128, 10 classes) and ``NiT-S`` (12, 384, 1000 classes), with the
weights of ``bench_step.initial_state`` (adaLN-Zero tensors drawn N(0, 0.02), so every block
contributes); ``--quick`` runs tiny only. CPU only (fp32): on a GPU machine run it with
``--device all``. Check before the figure is recorded: the two modes'
images agree (largest absolute difference at most 1e-3; packing changes no image).

On a CPU a forward costs a small fixed amount (op launches, thread wake-ups) next to its
per-token cost, so packing gains most when each size has few images (16-sizes); on a GPU the
fixed cost of a forward is larger relative to small batches (not measured here).
"""
from __future__ import annotations

import torch

from .harness import RunContext, Suite, describe_error, load_average, register

__all__ = ["SamplingSuite", "MODES"]

MODES = ("packed", "per-resolution")
MIX_NAMES = {"16 images over 4 sizes": "4-sizes", "16 images, 16 distinct sizes": "16-sizes"}
TOLERANCE = 1e-3


class SamplingSuite(Suite):
    name = "sampling"
    description = ("mixed-resolution packed sampling vs one resolution per batch on the same images "
                   "(images/s, speed-up), tiny and NiT-S")

    @staticmethod
    def models(opts) -> tuple:
        return ("tiny",) if opts.quick else ("tiny", "NiT-S")

    @staticmethod
    def mixes() -> dict:
        from nit_model.demo import BENCH_MIXES

        return {MIX_NAMES.get(k, k): v for k, v in BENCH_MIXES.items()}

    def listing(self, opts):
        lines = [f"{self.name}: {self.description}"]
        lines += [f"  workload {mix}/{m}" for m in self.models(opts) for mix in self.mixes()]
        lines += [f"  mode {m}" for m in MODES]
        return lines

    @staticmethod
    def build_model(model_name: str, seed: int) -> torch.nn.Module:
        """The preset with ``bench_step.initial_state`` weights, in eval mode, on the CPU."""
        from nit_model.model_config import NiTConfig

        from .bench_step import _nit, initial_state

        cfg = NiTConfig.from_name(model_name)
        model = _nit(cfg, None)
        model.load_state_dict(initial_state(cfg, seed))
        return model.eval()

    @staticmethod
    def steps_reps(opts) -> tuple[int, int]:
        return (1, 1) if opts.quick else (8, 5)

    def run(self, ctx: RunContext):
        from nit_model.sampling import benchmark_packed_vs_per_resolution

        opts = ctx.opts
        steps, reps = self.steps_reps(opts)
        for model_name in self.models(opts):
            model = None
            for mix, (sizes, per_size) in self.mixes().items():
                wl = f"{mix}/{model_name}"
                if not any(opts.wants(self.name, wl, m) for m in MODES):
                    continue
                if model is None and "cpu" in opts.devices:
                    model = self.build_model(model_name, opts.seed)
                sizes_txt = ", ".join(f"{h}x{w}" for h, w in sizes)
                n_img = len(sizes) * per_size
                config = (f"{n_img} images ({per_size} each of {sizes_txt} tokens), {model_name}, Euler "
                          f"{steps} step(s), CFG 3, {torch.get_num_threads()} thread(s)")
                base = {"suite": self.name, "workload": wl, "config": config, "device": "cpu", "dtype": "float32",
                        "pass": "sample", "reps": reps}
                if "cpu" not in opts.devices:
                    yield [dict(base, provider=m, status="skipped", reason="this suite runs on the CPU only "
                                "(--device cpu or all)") for m in MODES]
                    continue
                try:
                    res = benchmark_packed_vs_per_resolution(model, sizes, num_per_size=per_size, steps=steps,
                                                             cfg_scale=3.0, reps=reps, seed=opts.seed)
                except Exception as e:  # one failing workload must not end the run
                    yield [dict(base, provider=m, status="error", reason=describe_error(e)) for m in MODES]
                    continue
                yield self.rows(base, res)
            del model

    @staticmethod
    def rows(base: dict, res: dict) -> list[dict]:
        """The two CSV rows (packed, per-resolution) of one `benchmark_packed_vs_per_resolution` result."""
        diff = res["max_abs_diff"]
        ok = diff <= TOLERANCE
        check = (f"{'ok' if ok else 'FAILED'}: largest |packed - per-resolution| over the images {diff:.1e} "
                 f"({'<=' if ok else '>'} {TOLERANCE:g})")
        load = load_average()
        rows = []
        for mode, key in (("packed", "packed"), ("per-resolution", "per_resolution")):
            r = res[key]
            row = dict(base, provider=mode, status="ok" if ok else "mismatch", check=check, load_avg=load,
                       reason=f"{r['forwards']} forwards in {r['packs']} pack(s)")
            if ok:  # a figure is recorded only for images that agree
                row.update(median_ms=1e3 * r["median_s"], p20_ms=1e3 * r["p20_s"], p80_ms=1e3 * r["p80_s"],
                           throughput=r["images_per_s"], unit="images/s")
                if mode == "packed":
                    row.update(speedup_vs_best_peer=res["speedup"], best_peer="per-resolution")
            rows.append(row)
        return rows


register(SamplingSuite())
