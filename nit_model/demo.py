"""`nit demo`: the whole method on a CPU in a few minutes, written up in runs/demo/REPORT.md.

1. Train the tiny NiT (the tiny-shapes recipe) on the shapes data at native resolutions (white
   shapes on black, sides 16-64 px, aspect ratios up to 3:1, token-budget packs) and, with the
   same number of steps and tokens per step, a baseline trained only at one fixed size (32x32),
   the way a fixed-resolution DiT sees its data.
2. Sample one mixed pack of seen and unseen sizes from both (same seeds): contact sheets, PNGs
   and ADM-format .npz files.
3. Evaluate both per resolution with the shapes judge (`nit_model.evaluate`): class accuracy and
   Fréchet distance of judge features, over seen sizes, larger unseen sizes and 1:3 / 3:1 / 1:4
   aspect ratios: the CPU-scale analogue of the NiT paper's FID-per-resolution table.
4. Measure throughput: training tokens/s, sampling images/s, and packed mixed-resolution
   sampling against one resolution per batch on the same images.
5. Write REPORT.md (table, contact sheets, loss curves, figures) and results.json.

``--quick`` runs the same pipeline at toy scale in seconds (what the tests run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Optional

import numpy as np

__all__ = ["DemoSettings", "QUICK", "run_demo", "add_demo_arguments", "main_demo"]

# sizes of the showcase pack (pixels, H x W): seen by the native run, then unseen
SHOWCASE_SIZES = [(32, 32), (64, 64), (32, 64), (64, 32), (16, 48), (48, 16),
                  (96, 96), (128, 128), (32, 96), (96, 32), (16, 64), (64, 16)]
# the packed-vs-per-resolution measurements (sizes in tokens): 16 images over 4 sizes (4 each), and
# 16 images of 16 distinct sizes (as native-resolution requests tend to be; 16-64 px at patch 4)
BENCH_MIXES = {
    "16 images over 4 sizes": ([(8, 8), (16, 16), (8, 16), (24, 8)], 4),
    "16 images, 16 distinct sizes": ([(4, 4), (4, 8), (8, 4), (6, 6), (6, 12), (12, 6), (8, 8), (8, 12), (12, 8),
                                      (10, 10), (8, 16), (16, 8), (12, 12), (12, 16), (16, 12), (16, 16)], 1),
}


@dataclasses.dataclass
class DemoSettings:
    """Knobs of the demo (the command-line options carry the same names)."""

    out: str = os.path.join("runs", "demo")
    train_steps: int = 2400
    palette: Optional[str] = None
    baseline: bool = True
    baseline_size: int = 32
    token_budget: int = 1024
    sample_steps: int = 24
    sample_num: int = 2
    cfg_scale: float = 3.0
    # guidance only for t >= 0.3 (t = 1 is noise): the class is decided early; on the demo's native
    # model guidance below 0.3 changed neither accuracy nor FD, and skipping it halves those forwards
    cfg_interval: tuple = (0.3, 1.0)
    eval_num: int = 12
    # 8 Euler steps judge as 16 or 32 do on the demo's native model (24 samples per size: seen / unseen
    # accuracy 46% / 44%, 45% / 41%, 42% / 42%; Heun at 8 steps 47% / 44%): half the evaluation's forwards
    eval_steps: int = 8
    eval_cfg_scale: float = 3.0
    num_real: int = 256
    eval_sizes: Optional[list] = None
    bench_reps: int = 3
    bench_steps: int = 8
    classifier_steps: int = 300
    # RoPE methods compared at the unseen sizes (nit_model.rope_scaling); the first one fills the main table
    # (auto = yarn beyond the trained sides); `nit eval --rope-methods` compares any others
    rope_methods: tuple = ("auto", "normal", "linear")
    # precision of both training runs and of all sampling: "auto" is bf16 autocast where the CPU has
    # AMX-BF16 (measured faster per step for the tiny model there), else fp32; see demo_precision
    precision: str = "auto"
    threads: Optional[int] = None
    seed: int = 0
    progress: bool = True
    quick: bool = False


QUICK = dict(train_steps=6, sample_steps=2, sample_num=1, eval_num=2, eval_steps=2, num_real=8,
             eval_sizes=[(32, 32), (16, 48), (64, 64), (96, 96)], bench_reps=1, bench_steps=2, classifier_steps=8,
             rope_methods=("auto", "normal", "yarn"))


def _busy_cores(window: float = 0.5) -> float:
    """Cores kept busy by other processes now: the non-idle share of /proc/stat's CPU time over a
    short window (this process sleeps through it), times the core count. Where /proc/stat is
    absent, the 1-minute load average, which also counts work that has just ended (a build)."""
    def snapshot():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals), idle
    try:
        total0, idle0 = snapshot()
        time.sleep(window)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    dt = total1 - total0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / dt) if dt > 0 else 0.0


def auto_threads() -> int:
    """Threads for this run: every core torch would use, less those other processes keep busy.
    On a shared machine, OpenMP threads that wait on each other make small-model steps many times
    slower than one thread."""
    import torch
    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), int(round(cores - _busy_cores()))))


def demo_precision(setting: str = "auto") -> tuple[str, str]:
    """(precision, reason) of the demo's training and sampling on the CPU. "auto": "bf16" where the
    CPU has AMX-BF16 tiles (there a tiny-shapes step under bf16 autocast is faster than in fp32),
    else "fp32" (AVX512-BF16 alone or emulated bf16 does not pay off for a model this small);
    "fp32" / "bf16" as given (bf16 checked to run on this CPU)."""
    from .precision import bf16_support, check_precision, cpu_bf16_flags
    if setting != "auto":
        return check_precision(setting, "cpu", where="--precision"), "chosen with --precision"
    _, _, why = bf16_support("cpu")
    if "amx_bf16" in cpu_bf16_flags():
        return "bf16", (f"{why}: bf16 autocast (fp32 weights, optimizer and EMA) makes a training step and a "
                        "sampling forward of the tiny model faster than fp32 there")
    return "fp32", f"{why}; without AMX tiles bf16 does not speed up a model this small, so fp32"


def _train(name: str, settings: DemoSettings, extra: list, threads: int, precision: str = "fp32"):
    from .train import TrainConfig, train
    s = settings
    overrides = [f"train.steps={s.train_steps}", f"train.ckpt_every={s.train_steps}", "train.keep_last=1",
                 f"train.num_threads={threads}", f"train.seed={s.seed}", f"data.token_budget={s.token_budget}",
                 f"train.log_every={1 if s.quick else 10}", f"train.precision={precision}"] + extra
    if s.palette:
        overrides.append(f"data.shapes_palette={s.palette}")
    cfg = TrainConfig.from_yaml("tiny-shapes", overrides=overrides)
    if cfg.optim.warmup_steps > s.train_steps // 5:  # a short run warms up for at most a fifth of it
        cfg = cfg.replace(optim={"warmup_steps": max(1, s.train_steps // 5)})
    if s.progress:
        print(f"[demo] training {name}: {s.train_steps} steps of {s.token_budget}-token packs "
              f"({cfg.data.min_side}-{cfg.data.max_side} px, aspect <= {cfg.data.max_aspect:g}, "
              f"{cfg.data.shapes_palette} palette)", flush=True)
    return train(cfg, out_dir=os.path.join(s.out, name), progress=s.progress, overwrite=True)


def _fmt_sizes(sizes, seen_fn) -> str:
    return ", ".join(f"{h}x{w}" + ("" if seen_fn((h, w)) else "*") for h, w in sizes)


def run_demo(settings: DemoSettings) -> dict:
    """Run the demo; returns the results dict also written to <out>/results.json."""
    import torch

    from .evaluate import (DEFAULT_EVAL_SIZES, evaluate_models, markdown_table, method_summary, method_table,
                           seen_in_training)
    from .report import plot_loss, save_samples, write_text
    from .sampling import benchmark_packed_vs_per_resolution, load_sampling_model, sample
    from .shapes_eval import ClassifierConfig, load_or_train_classifier

    s = settings
    t_start = time.perf_counter()
    threads = s.threads or auto_threads()
    torch.set_num_threads(threads)
    os.makedirs(s.out, exist_ok=True)
    precision, precision_why = demo_precision(s.precision)
    if s.progress:
        print(f"[demo] precision {precision}: {precision_why}", flush=True)
    timings = {}

    # 1. training
    runs = {"native": _train("native", s, [], threads, precision)}
    if s.baseline:
        b = s.baseline_size
        runs["fixed"] = _train("fixed", s, [f"data.min_side={b}", f"data.max_side={b}", "data.max_aspect=1.0"],
                               threads, precision)
    timings["train_s"] = time.perf_counter() - t_start
    models = {name: load_sampling_model(r.checkpoint) for name, r in runs.items()}
    seen = {n: (lambda size, tc=sm.train_config: bool(seen_in_training(size, tc))) for n, sm in models.items()}
    loss_png = plot_loss({n: (r.loss_steps, r.losses) for n, r in runs.items()}, os.path.join(s.out, "loss.png"),
                         smooth=1 if s.quick else 10)

    # 2. the judge
    t0 = time.perf_counter()
    ccfg = ClassifierConfig(steps=s.classifier_steps, palette=runs["native"].config.data.shapes_palette)
    if s.progress:
        print("[demo] shapes classifier (the judge): trained once, cached under "
              f"{os.path.join(s.out, 'cache')}", flush=True)
    judge = load_or_train_classifier(os.path.join(s.out, "cache"), ccfg, progress=s.progress)
    timings["judge_s"] = time.perf_counter() - t0

    # 3. a mixed pack of seen and unseen sizes, from every model with the same seeds
    t0 = time.perf_counter()
    show_sizes = SHOWCASE_SIZES[:4] if s.quick else SHOWCASE_SIZES
    samples = {}
    for name, sm in models.items():
        if s.progress:
            print(f"[demo] sampling {name}: {s.sample_num} images at each of {len(show_sizes)} sizes in shared packs",
                  flush=True)
        res = sample(sm, show_sizes, num=s.sample_num, steps=s.sample_steps, cfg_scale=s.cfg_scale,
                     cfg_interval=s.cfg_interval, seed=s.seed, progress=s.progress, precision=precision)
        files = save_samples(res, os.path.join(s.out, "samples", name), class_names=sm.class_names)
        samples[name] = {"stats": res.stats, "contact_sheet": os.path.relpath(files["contact_sheet"], s.out),
                         "npz": [os.path.relpath(p, s.out) for p in files["npz"]], "npz_note": files["note"]}
    timings["showcase_s"] = time.perf_counter() - t0

    # 4. per-resolution evaluation
    t0 = time.perf_counter()
    if s.progress:
        print("[demo] evaluating per resolution", flush=True)
    report = evaluate_models(models, s.eval_sizes or DEFAULT_EVAL_SIZES, num=s.eval_num, steps=s.eval_steps,
                             cfg_scale=s.eval_cfg_scale, cfg_interval=s.cfg_interval, seed=s.seed,
                             num_real=s.num_real, classifier=judge, classifier_config=ccfg, progress=s.progress,
                             # the baseline: the same sampler as the native model's main column
                             rope_methods={n: list(s.rope_methods) if n == "native" else [s.rope_methods[0]]
                                           for n in models},
                             precision=precision, keep_images=s.sample_num)
    table = markdown_table(report)
    timings["eval_s"] = time.perf_counter() - t0

    # 4b. the evaluation's first samples at its unseen sizes, one contact-sheet row per RoPE method
    t0 = time.perf_counter()
    rope_rows = _rope_rows(s, report, [(r["height"], r["width"]) for r in report.rows if not r["native"]["seen"]])
    timings["rope_rows_s"] = time.perf_counter() - t0

    # 5. packed vs one resolution per batch, on the native model
    t0 = time.perf_counter()
    if s.progress:
        print("[demo] timing packed mixed-resolution sampling against one resolution per batch", flush=True)
    bench = {name: benchmark_packed_vs_per_resolution(models["native"].model, sizes, num_per_size=per_size,
                                                      steps=s.bench_steps, cfg_scale=s.cfg_scale, reps=s.bench_reps,
                                                      seed=s.seed)
             for name, (sizes, per_size) in BENCH_MIXES.items()}
    timings["bench_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    results = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
        "threads": threads, "machine": _machine(threads), "precision": precision, "precision_reason": precision_why,
        "train": {n: {"steps": r.step, "tokens": r.tokens, "tokens_per_s": r.tokens_per_s, "wall_s": r.wall_time,
                      "loss_first": _mean(r.losses[:10]), "loss_last": _mean(r.losses[-10:]),
                      "checkpoint": os.path.relpath(r.checkpoint, s.out)} for n, r in runs.items()},
        "samples": samples, "eval": dataclasses.asdict(report), "eval_summary": report.summary(),
        "rope": {"summary": method_summary(report), "rows": rope_rows},
        "bench": bench, "timings": timings, "loss_png": os.path.relpath(loss_png, s.out),
    }
    write_text(os.path.join(s.out, "results.json"), json.dumps(results, indent=1, default=str))
    write_text(os.path.join(s.out, "REPORT.md"), _report_md(results, table, runs, show_sizes, seen["native"],
                                                            method_table(report)))
    return results


def _rope_rows(s: DemoSettings, report, sizes) -> list:
    """One contact sheet (a single row) per RoPE method of the native model's evaluation samples at
    the sizes it did not train on (the first `sample_num` of each size, kept by the evaluation: same
    seeds for every method, nothing sampled again): [{method, contact_sheet}]."""
    from .report import contact_sheet
    from .rope_scaling import AUTO_METHOD
    from .sampling import to_uint8
    out = []
    for method in s.rope_methods:
        if method == "auto" and AUTO_METHOD in s.rope_methods:
            continue  # auto repeats its method's images at the unseen sizes
        imgs = [to_uint8(im) for hw in sizes for im in report.images.get(("native", method, hw), [])]
        if not imgs:
            continue
        width = sum(im.shape[1] + 4 for im in imgs) + 4
        path = contact_sheet(imgs, os.path.join(s.out, "samples", "rope", f"{method}.png"), max_width=width, scale=2)
        label = f"auto ({AUTO_METHOD} beyond the trained sides)" if method == "auto" else method
        out.append({"method": label, "contact_sheet": os.path.relpath(path, s.out)})
    return out


def _mean(v) -> float:
    return float(sum(v) / len(v)) if v else float("nan")


def _machine(threads: int) -> str:
    import torch
    return (f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _group_means(rows, names, keep) -> dict:
    sel = [r for r in rows if keep(r)]
    return {n: (float(np.mean([r[n]["frechet"] for r in sel])), float(np.mean([r[n]["accuracy"] for r in sel])))
            for n in names} if sel else {}


def _verdict(rows: list) -> str:
    """Native vs fixed on the sizes only the native run saw, and on the sizes neither saw."""
    if not rows or "fixed" not in rows[0] or "native" not in rows[0]:
        return ""
    out = []
    for what, keep in (("sizes only the native run trained on", lambda r: r["native"]["seen"] and not r["fixed"]["seen"]),
                       ("sizes neither run trained on", lambda r: not r["native"]["seen"] and not r["fixed"]["seen"])):
        m = _group_means(rows, ("native", "fixed"), keep)
        if not m:
            continue
        (fn, an), (ff, af) = m["native"], m["fixed"]
        n = sum(1 for r in rows if keep(r))
        out.append(f"On the {n} {what}, the native-resolution model {'beats' if fn < ff else 'does not beat'} the "
                   f"fixed-size baseline: mean FD {fn:.2f} vs {ff:.2f} (lower is better), mean accuracy {an:.0%} vs "
                   f"{af:.0%}.")
    return " ".join(out)


def _report_md(r: dict, table: str, runs: dict, show_sizes, seen_native, rope_table: str = "") -> str:
    s, t, b = r["settings"], r["timings"], r["bench"]
    iv = ",".join(f"{v:g}" for v in s["cfg_interval"])
    lines = ["# NiT demo: tiny NiT on shapes at native resolutions", "",
             f"Made by `nit demo{' --quick' if s['quick'] else ''}` in {t['total_s'] / 60:.1f} min on {r['machine']}.",
             "", "## Training", "",
             "| run | data | steps | tokens | loss (first 10 steps -> last 10) | train tokens/s | wall |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        d = run.config.data
        data = (f"native sizes {d.min_side}-{d.max_side} px, aspect <= {d.max_aspect:g}" if name == "native"
                else f"fixed {d.min_side}x{d.max_side} only")
        tr = r["train"][name]
        lines.append(f"| {name} | {data} | {tr['steps']} | {tr['tokens']:,} | {tr['loss_first']:.3f} -> "
                     f"{tr['loss_last']:.3f} | {tr['tokens_per_s']:,.0f} | {tr['wall_s']:.0f} s |")
    c = next(iter(runs.values())).config
    nc = c.nit_config()
    lines += ["", f"Both runs: the `{c.model.preset}` preset ({nc.depth} blocks, width {nc.hidden_size}, "
                  f"{nc.patch_size}x{nc.patch_size} RGB patches), shapes in the "
                  f"{c.data.shapes_palette} palette, packs of {s['token_budget']} tokens, the same number of steps, so "
                  f"the same compute; AdamW at lr {c.optim.lr:g} ({c.optim.schedule} schedule after "
                  f"{c.optim.warmup_steps} warm-up steps), t = sigmoid({c.flow.mu:g} + {c.flow.sigma:g} N(0, 1)), "
                  f"EMA {c.ema.decay:g}; samples come from the EMA weights.", "",
              f"Precision of training and sampling: **{r['precision']}** ({r['precision_reason']}).", "",
              "![loss curves](loss.png)", "", "## Samples: one mixed pack of seen and unseen sizes", "",
              f"Sizes (H x W px; * = not seen by the native run): {_fmt_sizes(show_sizes, seen_native)}. "
              f"{s['sample_num']} image(s) per size, Euler, {s['sample_steps']} steps, CFG {s['cfg_scale']:g} on t in "
              f"{list(s['cfg_interval'])}, seed {s['seed']}; the models share seeds, so the same cell starts from the "
              "same noise.", ""]
    for name, sm in r["samples"].items():
        st = sm["stats"]
        lines += [f"**{name}**: {st['images']} images in {st['packs']} pack(s), {st['forwards']} forwards, "
                  f"{st['images_per_s']:.2f} images/s", "", f"![{name} samples]({sm['contact_sheet']})", ""]
    first = next(iter(r["samples"].values()))
    lines += [f"Files: PNGs under `samples/<run>/images/`; {first['npz_note']} "
              f"(`samples/<run>/samples_<N>x<H>x<W>x3.npz`, `arr_0` uint8 [N, H, W, 3], `arr_1` labels).", "",
              "## Per-resolution evaluation", "",
              "Accuracy: share of samples the shapes judge assigns to their conditioning class. FD: Fréchet distance "
              "between judge features of samples and of real images of that size (lower is better); the "
              "real-vs-real floor is what a perfect model scores with this many samples.", "", table, ""]
    v = _verdict(r["eval"]["rows"])
    if v:
        lines += ["**" + v + "**", ""]
    lines += _rope_md(r, rope_table)
    lines += ["## Throughput", "", "| figure | value |", "|---|---|"]
    for name in runs:
        lines.append(f"| training, {name} (tokens/s) | {r['train'][name]['tokens_per_s']:,.0f} |")
    for name, info in r["eval"]["models"].items():
        lines.append(f"| sampling for the evaluation, {name} (images/s; {info['images']} images, "
                     f"{s['eval_steps']} steps, {info['packs']} packs) | {info['images_per_s']:.2f} |")
    lines += ["", "Packed mixed-resolution sampling against one resolution per batch (the official way), same "
                  "images, same seeds, native model, no decoding:", "",
              "| mix | packed: forwards | images/s | one size per batch: forwards | images/s | speed-up |",
              "|---|---|---|---|---|---|"]
    for mix, bm in b.items():
        pk, pr = bm["packed"], bm["per_resolution"]
        lines.append(f"| {mix} ({bm['tokens']} tokens, {bm['steps']} steps, CFG {bm['cfg_scale']:g}) | "
                     f"{pk['forwards']} | {pk['images_per_s']:.2f} | {pr['forwards']} | {pr['images_per_s']:.2f} | "
                     f"**{bm['speedup']:.2f}x** |")
    diff = max(bm["max_abs_diff"] for bm in b.values())
    lines += ["", f"Medians of {s['bench_reps']} interleaved repetitions. Largest difference between the two modes' "
                  f"outputs: {diff:.1e} (packing changes no image). On a CPU a forward costs a fixed few "
                  "milliseconds plus a per-token cost; packing saves the fixed part of every forward it removes, so it "
                  "pays most when each size has few images.", "",
              "## Time", "",
              f"training {t['train_s']:.0f} s, judge {t['judge_s']:.0f} s, samples {t['showcase_s']:.0f} s, "
              f"evaluation {t['eval_s']:.0f} s, RoPE rows {t.get('rope_rows_s', 0):.0f} s, throughput "
              f"{t['bench_s']:.0f} s; total {t['total_s']:.0f} s.", "",
              "## Again, by hand", "", "```",
              f"nit sample --ckpt {os.path.join(s['out'], 'native')} --sizes 32x32,64x64,32x96,128x128 --num 4 "
              f"--steps 24 --cfg-scale 3 --cfg-interval {iv} --out {os.path.join(s['out'], 'more')}",
              f"nit eval --ckpt native={os.path.join(s['out'], 'native')} "
              f"--baseline-ckpt {os.path.join(s['out'], 'fixed')} --num 32 --steps {s['eval_steps']} "
              f"--cfg-scale {s['eval_cfg_scale']:g} --cfg-interval {iv} "
              f"--rope-methods {','.join(s['rope_methods'])}",
              "```", ""]
    return "\n".join(lines)


def _rope_md(r: dict, rope_table: str) -> list:
    """The RoPE section: the per-method table and one contact-sheet row per method."""
    from .rope_scaling import AUTO_METHOD
    if not rope_table:
        return []
    best = r["rope"]["summary"]["best"]
    lines = ["## RoPE scaling at the unseen sizes", "",
             "Beyond the largest trained side (16 tokens) the sampler rescales each image's RoPE frequencies "
             "with the dynamic scale of NiT (Wang et al. 2025; FiT, Wang et al. 2024): position interpolation "
             "(`linear`, Chen et al. 2023), NTK-aware (bloc97 2023), NTK-by-parts and YaRN (Peng et al. 2023). "
             f"`auto` (the default of `nit sample` and `nit eval`) keeps the trained angles within the trained "
             f"sides and uses `{AUTO_METHOD}` beyond them; `normal` keeps the trained angles everywhere. Sizes "
             "whose images get the same table under two methods are sampled once, so their cells repeat.", "",
             rope_table, ""]
    if best:
        lines += ["Best method at the unseen sizes: " + ", ".join(f"{n}: `{m}`" for n, m in best.items()) + ".", ""]
    if r["rope"]["rows"]:
        s = r["settings"]
        lines += [f"The native model's first {min(s['sample_num'], s['eval_num'])} evaluation samples at each unseen "
                  f"size, one row per method (the same seeds for every method, {s['eval_steps']} steps, CFG "
                  f"{s['eval_cfg_scale']:g}; shown at 2x):", ""]
        for row in r["rope"]["rows"]:
            lines += [f"**{row['method']}**", "", f"![{row['method']}]({row['contact_sheet']})", ""]
    return lines


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    p.add_argument("--out", default=d.out, help="folder for the runs, samples and REPORT.md")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help="optimizer steps of each training run (native and baseline alike)")
    p.add_argument("--no-baseline", action="store_true", help="skip the fixed-size baseline (about halves the time)")
    p.add_argument("--baseline-size", type=int, default=d.baseline_size,
                   help="the baseline trains only on BASELINE_SIZE x BASELINE_SIZE images (pixels)")
    p.add_argument("--token-budget", type=int, default=d.token_budget, help="tokens per training pack")
    p.add_argument("--palette", choices=("mono", "colour"), default=None,
                   help="shapes drawn white on black (mono, the tiny-shapes default: learnt in the demo's budget) or "
                        "in random colours on gradient backgrounds (colour: harder, needs longer training)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="solver steps of the showcase samples")
    p.add_argument("--sample-num", type=int, default=d.sample_num, help="showcase images per size")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                   help="guidance scale of the showcase samples and of the packing measurement")
    p.add_argument("--cfg-interval", default=",".join(f"{v:g}" for v in d.cfg_interval), metavar="LOW,HIGH",
                   help="guidance only for t in [LOW, HIGH] (t = 1 is noise), for every sample of the demo")
    p.add_argument("--eval-num", type=int, default=d.eval_num, help="samples per size and model for the evaluation")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="solver steps for the evaluation samples")
    p.add_argument("--eval-cfg-scale", type=float, default=d.eval_cfg_scale,
                   help="guidance scale of the evaluation samples (1: none)")
    p.add_argument("--num-real", type=int, default=d.num_real, help="real images per size for the FD reference")
    p.add_argument("--bench-reps", type=int, default=d.bench_reps, help="repetitions of the packing measurement")
    p.add_argument("--rope-methods", default=",".join(d.rope_methods), metavar="M1,M2,...",
                   help="RoPE methods compared at the unseen sizes (the first fills the main table)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="training and sampling precision (auto: bf16 autocast where the CPU has AMX-BF16, else fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores not kept busy by other processes, at least 1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true",
                   help="toy scale, seconds long: a few training steps, two evaluation images per size (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args) -> DemoSettings:
    from .rope_scaling import parse_rope_methods
    s = DemoSettings(out=args.out, train_steps=args.train_steps, baseline=not args.no_baseline,
                     baseline_size=args.baseline_size, token_budget=args.token_budget, palette=args.palette,
                     sample_steps=args.sample_steps,
                     sample_num=args.sample_num, cfg_scale=args.cfg_scale, eval_num=args.eval_num,
                     eval_steps=args.eval_steps, eval_cfg_scale=args.eval_cfg_scale, num_real=args.num_real,
                     bench_reps=args.bench_reps, threads=args.threads, seed=args.seed, progress=not args.no_progress,
                     quick=args.quick, rope_methods=tuple(parse_rope_methods(args.rope_methods)),
                     precision=args.precision, cfg_interval=_parse_interval(args.cfg_interval))
    from .checks import finite, integer
    for flag in ("train_steps", "baseline_size", "token_budget", "sample_steps", "sample_num", "eval_num",
                 "eval_steps", "num_real", "bench_reps"):
        integer("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    finite("cfg_scale", args.cfg_scale)
    finite("eval_cfg_scale", args.eval_cfg_scale)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive number of threads, got {args.threads}")
    if args.quick:
        s = dataclasses.replace(s, **{k: v for k, v in QUICK.items()
                                      if k != "rope_methods" or s.rope_methods == DemoSettings.rope_methods})
    return s


def _parse_interval(spec: str) -> tuple:
    try:
        low, high = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval is LOW,HIGH (e.g. 0.3,1), got {spec!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"--cfg-interval must satisfy 0 <= LOW <= HIGH <= 1, got {spec!r}")
    return (low, high)


def main_demo(args) -> int:
    s = settings_from_args(args)
    r = run_demo(s)  # bad input raises ValueError / OSError: `nit` reports it in one line
    path = os.path.abspath(os.path.join(s.out, "REPORT.md"))
    print(f"\n[demo] done in {r['timings']['total_s']:.0f} s")
    v = _verdict(r["eval"]["rows"])
    if v:
        print("[demo] " + v)
    for mix, bm in r["bench"].items():
        print(f"[demo] packed sampling vs one resolution per batch, {mix}: {bm['speedup']:.2f}x")
    print(f"[demo] report: {path}")
    return 0
