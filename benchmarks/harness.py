"""The benchmark harness: suites, providers, timing, peak memory, machine description, CSV rows.

A *suite* measures one thing (an op, later a training step or a packer) and yields CSV rows. Most
suites are ``ProviderSuite``s: a list of workloads times a list of *providers* (set-up functions,
as in Liger-Kernel's benchmarks) times the passes fwd, bwd and fwd+bwd. A provider receives the
suite's case for one workload and returns a ``Prepared`` callable, or raises ``Skip(reason)``
when it cannot run here. Before a provider is timed its forward output (and its gradients, when
it has a backward) is checked against the reference; a provider that disagrees is recorded as
``mismatch`` and never timed.

Timing: warm-up calls, then repetitions until both a minimum count and a time budget are reached
(slow calls: 3 repetitions); the median with the 20th and 80th percentiles is reported. CUDA work is timed with CUDA events
after a synchronize. The ``bwd`` pass reruns the forward before every repetition, untimed, so each
backward starts from a fresh graph (compiled backwards refuse ``retain_graph=True``).

Peak memory (forward+backward only): on CUDA, ``torch.cuda.max_memory_allocated`` during the pass
minus what was allocated before it. On CPU torch keeps no allocator statistics, so the pass runs
once more under ``torch.profiler`` with ``profile_memory=True``; every allocation and free of
torch's CPU allocator is an event, and the peak of their running sum is the figure. Inputs built
before the pass are not counted; memory a kernel takes outside torch's allocator (std::vector or
OpenMP scratch inside a C++ kernel) is not seen either.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import platform
import subprocess
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "BothPrecisions", "COLUMNS", "PASSES", "Skip", "Mismatch", "RunOptions", "Workload", "Prepared", "ProviderSpec",
    "Suite", "ProviderSuite", "register", "load_suites", "SUITES", "SUITE_MODULES",
    "time_calls", "peak_memory", "copy_bandwidth", "machine_info", "load_average", "describe_error",
]

# Every row of the CSV has these columns, in this order (benchmarks/results/README.md explains them).
COLUMNS = (
    "timestamp", "mode", "commit", "machine", "gpu", "torch", "triton",
    "suite", "workload", "config", "device", "dtype", "provider", "pass",
    "status", "median_ms", "p20_ms", "p80_ms", "reps",
    "throughput", "unit", "frac_of_copy", "speedup_vs_reference", "speedup_vs_best_peer", "best_peer",
    "peak_mem_mb", "mem_method", "padding_waste", "setup_s", "load_avg", "check", "reason",
    # added with the packing suite; older CSVs (without them) are upgraded in place by report.append_rows
    "efficiency", "batches",
)
PASSES = ("fwd", "bwd", "fwd+bwd")
STATUSES = ("ok", "skipped", "error", "mismatch")

# Modules that define suites register them on import. These come first, in this order; any other
# benchmarks/bench_*.py is found and imported after them (alphabetically).
SUITE_MODULES = ["benchmarks.bench_adaln", "benchmarks.bench_rope", "benchmarks.bench_attention"]
SUITES: dict[str, "Suite"] = {}
LOAD_ERRORS: dict[str, str] = {}  # module -> why it could not be imported


class Skip(Exception):
    """A provider (or a whole workload) cannot run here; the message says why."""


class Mismatch(Exception):
    """A provider's output disagrees with the reference; the message says where."""


@dataclasses.dataclass
class RunOptions:
    quick: bool = False
    devices: Sequence[str] = ("cpu",)
    dtype: Optional[str] = None            # None: float32 on CPU, bfloat16 on CUDA
    compile: Optional[bool] = None         # None: compiled providers run in full mode only
    filter: Optional[str] = None           # regex searched in "suite/workload/provider"
    providers: Optional[frozenset] = None  # None: all
    time_budget: float = 1.0               # seconds of timed repetitions per measurement
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 2
    memory: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.quick:
            self.time_budget, self.min_reps, self.max_reps, self.warmup = 0.0, 1, 1, 0

    @property
    def run_compiled(self) -> bool:
        return (not self.quick) if self.compile is None else self.compile

    def wants(self, suite: str, workload: str = "", provider: str = "") -> bool:
        import re
        if self.providers is not None and provider and provider not in self.providers:
            return False
        if self.filter and not re.search(self.filter, f"{suite}/{workload}/{provider}"):
            return False
        return True

    def dtype_for(self, device: str) -> torch.dtype:
        if self.dtype is not None:
            return {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[self.dtype]
        # fp32 on CPU (no bf16 matmul hardware here), bf16 on GPU (flash-attn takes fp16/bf16 only)
        return torch.float32 if device == "cpu" else torch.bfloat16


@dataclasses.dataclass
class Workload:
    name: str                 # e.g. "imagenet-4k/NiT-S"
    config: str               # human-readable sizes, e.g. "N=4077 B=27 max_len=225 D=384"
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prepared:
    """What a provider hands the harness for one workload.

    fn():        the forward on inputs built in set-up; returns a tensor or a tuple of tensors.
    leaves:      the inputs that receive gradients (empty for a forward-only provider).
    grad_outs:   gradients of the outputs, in the provider's own layout.
    no_backward: why the backward passes cannot run (None when they can).
    to_packed:   maps (outputs, gradients of leaves) to the reference's layout for the check
                 (None when the provider already uses it).
    notes:       extra CSV columns (e.g. padding_waste) and a ``reason`` remark.
    """

    fn: Callable[[], Any]
    leaves: Sequence[torch.Tensor] = ()
    grad_outs: Sequence[torch.Tensor] = ()
    leaf_names: Sequence[str] = ()
    no_backward: Optional[str] = None
    to_packed: Optional[Callable] = None
    notes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ProviderSpec:
    name: str
    setup: Callable[[Any], Prepared]
    ours: bool = False       # one of this package's kernels (vs a peer or the reference)
    compiled: bool = False   # uses torch.compile (skipped in --quick unless --compile)
    doc: str = ""


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# ---------------------------------------------------------------------------------------------
# machine, timing, memory
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def machine_info() -> dict:
    """Columns that describe this run's machine and software, without the hostname."""
    try:
        import importlib.metadata as md
        triton_version = md.version("triton")
    except Exception:
        triton_version = "not installed"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return {
        "machine": f"{_cpu_model()} ({isa}), {cpus} CPUs, {torch.get_num_threads()} torch threads",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def load_average() -> Optional[float]:
    """The 1-minute load average (a shared machine with load above its CPU count times badly)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[Any], Any], before: Optional[Callable[[], Any]], device: torch.device,
               opts: RunOptions) -> list[float]:
    """Milliseconds of each timed call of ``run(before())``; ``before`` (untimed) may be None.

    Up to ``warmup`` warm-up calls (one when a call outlasts the time budget); then repetitions
    until at least ``min_reps`` were made and ``time_budget`` seconds were spent, or ``max_reps``
    were made. Slow calls stop earlier: 3 repetitions once 5x the budget is spent.
    """
    arg = None
    for _ in range(opts.warmup):
        arg = before() if before else None
        t0 = time.perf_counter()
        run(arg)
        _sync(device)
        if time.perf_counter() - t0 > opts.time_budget:
            break
    times, spent = [], 0.0
    while len(times) < opts.max_reps and (len(times) < opts.min_reps or spent < opts.time_budget):
        if len(times) >= 3 and spent >= 5 * opts.time_budget:
            break
        arg = before() if before else None
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(arg)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run(arg)
            ms = (time.perf_counter() - t0) * 1e3
        arg = None
        times.append(ms)
        spent += ms / 1e3
    return times


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines (written to fd 2) while it starts and stops."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def peak_memory(run: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """(bytes, method): the peak of memory allocated during ``run()`` above what was held before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base), "cuda max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        run()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = np.cumsum([n for _, n in events]) if events else np.zeros(1)
    return float(max(0, running.max())), "cpu profiler (torch allocator)"


def copy_bandwidth(device: torch.device, opts: RunOptions) -> float:
    """GB/s of ``dst.copy_(src)`` on 256 MiB fp32, counting the bytes read plus the bytes written."""
    n = 256 * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    o = dataclasses.replace(opts, quick=False, warmup=1, min_reps=1 if opts.quick else 5,
                            max_reps=1 if opts.quick else 50, time_budget=0.0 if opts.quick else 0.5)
    ms = float(np.median(time_calls(lambda _: dst.copy_(src), None, device, o)))
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


# ---------------------------------------------------------------------------------------------
# suites
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunContext:
    opts: RunOptions
    copy_gbps: dict  # device type -> GB/s measured in this run


class Suite:
    """Something measured; yields lists of CSV rows (dicts keyed by COLUMNS, common ones filled later)."""

    name: str = ""
    description: str = ""

    def run(self, ctx: RunContext) -> Iterator[list[dict]]:
        raise NotImplementedError

    def listing(self, opts: RunOptions) -> list[str]:
        """Lines for ``--list``."""
        return [f"{self.name}: {self.description}"]


def register(suite: Suite) -> Suite:
    if suite.name in SUITES and SUITES[suite.name] is not suite:
        raise ValueError(f"a suite named {suite.name!r} is already registered")
    SUITES[suite.name] = suite
    return suite


def suite_modules() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(f"benchmarks.{f[:-3]}" for f in os.listdir(here) if f.startswith("bench_") and f.endswith(".py"))
    return SUITE_MODULES + [m for m in found if m not in SUITE_MODULES]


def load_suites() -> dict[str, Suite]:
    """Import every suite module (once) and return the registry; import failures go to LOAD_ERRORS."""
    for mod in suite_modules():
        if mod in LOAD_ERRORS:
            continue
        try:
            importlib.import_module(mod)
        except Exception as e:  # one broken suite must not hide the others
            LOAD_ERRORS[mod] = describe_error(e)
    return SUITES


def _stats(times: list[float]) -> dict:
    p20, med, p80 = np.percentile(times, [20, 50, 80])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": len(times)}


class ProviderSuite(Suite):
    """Workloads x providers x passes, with a reference check before timing.

    Subclasses define ``providers`` (name -> ProviderSpec) and implement ``workloads``,
    ``make_case``, ``work`` and ``verify``.
    """

    providers: dict[str, ProviderSpec] = {}
    reference: str = "reference"
    passes: tuple = PASSES
    memory_passes: tuple = ("fwd+bwd",)  # passes whose peak memory is measured (one more call each)

    def workloads(self, opts: RunOptions) -> list[Workload]:
        raise NotImplementedError

    def make_case(self, workload: Workload, device: torch.device, dtype: torch.dtype, opts: RunOptions) -> Any:
        """Inputs shared by every provider of one workload (may raise Skip)."""
        raise NotImplementedError

    def work(self, case: Any, pass_: str) -> tuple[float, str]:
        """(amount, kind) done by one call of ``pass_``: kind "bytes" (-> GB/s), "flops" (-> GFLOP/s)
        or "tokens" (-> tokens/s)."""
        raise NotImplementedError

    def verify(self, case: Any, prepared: Prepared, outs: tuple, grads: Optional[tuple]) -> str:
        """'ok ...' when the outputs (and gradients) agree with the reference, else raise Mismatch."""
        raise NotImplementedError

    def listing(self, opts):
        lines = [f"{self.name}: {self.description}"]
        lines += [f"  workload {w.name}: {w.config}" for w in self.workloads(opts)]
        lines += [f"  provider {p.name}{' (compiled)' if p.compiled else ''}: {p.doc}" for p in self.providers.values()]
        return lines

    # -- building blocks shared by the CLI loop and the pytest-benchmark entry point ------------
    def prepare(self, case: Any, spec: ProviderSpec, opts: RunOptions) -> tuple[Prepared, str]:
        """Set up one provider and check it against the reference; raises Skip or Mismatch."""
        if spec.compiled and not opts.run_compiled:
            raise Skip("quick mode does not run torch.compile providers (a first compile takes 2-20 s); "
                       "add --compile (CLI) or --bench-compile (pytest) to include them")
        prep = spec.setup(case)
        with torch.enable_grad():
            outs = _as_tuple(prep.fn())
            grads = None
            if prep.no_backward is None and prep.leaves:
                grads = torch.autograd.grad(outs, list(prep.leaves), list(prep.grad_outs), allow_unused=True)
        check = self.verify(case, prep, outs, grads)
        return prep, check

    @staticmethod
    def pass_callables(prep: Prepared, pass_: str) -> tuple[Callable[[Any], Any], Optional[Callable[[], Any]]]:
        """(run, before) for time_calls: run gets before()'s result (the forward's outputs for bwd)."""
        def fwd():
            with torch.enable_grad():
                return _as_tuple(prep.fn())

        def bwd(outs):
            return torch.autograd.grad(outs, list(prep.leaves), list(prep.grad_outs), allow_unused=True)

        if pass_ == "fwd":
            return (lambda _: fwd()), None
        if pass_ == "bwd":
            return bwd, fwd
        if pass_ == "fwd+bwd":
            return (lambda _: bwd(fwd())), None
        raise ValueError(f"unknown pass {pass_!r}")

    def throughput(self, case: Any, pass_: str, median_ms: float, copy_gbps: Optional[float]) -> dict:
        amount, kind = self.work(case, pass_)
        sec = median_ms / 1e3
        if kind == "bytes":
            gbps = amount / sec / 1e9
            return {"throughput": gbps, "unit": "GB/s", "frac_of_copy": gbps / copy_gbps if copy_gbps else None}
        if kind == "flops":
            return {"throughput": amount / sec / 1e9, "unit": "GFLOP/s"}
        return {"throughput": amount / sec, "unit": f"{kind}/s"}

    # -- the loop -----------------------------------------------------------------------------
    def run(self, ctx):
        opts = ctx.opts
        for device_name in opts.devices:
            device, dtype = torch.device(device_name), opts.dtype_for(device_name)
            for wl in self.workloads(opts):
                names = [n for n in self.providers if opts.wants(self.name, wl.name, n)]
                if names:
                    yield self.run_workload(ctx, wl, device, dtype, names)

    def run_workload(self, ctx, wl: Workload, device: torch.device, dtype: torch.dtype,
                     names: Sequence[str]) -> list[dict]:
        """The rows of one workload: every provider of `names` set up, checked, timed (all passes)."""
        base = {"suite": self.name, "workload": wl.name, "config": wl.config, "device": device.type,
                "dtype": str(dtype).replace("torch.", "")}
        try:
            case = self.make_case(wl, device, dtype, ctx.opts)
        except Skip as e:
            return [dict(base, provider=n, **{"pass": p}, status="skipped", reason=str(e))
                    for n in names for p in self.passes]
        rows = []
        for n in names:
            rows += self._run_provider(case, self.providers[n], base, device, ctx)
        _fill_speedups(rows, self.reference, {n: s.ours for n, s in self.providers.items()})
        del case  # tensors are freed by reference counting (gc.collect costs 0.3 s a call)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        load = load_average()
        return [dict(r, load_avg=load) for r in rows]

    def _run_provider(self, case, spec: ProviderSpec, base: dict, device, ctx) -> list[dict]:
        opts = ctx.opts
        rows = [dict(base, provider=spec.name, **{"pass": p}) for p in self.passes]
        t0 = time.perf_counter()
        try:
            prep, check = self.prepare(case, spec, opts)
        except Skip as e:
            return [dict(r, status="skipped", reason=str(e)) for r in rows]
        except Mismatch as e:
            return [dict(r, status="mismatch", check=f"FAILED: {e}", reason="output disagrees with the reference; "
                         "not timed") for r in rows]
        except Exception as e:  # a crashing provider is recorded, not fatal to the run
            return [dict(r, status="error", reason=describe_error(e)) for r in rows]
        setup_s = time.perf_counter() - t0
        notes = dict(prep.notes)
        remark = notes.pop("reason", "")
        for r in rows:
            p = r["pass"]
            r.update(notes, setup_s=setup_s, check=check)
            if p != "fwd" and prep.no_backward:
                r.update(status="skipped", reason=prep.no_backward)
                continue
            run, before = self.pass_callables(prep, p)
            try:
                stats = _stats(time_calls(run, before, device, opts))
            except Exception as e:
                r.update(status="error", reason=describe_error(e))
                continue
            r.update(stats, status="ok", reason=remark)
            r.update(self.throughput(case, p, stats["median_ms"], ctx.copy_gbps.get(device.type)))
            if p in self.memory_passes and opts.memory:
                try:
                    peak, method = peak_memory(lambda: run(None), device)
                    r.update(peak_mem_mb=peak / 2**20, mem_method=method)
                except Exception as e:
                    r.update(mem_method=f"failed: {describe_error(e)}")
        return rows


def describe_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


def _fill_speedups(rows: list[dict], reference: str, ours: dict):
    """speedup_vs_reference and speedup_vs_best_peer (fastest other provider that is not ours)."""
    for p in {r["pass"] for r in rows}:
        ok = {r["provider"]: r for r in rows if r["pass"] == p and r.get("status") == "ok"}
        ref = ok.get(reference)
        for name, r in ok.items():
            if ref is not None:
                r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
            peers = [(o["median_ms"], o["provider"]) for o in ok.values()
                     if o["provider"] != name and not ours.get(o["provider"], False)]
            if peers:
                best_ms, best = min(peers)
                r["speedup_vs_best_peer"], r["best_peer"] = best_ms / r["median_ms"], best


class BothPrecisions:
    """Mixin for a ProviderSuite measured in fp32 and, where the first device multiplies bf16 natively
    (``nit_model.precision.default_precision``: CPUs with AMX-BF16, CUDA devices with bf16), in bf16
    too: one pass of the harness per precision, so speed-ups compare providers in the same precision.
    ``--dtype`` runs one precision only."""

    @staticmethod
    def precisions(opts: RunOptions) -> list:
        from nit_model.precision import default_precision

        if opts.dtype is not None:
            return [opts.dtype]
        return ["fp32"] + (["bf16"] if default_precision(opts.devices[0]) == "bf16" else [])

    def run(self, ctx):
        for p in self.precisions(ctx.opts):
            opts = dataclasses.replace(ctx.opts, dtype=p)
            yield from super().run(dataclasses.replace(ctx, opts=opts))
