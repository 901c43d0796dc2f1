"""Kernel-op suites: NiT workloads, shared inputs, the reference check, and the backend providers.

Workloads are packs x model widths. Packs (full mode):
  imagenet-4k, imagenet-16k  images drawn from benchmarks/assets/imagenet_like_sizes.csv until the
                             token budget is full (benchmarks.workloads.imagenet_like_pack, seed 0)
  fixed-256px                64 images of 8x8 tokens: 256x256 pixels at stride 32, the
                             fixed-resolution case
  tiny-images                many images of 1..4 x 1..4 tokens (short sequences), 4,096 tokens
Widths: NiT-S (D 384, H 6, Dh 64) and NiT-XL (D 1152, H 16, Dh 72). ``--quick`` uses the same
kinds of pack at a few hundred tokens.

Providers shared by every op: ``reference`` (eager), ``reference_compiled`` (torch.compile of the
reference function itself, dynamic shapes), and this package's backends ``cpu``, ``cuda``,
``triton``; each asks ``nit_kernels.dispatch`` whether it serves the op and reports its reason
when it does not.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np
import torch

from nit_kernels import PackedSeqs, dispatch as backends
from nit_kernels import reference as ref_impl
from nit_kernels.dispatch import Call
from nit_kernels.testing import _ATOL, ACTIVATIONS, assert_accuracy, call_op, cast_inputs, op_inputs

from .harness import Mismatch, Prepared, ProviderSpec, ProviderSuite, RunOptions, Skip, Workload

WIDTHS = {"NiT-S": (384, 6, 64), "NiT-XL": (1152, 16, 72)}  # name -> (D, H, Dh)


def tiny_images(token_budget: int, seed: int = 0, max_side: int = 4) -> list[tuple[int, int]]:
    """Images of 1..max_side x 1..max_side tokens drawn until the next would overflow the budget."""
    rng = np.random.default_rng(seed)
    out, used = [], 0
    while True:
        h, w = (int(v) for v in rng.integers(1, max_side + 1, 2))
        if used + h * w > token_budget:
            return out
        out.append((h, w))
        used += h * w


@functools.lru_cache(maxsize=None)
def packs(quick: bool, seed: int = 0) -> dict[str, tuple[tuple[int, int], ...]]:
    """Pack name -> (h, w) token sizes."""
    from .workloads import imagenet_like_pack

    if quick:
        return {"imagenet-512": tuple(imagenet_like_pack(512, seed=seed)),
                "fixed-256px": ((8, 8),) * 4,
                "tiny-images": tuple(tiny_images(256, seed))}
    return {"imagenet-4k": tuple(imagenet_like_pack(4096, seed=seed)),
            "imagenet-16k": tuple(imagenet_like_pack(16384, seed=seed)),
            "fixed-256px": ((8, 8),) * 64,
            "tiny-images": tuple(tiny_images(4096, seed))}


def pack_stats(sizes) -> str:
    s = [h * w for h, w in sizes]
    return f"N={sum(s)} B={len(s)} max_len={max(s)}"


@dataclasses.dataclass
class OpCase:
    """One workload of one op on one device: inputs shared by every provider, references cached."""

    op: str
    workload: Workload
    packed: PackedSeqs
    dtype: torch.dtype
    inputs: dict          # fp64 on the device, rounded to the dtype (activations) or fp32 (parameters)
    grad_outs: tuple      # in the dtype, packed layout
    kw: dict
    # further low-precision baselines (outputs, {name: grad}) for the accuracy rule, see verify
    lowp_baselines: list = dataclasses.field(default_factory=list)
    _refs: dict = dataclasses.field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.workload.params["dims"]

    def activation_leaves(self) -> dict:
        """Fresh leaves in the dtype (parameters in fp32), requires_grad set as testing.cast_inputs does."""
        return cast_inputs(self.op, self.inputs, self.dtype)

    def reference(self, precise: bool):
        """(outputs, {input name: gradient}) of the eager reference; fp64 when precise, else the dtype."""
        if precise not in self._refs:
            dt, pdt = (torch.float64, torch.float64) if precise else (self.dtype, torch.float32)
            inp = cast_inputs(self.op, self.inputs, dt, pdt)
            with torch.enable_grad():
                outs = call_op(self.op, self.packed, inp, "reference", **self.kw)
                outs = outs if isinstance(outs, tuple) else (outs,)
                names = [k for k, v in inp.items() if v.requires_grad]
                gos = [g.to(dt) for g in self.grad_outs]
                grads = torch.autograd.grad(outs, [inp[k] for k in names], gos, allow_unused=True)
            self._refs[precise] = (tuple(o.detach() for o in outs), dict(zip(names, grads)))
        return self._refs[precise]


def _largest(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.double()).abs().max().item() if a.numel() else 0.0


def verify_against_reference(case: OpCase, prep: Prepared, outs: tuple, grads: Optional[tuple]) -> str:
    """The project's accuracy rule (nit_kernels.testing.assert_accuracy): the error against the fp64
    reference is at most 2x the error of the reference run in the workload's dtype, plus atol.

    For fp16/bf16 a suite may add baselines computed entirely in that dtype (case.lowp_baselines);
    the largest baseline error then sets the bound, as flash-attention's tests do.
    """
    if prep.to_packed is not None:
        outs, named = prep.to_packed(outs, grads)
    else:
        named = dict(zip(prep.leaf_names, grads)) if grads is not None else {}
    (hi, ghi), lows = case.reference(True), [case.reference(False)] + list(case.lowp_baselines)
    if len(outs) != len(hi):
        raise Mismatch(f"{len(outs)} outputs, the reference has {len(hi)}")
    errs = {"fwd": 0.0, "grad": 0.0}
    try:
        for i, (o, oh) in enumerate(zip(outs, hi)):
            ol = max((lo[0][i] for lo in lows), key=lambda t: _err(t, oh))
            assert_accuracy(o.detach(), oh, ol, name=f"output {i}", atol=_ATOL[case.dtype] * _largest(oh))
            errs["fwd"] = max(errs["fwd"], _err(o, oh))
        for name, g in named.items():
            if ghi.get(name) is None:
                continue
            if g is None:
                raise AssertionError(f"no gradient for {name}")
            gl = max((lo[1][name] for lo in lows if lo[1].get(name) is not None), key=lambda t: _err(t, ghi[name]))
            assert_accuracy(g, ghi[name], gl, name=f"d{name}", atol=_ATOL[case.dtype] * _largest(ghi[name]))
            errs["grad"] = max(errs["grad"], _err(g, ghi[name]))
    except AssertionError as e:
        raise Mismatch(" ".join(str(e).split())[:400]) from None
    checked = "fwd" + (f"+{len(named)} grads" if named else "")
    return (f"ok {checked}: max err fwd {errs['fwd']:.2g}" + (f", grad {errs['grad']:.2g}" if named else "")
            + " (rule: <= 2x reference-in-dtype err + atol)")


# ---------------------------------------------------------------------------------------------
# providers shared by every op
# ---------------------------------------------------------------------------------------------
def _head_dim(case: OpCase) -> Optional[int]:
    return case.dims[2] if case.op in ("rope_2d", "qk_norm_rope", "varlen_attention") else None


def backend_refusal(name: str, case: OpCase) -> Optional[str]:
    """Why backend `name` cannot run this case's op here (None when it can)."""
    if name == "triton" and case.device.type != "cuda":
        return ("Triton is timed on a CUDA GPU only; this run is on "
                f"{case.device.type} (the Triton interpreter is a correctness tool, not a speed provider)")
    b = backends.get(name)
    # the machine-level reason (not built, no GPU, not installed) says more than a device mismatch
    why = b.load_error() or b.refuse(Call(case.op, case.device, case.dtype, head_dim=_head_dim(case)))
    return None if why is None else f"{name} backend: {why}"


def _from_leaves(case: OpCase, inp: dict, fn: Callable[[], object]) -> Prepared:
    names = [k for k, v in inp.items() if v.requires_grad]
    return Prepared(fn=fn, leaves=[inp[k] for k in names], grad_outs=case.grad_outs, leaf_names=names)


def backend_provider(name: str) -> Callable[[OpCase], Prepared]:
    """The public API of the op with backend=`name` (validation included, as a user pays it)."""
    def setup(case: OpCase) -> Prepared:
        why = backend_refusal(name, case)
        if why is not None:
            raise Skip(why)
        inp = case.activation_leaves()
        return _from_leaves(case, inp, lambda: call_op(case.op, case.packed, inp, name, **case.kw))
    return setup


_COMPILED: dict = {}


def _compiled_reference(op: str):
    # one compiled function per op and process; dynamic shapes, so new packs and widths reuse it
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(getattr(ref_impl, op), dynamic=True)
    return _COMPILED[op]


def compiled_reference_setup(case: OpCase) -> Prepared:
    """torch.compile of the reference function itself, so inductor sees (and fuses) the math."""
    if case.op == "varlen_attention":
        raise Skip("the attention reference is an opaque custom op (nit_ref::varlen_attention, a host loop "
                   "over images) that torch.compile keeps whole; the compiled peer is `flex`")
    fn = _compiled_reference(case.op)
    inp = case.activation_leaves()
    cu, sizes, kw = case.packed.cu_seqlens, case.packed.sizes, case.kw
    a = [inp[k] for k in inp]
    if case.op in ("adaln_modulate", "residual_adaln"):
        call = lambda: fn(*a, cu, kw.get("eps", 1e-6))  # noqa: E731
    elif case.op == "gated_residual":
        call = lambda: fn(*a, cu)  # noqa: E731
    elif case.op == "rope_2d":
        call = lambda: fn(inp["q"], inp["k"], cu, sizes, inp["freqs"], kw.get("positions", "grid"),  # noqa: E731
                          kw.get("mscale", 1.0))
    elif case.op == "qk_norm_rope":
        call = lambda: fn(inp["q"], inp["k"], cu, sizes, inp["freqs"], inp["q_weight"], inp["q_bias"],  # noqa: E731
                          inp["k_weight"], inp["k_bias"], kw.get("eps", 1e-5), kw.get("positions", "grid"),
                          kw.get("mscale", 1.0))
    else:
        raise Skip(f"no compiled reference for {case.op}")
    return _from_leaves(case, inp, call)


def standard_providers() -> dict[str, ProviderSpec]:
    return {
        "reference": ProviderSpec("reference", backend_provider("reference"),
                                  doc="pure-PyTorch reference (eager), the spec"),
        "reference_compiled": ProviderSpec("reference_compiled", compiled_reference_setup, compiled=True,
                                           doc="torch.compile(reference function, dynamic=True)"),
        "cpu": ProviderSpec("cpu", backend_provider("cpu"), ours=True, doc="C++/OpenMP kernel"),
        "cuda": ProviderSpec("cuda", backend_provider("cuda"), ours=True, doc="CUDA kernel"),
        "triton": ProviderSpec("triton", backend_provider("triton"), ours=True, doc="Triton kernel (GPU)"),
    }


class KernelSuite(ProviderSuite):
    """One op of nit_kernels over the NiT workloads; subclasses give ``op`` and ``bytes_moved``."""

    op: str = ""
    kw: dict = {}

    def __init__(self):
        self.name = self.op
        self.providers = standard_providers()

    def workloads(self, opts: RunOptions) -> list[Workload]:
        out = []
        # --quick: one width, the one with the odd head_dim (72), to keep the smoke test short
        widths = {"NiT-XL": WIDTHS["NiT-XL"]} if opts.quick else WIDTHS
        for pack, sizes in packs(opts.quick, opts.seed).items():
            for width, (d, h, dh) in widths.items():
                out.append(Workload(f"{pack}/{width}", f"{pack_stats(sizes)} {self.shape_doc(d, h, dh)}",
                                    {"sizes": sizes, "dims": (d, h, dh)}))
        return out

    def shape_doc(self, d: int, h: int, dh: int) -> str:
        return f"D={d}"

    def input_shape(self, d: int, h: int, dh: int) -> dict:
        return {"dim": d}

    def make_case(self, workload, device, dtype, opts) -> OpCase:
        packed = PackedSeqs.from_sizes(list(workload.params["sizes"]), device=device)
        d, h, dh = workload.params["dims"]
        raw = op_inputs(self.op, packed, seed=opts.seed, **self.input_shape(d, h, dh))
        # every provider starts from the same values, rounded once to the dtype under test
        inputs = {k: (v.to(dtype) if k in ACTIVATIONS[self.op] else v.float()).double() for k, v in raw.items()}
        with torch.no_grad():
            outs = call_op(self.op, packed, cast_inputs(self.op, inputs, dtype, requires_grad=False), "reference",
                           **self.kw)
        g = torch.Generator().manual_seed(opts.seed + 1)
        grad_outs = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, dtype)
                          for o in (outs if isinstance(outs, tuple) else (outs,)))
        case = OpCase(self.op, workload, packed, dtype, inputs, grad_outs, dict(self.kw))
        for precise in (True, False):  # computed here so that no provider's setup_s includes them
            case.reference(precise)
        if dtype in (torch.float16, torch.bfloat16):
            case.lowp_baselines = self.lowp_baselines(case)
        return case

    def lowp_baselines(self, case: OpCase) -> list:
        """Extra fp16/bf16 baselines (outputs, {name: grad}) computed entirely in the dtype; none here."""
        return []

    def verify(self, case, prepared, outs, grads):
        return verify_against_reference(case, prepared, outs, grads)

    def work(self, case: OpCase, pass_: str):
        n, b = case.packed.total_tokens, case.packed.num_seqs
        esize = torch.finfo(case.dtype).bits // 8
        fwd, bwd = self.bytes_moved(n, b, *case.dims, esize)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_], "bytes"

    def bytes_moved(self, n: int, b: int, d: int, h: int, dh: int, esize: int) -> tuple[int, int]:
        """(forward, backward) bytes an ideal kernel reads and writes once each."""
        raise NotImplementedError
