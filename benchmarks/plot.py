"""Plots (PNG) and the markdown summary (results/SUMMARY.md) of one run in the benchmark CSV.

    python -m benchmarks.plot [--csv results/results.csv] [--out-dir results] [--run TIMESTAMP]

The run shown is the newest in the CSV (rows sharing its timestamp) unless --run names another.
Plots: speed-up over the reference per suite, one panel per pass; tokens/s per model size for the
step suite (one panel per pack and pass); packing efficiency per method and budget. The summary states the machine, shows every measured
figure as tables, lists what disagreed with the reference or failed, and lists plainly what could
not be measured here and why (on a machine without a GPU: every GPU provider).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import OrderedDict
from typing import Optional, Sequence

from .report import DEFAULT_CSV, fnum, read_rows

RESULTS_DIR = os.path.dirname(DEFAULT_CSV)
PASSES = ("fwd", "bwd", "fwd+bwd")


def latest_run(rows: list[dict], run: Optional[str] = None) -> list[dict]:
    if not rows:
        return []
    stamp = run or max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == stamp]


def _f(v) -> Optional[float]:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _passes(srows: list[dict]) -> list[str]:
    """The passes of a suite's rows: fwd, bwd, fwd+bwd first (kernel suites), then others in row order."""
    seen = list(OrderedDict.fromkeys(r["pass"] for r in srows))
    return [p for p in PASSES if p in seen] + [p for p in seen if p not in PASSES]


def _suites(rows) -> "OrderedDict[str, list[dict]]":
    out: OrderedDict = OrderedDict()
    for r in rows:
        if r["suite"] != "machine":
            out.setdefault(r["suite"], []).append(r)
    return out


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _save(fig, rows: list[dict], path: str) -> str:
    """Write `fig` to the PNG `path` (a red banner when `rows` come from a quick run) and close it."""
    import matplotlib.pyplot as plt
    if rows[0].get("mode") == "quick":
        fig.suptitle("quick mode: smoke test, not results", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _by_precision(ok: list[dict]) -> list[dict]:
    """Rows of a suite measured in more than one precision, with the precision in the provider's name
    (one bar per provider and precision); rows of a one-precision suite unchanged."""
    if len({r.get("dtype") for r in ok}) > 1:
        return [dict(r, provider=f"{r['provider']} {r.get('dtype', '')}") for r in ok]
    return ok


def plot_speedups(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per suite: bars of speed-up over the reference, per workload and provider, per pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    written = []
    for suite, srows in _suites(rows).items():
        ok = _by_precision([r for r in srows if r["status"] == "ok" and r["provider"] != "reference"
                            and _f(r.get("speedup_vs_reference")) is not None])
        if not ok:
            continue
        workloads = list(OrderedDict.fromkeys(r["workload"] for r in ok))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in ok))
        if not providers:
            continue
        passes = _passes(srows)
        fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 0.5 * len(workloads) + 2.5),
                                 sharey=True, squeeze=False)
        width = 0.8 / len(providers)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, p in zip(axes[0], passes):
            drawn = 0
            for j, prov in enumerate(providers):
                ys, vals = [], []
                for i, w in enumerate(workloads):
                    hit = [r for r in ok if r["workload"] == w and r["provider"] == prov and r["pass"] == p]
                    if hit:
                        ys.append(i + j * width)
                        vals.append(_f(hit[0]["speedup_vs_reference"]))
                # bars start at 1x: to the right when faster than the reference, to the left when slower
                ax.barh(ys, [v - 1 for v in vals], left=1.0, height=width, label=prov,
                        color=colors[j % len(colors)])
                drawn += len(vals)
            if not drawn:
                ax.text(0.5, 0.5, f"no {p} measured\n(see SUMMARY.md)", transform=ax.transAxes, ha="center")
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_title(f"{suite}: {p}")
            ax.set_xlabel("speed-up over the eager reference (log scale)")
        axes[0][0].set_yticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads)
        axes[0][0].invert_yaxis()
        axes[0][0].legend(fontsize="small", loc="best")
        written.append(_save(fig, srows, os.path.join(out_dir, f"speedup_{suite}.png")))
    return written


def plot_throughput(rows: list[dict], out_dir: str, unit: str = "tokens/s") -> list[str]:
    """One PNG per suite that reports `unit` with workloads named ``pack/model`` (the step suite):
    tokens/s per model size, one panel per pack and pass, one bar per provider (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suite, srows in _suites(rows).items():
        ok = [r for r in srows if r["status"] == "ok" and r.get("unit") == unit and _f(r.get("throughput"))]
        if not ok:
            continue
        ok = _by_precision(ok)
        def parts(w):
            return tuple(w.split("/", 1)) if "/" in w else (w, "")

        split = [parts(r["workload"]) for r in ok]
        packs = list(OrderedDict.fromkeys(parts(r["workload"])[0] for r in srows))
        models = list(OrderedDict.fromkeys(parts(r["workload"])[1] for r in srows))
        floor = 10 ** math.floor(math.log10(min(_f(r["throughput"]) for r in ok)))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in ok))
        passes = [p for p in _passes(srows) if any(r["pass"] == p for r in ok)]
        fig, axes = plt.subplots(len(packs), len(passes), figsize=(4.5 * len(passes), 3.2 * len(packs)),
                                 squeeze=False)
        width = 0.8 / len(providers)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for a, pack in enumerate(packs):
            for b, p in enumerate(passes):
                ax = axes[a][b]
                for j, prov in enumerate(providers):
                    xs, vals = [], []
                    for i, m in enumerate(models):
                        hit = [r for r, (pk, mo) in zip(ok, split)
                               if pk == pack and mo == m and r["provider"] == prov and r["pass"] == p]
                        if hit:
                            xs.append(i + (j - (len(providers) - 1) / 2) * width)
                            vals.append(_f(hit[0]["throughput"]))
                    # log scale (model sizes differ 100x): bars start at a power of ten below every value
                    ax.bar(xs, [v - floor for v in vals], bottom=floor, width=width, label=prov,
                           color=colors[j % len(colors)])
                    for x, v in zip(xs, vals):
                        ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize="x-small")
                measured = [m for m in models if any(pk == pack and mo == m for pk, mo in split)]
                ax.set_xticks(range(len(models)), [m if m in measured else f"{m}\n(not measured)" for m in models])
                ax.set_yscale("log")
                ax.set_ylabel(unit)
                ax.set_title(f"{suite}: {p} on {pack}")
        axes[0][0].legend(fontsize="small")
        written.append(_save(fig, srows, os.path.join(out_dir, f"throughput_{suite}.png")))
    return written


def plot_packing(rows: list[dict], out_dir: str) -> list[str]:
    """packing_efficiency.png: useful / processed tokens per method, one panel per workload (budget),
    each bar labelled with the batches an epoch takes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and _f(r.get("efficiency")) is not None]
    if not ok:
        return []
    workloads = list(OrderedDict.fromkeys(r["workload"] for r in ok))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 3.5), squeeze=False, sharey=True)
    for ax, w in zip(axes[0], workloads):
        mine = [r for r in ok if r["workload"] == w]
        effs = [100 * _f(r["efficiency"]) for r in mine]
        ax.barh(range(len(mine)), effs, color="tab:blue")
        for i, (r, e) in enumerate(zip(mine, effs)):
            ax.text(min(e, 100) + 1, i, f"{e:.1f}%, {r.get('batches')} batches", va="center", fontsize="small")
        ax.set_yticks(range(len(mine)), [r["provider"] for r in mine])
        ax.set_xlim(0, 150)
        ax.set_xlabel("efficiency: useful / processed tokens (%)")
        ax.set_title(w)
    axes[0][0].invert_yaxis()
    return [_save(fig, ok, os.path.join(out_dir, "packing_efficiency.png"))]


# ---------------------------------------------------------------------------------------------
# markdown summary
# ---------------------------------------------------------------------------------------------
def _measured_table(srows: list[dict]) -> list[str]:
    ok = [r for r in srows if r["status"] == "ok"]
    if not ok:
        return ["Nothing in this suite was measured in this run (see below for why)."]
    unit = ok[0].get("unit", "")
    mem_bound = unit == "GB/s"
    precisions = len({r.get("dtype", "") for r in ok}) > 1
    head = ["workload"] + (["precision"] if precisions else []) + ["provider", "fwd ms", "bwd ms", "fwd+bwd ms",
                                                                   f"fwd+bwd {unit}"]
    head += ["% of copy"] if mem_bound else []
    head += ["x reference", "x best peer (which)", "peak MB"]
    if any(r.get("padding_waste") for r in ok):
        head.append("padding waste")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(OrderedDict.fromkeys((r["workload"], r.get("dtype", ""), r["provider"]) for r in ok))
    for w, dt, prov in keys:
        by = {r["pass"]: r for r in ok if r["workload"] == w and r.get("dtype", "") == dt and r["provider"] == prov}
        main = by.get("fwd+bwd") or by.get("fwd")
        tag = "" if "fwd+bwd" in by else " (fwd)"
        cells = [w] + ([dt] if precisions else []) + [prov] + [fnum(by[p]["median_ms"]) if p in by else "-" for p in PASSES]
        cells.append(fnum(main.get("throughput"), ".4g") + tag)
        if mem_bound:
            frac = _f(main.get("frac_of_copy"))
            cells.append(f"{100 * frac:.0f}%" if frac is not None else "-")
        peer = fnum(main.get("speedup_vs_best_peer"), ".2f")
        cells += [fnum(main.get("speedup_vs_reference"), ".2f"),
                  f"{peer} ({main['best_peer']})" if main.get("best_peer") else peer,
                  fnum(by["fwd+bwd"].get("peak_mem_mb"), ".1f") if "fwd+bwd" in by else "-"]
        if "padding waste" in head:
            cells.append(fnum(main.get("padding_waste"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _step_table(srows: list[dict]) -> list[str]:
    """Whole-step suites: per workload and provider, each pass's time, tokens/s, ratios and peak memory."""
    ok = [r for r in srows if r["status"] == "ok"]
    if not ok:
        return ["Nothing in this suite was measured in this run (see below for why)."]
    passes = [p for p in _passes(srows) if any(r["pass"] == p for r in ok)]
    head = ["workload", "precision", "provider"]
    for p in passes:
        head += [f"{p} ms", f"{p} tokens/s", f"{p} x reference", f"{p} x best peer (which)", f"{p} peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w, dt, prov in OrderedDict.fromkeys((r["workload"], r.get("dtype", ""), r["provider"]) for r in ok):
        by = {r["pass"]: r for r in ok if r["workload"] == w and r.get("dtype", "") == dt and r["provider"] == prov}
        cells = [w, dt, prov]
        for p in passes:
            r = by.get(p)
            if r is None:
                cells += ["-"] * 5
                continue
            peer = fnum(r.get("speedup_vs_best_peer"), ".2f")
            cells += [fnum(r["median_ms"]), fnum(r.get("throughput"), ".4g"), fnum(r.get("speedup_vs_reference"), ".2f"),
                      f"{peer} ({r['best_peer']})" if r.get("best_peer") else peer, fnum(r.get("peak_mem_mb"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    methods = {r.get("mem_method") for r in ok if r.get("mem_method")}
    remarks = OrderedDict.fromkeys(f"{r['provider']}: {r['reason']}" for r in ok if r.get("reason"))
    lines += ["", "Peak memory: " + (", ".join(sorted(methods)) or "not measured") + "; the weights, AdamW and EMA "
              "state held before the measured call are not counted."]
    lines += [f"- {m}" for m in remarks]
    return lines


def _packing_table(srows: list[dict]) -> list[str]:
    """Packing: efficiency, batches an epoch, padding waste and packing time per budget and method."""
    ok = [r for r in srows if r["status"] == "ok"]
    if not ok:
        return ["Nothing in this suite was measured in this run (see below for why)."]
    head = ["workload", "method", "efficiency", "batches", "processed / useful - 1", "packing ms (median)", "remark"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        eff = _f(r.get("efficiency"))
        lines.append("| " + " | ".join([r["workload"], r["provider"], f"{100 * eff:.2f}%" if eff is not None else "-",
                                        r.get("batches") or "-", fnum(r.get("padding_waste"), ".3f"),
                                        fnum(r["median_ms"]), r.get("reason") or ""]) + " |")
    return lines


def _sampling_table(srows: list[dict]) -> list[str]:
    """Packed vs per-resolution sampling: time, images/s, forwards and the speed-up per workload."""
    ok = [r for r in srows if r["status"] == "ok"]
    if not ok:
        return ["Nothing in this suite was measured in this run (see below for why)."]
    head = ["workload", "mode", "ms (median, p20-p80)", "images/s", "forwards", "packed speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        peer = _f(r.get("speedup_vs_best_peer"))
        lines.append("| " + " | ".join([r["workload"], r["provider"],
                                        f"{fnum(r['median_ms'])} ({fnum(r.get('p20_ms'))}-{fnum(r.get('p80_ms'))})",
                                        fnum(r.get("throughput"), ".3g"), r.get("reason") or "",
                                        f"**{peer:.2f}x**" if peer is not None else ""]) + " |")
    return lines


def _table(srows: list[dict]) -> list[str]:
    if srows and srows[0]["suite"] == "sampling":
        return _sampling_table(srows)
    if any(_f(r.get("efficiency")) is not None for r in srows):
        return _packing_table(srows)
    if any(p not in PASSES for p in _passes(srows)):
        return _step_table(srows)
    return _measured_table(srows)


def _not_measured(rows: list[dict]) -> list[str]:
    """Skipped providers, one line per (provider, reason), with the suites and passes it covers."""
    groups: OrderedDict = OrderedDict()
    workloads: dict = {}
    all_passes: dict = {}
    for r in rows:
        workloads.setdefault(r["suite"], set()).add(r["workload"])
        all_passes.setdefault(r["suite"], set()).add(r["pass"])
        if r["status"] == "skipped":
            groups.setdefault((r["provider"], r["reason"]), set()).add((r["suite"], r["workload"], r["pass"]))
    out = []
    for (prov, reason), where in groups.items():
        suites = sorted({s for s, _, _ in where})
        passes = sorted({p for _, _, p in where}, key=lambda p: PASSES.index(p) if p in PASSES else 9)
        every = set().union(*(all_passes[s] for s in suites))
        scope = ", ".join(suites) + ("" if set(passes) >= every else f" ({', '.join(passes)} only)")
        some = sorted({w for s, w, _ in where})
        if any({w for s2, w, _ in where if s2 == s} != workloads[s] for s in suites):
            scope += f" on {', '.join(some)}"
        out.append(f"- **{prov}** in {scope}: {reason}")
    return out


_INTRO = {
    "step": ["One NiT training step (flow-matching loss, backward, clipping, AdamW, EMA; fp32, and bf16 "
             "autocast with fp32 master weights where the device multiplies bf16 natively: the precision "
             "column) and one "
             "guided sampling step (one no-grad forward of a pack holding the images with their labels and again "
             "with the null class, cfg 4.0, one Euler update), per model size and provider: `reference` (every "
             "op pure PyTorch), `auto` (this package's fastest available kernel per op), `official` (the "
             "official implementation's formulation). tokens/s counts the pack's tokens (both CFG halves for "
             "sampling). Checked against the float64 model on a sub-pack before timing.", ""],
    "sampling": ["The same images (sizes in tokens, labels, seeds) sampled packed across resolutions and one "
                 "resolution per batch (the official sampler's way): Euler, CFG 3, no decoding, modes timed "
                 "interleaved; the speed-up is per-resolution time / packed time. Checked first: both modes give "
                 "the same images.", ""],
    "packing": ["The 50,000 ImageNet-like sizes at stride 32, packed or batched under a token budget. Efficiency is "
                "useful tokens / processed tokens (a pack processes its whole budget, a padded batch n x longest, a "
                "bucket batch (budget // L) x L); batches is the number of steps an epoch takes; the time is the "
                "median wall time of one whole packing (one core, NumPy).", ""],
}


def write_summary(rows: list[dict], path: str, plots: Sequence[str] = ()) -> str:
    """Write the markdown summary of one run's rows to `path`; returns the text."""
    if not rows:
        raise ValueError("no rows to summarise")
    r0 = rows[0]
    copy = [r for r in rows if r["suite"] == "machine"]
    loads = [_f(r.get("load_avg")) for r in rows if _f(r.get("load_avg")) is not None]
    lines = ["# Benchmark results", ""]
    if r0.get("mode") == "quick":
        lines += ["> **Quick mode (smoke test): tiny shapes, one repetition, compiled providers only with "
                  "--compile. These numbers are not results.**", ""]
    lines += [
        f"- Run: {r0['timestamp']}, commit `{r0['commit']}`, {r0.get('mode', '')} mode",
        f"- Machine: {r0['machine']}",
        f"- GPU: {r0['gpu']}",
        f"- torch {r0['torch']}, triton {r0['triton']}",
    ]
    for c in copy:
        lines.append(f"- Copy bandwidth ({c['device']}, 256 MiB, read + write): {fnum(c['throughput'], '.1f')} GB/s")
    if loads:
        lines.append(f"- 1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} "
                     "(above the CPU count, other processes competed for the cores)")
    lines += ["", "Medians of repeated calls (p20/p80 are in the CSV). Byte and FLOP counts, the accuracy check "
              "and the memory method are described in benchmarks/results/README.md. Speed-ups are measured side "
              "by side in this run; 'best peer' is the fastest provider that is not one of this package's "
              "kernels.", ""]
    if r0["gpu"] == "none":
        lines += ["**No GPU on this machine: nothing was measured on a GPU.** The `cuda`, `triton`, `flash_attn` "
                  "and `torch_varlen` providers, the NiT-XL training and sampling steps, bf16 and every other GPU "
                  "figure do not exist for this run; they are listed under 'Not measured' with the reason.", ""]
    for suite, srows in _suites(rows).items():
        lines += [f"## {suite}", ""]
        lines += _INTRO.get(suite, [])
        lines += _table(srows)
        bad = [r for r in srows if r["status"] in ("mismatch", "error")]
        seen = set()
        for r in bad:
            key = (r["workload"], r["provider"], r["status"])
            if key not in seen:
                seen.add(key)
                lines.append(f"\n**{r['status']}**: {r['provider']} on {r['workload']}: "
                             f"{r.get('check') or r.get('reason')}")
        for name, what in ((f"speedup_{suite}.png", "speed-ups"), (f"throughput_{suite}.png", "tokens/s"),
                           ("packing_efficiency.png" if suite == "packing" else "", "efficiency")):
            plot = os.path.join(os.path.dirname(path), name)
            if name and plot in plots:
                lines += ["", f"![{suite} {what}]({name})"]
        lines.append("")
    missing = _not_measured(rows)
    if missing:
        lines += ["## Not measured in this run, and why", ""] + missing + [""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    p.add_argument("--csv", default=DEFAULT_CSV)
    p.add_argument("--out-dir", default=RESULTS_DIR, help="where the PNGs and SUMMARY.md go")
    p.add_argument("--run", default=None, help="timestamp of the run to show (default: the newest)")
    args = p.parse_args(argv)
    rows = latest_run(read_rows(args.csv), args.run)
    if not rows:
        raise SystemExit(f"{args.csv}: no rows" + (f" with timestamp {args.run}" if args.run else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    plots = plot_speedups(rows, args.out_dir) + plot_throughput(rows, args.out_dir) + plot_packing(rows, args.out_dir)
    summary = os.path.join(args.out_dir, "SUMMARY.md")
    write_summary(rows, summary, plots)
    for path in plots + [summary]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
