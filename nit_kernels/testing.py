"""Helpers for checking a backend against the reference (used by the test suite; usable by anyone
adding a backend).

The accuracy rule follows flash-attention's tests: a low-precision kernel's error against the
fp32 reference may be at most ``factor`` times (default 2) the error of the reference run in that
same low precision, plus a small ``atol``. Failures say where the tensors differ.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .packed import PackedSeqs

__all__ = ["describe_mismatch", "assert_close", "assert_accuracy", "random_sizes", "ODD_PACKS"]

# Packs with the awkward shapes: 1x1, 1xW, Hx1, odd sizes, one image and many.
ODD_PACKS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((1, 1),),
    ((1, 7),),
    ((5, 1),),
    ((3, 5),),
    ((1, 1), (1, 7), (5, 1), (3, 5), (4, 4), (2, 9)),
    ((6, 6),) * 3,
)


def random_sizes(n: int, max_side: int = 12, seed: int = 0) -> list[tuple[int, int]]:
    """n random (h, w) token sizes in [1, max_side]^2, reproducible from seed."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(v) for v in torch.randint(1, max_side + 1, (n, 2), generator=g).tolist()]


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    """Where two tensors differ beyond atol + rtol*|expected|: count, worst index and values, NaN/inf."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    notes = []
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        notes.append(f"NaN disagreement at {idx}: actual {a[tuple(idx)].item()}, expected {e[tuple(idx)].item()}")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a & (a > 0), inf_e & (e > 0)) or not torch.equal(inf_a & (a < 0), inf_e & (e < 0)):
        idx = ((inf_a != inf_e) | (torch.sign(a) != torch.sign(e)) & inf_a).nonzero()[0].tolist()
        notes.append(f"inf disagreement at {idx}: actual {a[tuple(idx)].item()}, expected {e[tuple(idx)].item()}")
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = finite & (diff > atol + rtol * e.abs())
    if bad.any():
        worst = torch.where(bad, diff, torch.zeros_like(diff)).flatten().argmax()
        idx = list(torch.unravel_index(worst, a.shape)) if a.dim() else []
        idx = [int(i) for i in idx]
        notes.append(f"{int(bad.sum())}/{a.numel()} elements differ; worst at {idx}: actual "
                     f"{a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}, "
                     f"|diff| {diff.flatten()[worst].item():.3g} > atol {atol:g} + rtol {rtol:g}*|expected|")
    return "; ".join(notes)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = ""):
    """Elementwise |actual - expected| <= atol + rtol*|expected|, with a report of where it fails."""
    msg = describe_mismatch(actual, expected, atol, rtol)
    if msg:
        raise AssertionError(f"{name}: {msg}" if name else msg)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_accuracy(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, *, name: str = "",
                    factor: float = 2.0, atol: float = 1e-5):
    """max|out - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol (flash-attention's rule).

    out: the kernel under test; ref_fp32: the reference on the same inputs upcast to fp32;
    ref_lowp: the reference run with inputs and math in the low precision (for fp32 kernels,
    pass the reference in float64 as ref_fp32 and fp32 as ref_lowp).
    """
    if out.shape != ref_fp32.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_fp32.shape)}")
    if not torch.isfinite(out).all() and torch.isfinite(ref_fp32).all():
        raise AssertionError(f"{name}: non-finite output where the reference is finite; "
                             + describe_mismatch(out, ref_fp32, 0, 0))
    err, base = _max_err(out, ref_fp32), _max_err(ref_lowp, ref_fp32)
    bound = factor * base + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} > {factor:g} x reference-in-low-precision error {base:.3g} "
                             f"+ atol {atol:g}; " + describe_mismatch(out, ref_fp32, bound, 0))


def pack_of(sizes: Sequence[Sequence[int]], device: str | torch.device = "cpu") -> PackedSeqs:
    return PackedSeqs.from_sizes(list(sizes), device=device)


def per_image(packed: PackedSeqs) -> Iterable[PackedSeqs]:
    """One single-image pack per image of `packed` (for packing-invariance checks)."""
    for h, w in packed.size_list:
        yield PackedSeqs.from_sizes([(h, w)], device=packed.device)


def grads(out, inputs: Sequence[Optional[torch.Tensor]], grad_out) -> list[Optional[torch.Tensor]]:
    """d(sum(out * grad_out))/d(inputs) for tensors or tuples of tensors."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    gos = grad_out if isinstance(grad_out, (tuple, list)) else (grad_out,)
    live = [t for t in inputs if t is not None and t.requires_grad]
    gs = torch.autograd.grad(outs, live, gos, allow_unused=True)
    it = iter(gs)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


# ---------------------------------------------------------------------------------------------
# Op cases: build inputs for any op, call it on any backend, compare against the reference.
# ---------------------------------------------------------------------------------------------
# Inputs of each op that are activations (cast to the dtype under test) and that get gradients;
# the others (freqs, LayerNorm weights) are fp32 parameters.
ACTIVATIONS = {
    "adaln_modulate": ("x", "shift", "scale"),
    "gated_residual": ("x", "y", "gate"),
    "residual_adaln": ("x", "y", "gate", "shift", "scale"),
    "rope_2d": ("q", "k"),
    "qk_norm_rope": ("q", "k"),
    "varlen_attention": ("q", "k", "v"),
    "bias_gelu": ("x",),
}
PARAMS_WITH_GRAD = {"qk_norm_rope": ("q_weight", "q_bias", "k_weight", "k_bias"), "bias_gelu": ("bias",)}


def op_inputs(op: str, packed: PackedSeqs, *, dim: int = 64, heads: int = 2, kv_heads: Optional[int] = None,
              head_dim: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp64 random inputs of `op` for `packed` (cast them per dtype with `cast_inputs`)."""
    g = torch.Generator().manual_seed(seed)
    n, b, kvh = packed.total_tokens, packed.num_seqs, kv_heads or heads

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(packed.device)

    if op in ("adaln_modulate", "gated_residual", "residual_adaln"):
        # x has a non-zero mean and varied scale per row, as residual streams do
        x = r(n, dim) * (0.5 + r(n, 1).abs()) + r(n, 1)
        inp = {"x": x, "y": r(n, dim), "gate": r(b, dim, s=0.5), "shift": r(b, dim, s=0.5), "scale": r(b, dim, s=0.5)}
        return {k: inp[k] for k in ACTIVATIONS[op]}
    if op in ("rope_2d", "qk_norm_rope"):
        from .freqs import rope_freqs
        inp = {"q": r(n, heads, head_dim) + 0.3, "k": r(n, kvh, head_dim) - 0.2,
               "freqs": rope_freqs(head_dim).double().to(packed.device)}
        if op == "qk_norm_rope":
            inp.update(q_weight=1 + r(head_dim, s=0.2), q_bias=r(head_dim, s=0.2),
                       k_weight=1 + r(head_dim, s=0.2), k_bias=r(head_dim, s=0.2))
        return inp
    if op == "varlen_attention":
        return {"q": r(n, heads, head_dim), "k": r(n, kvh, head_dim), "v": r(n, kvh, head_dim)}
    if op == "bias_gelu":  # rows of the pack's tokens (the op itself ignores the packing)
        return {"x": r(n, dim, s=2.0), "bias": r(dim)}
    raise ValueError(f"unknown op {op!r}")


def cast_inputs(op: str, inputs: dict, dtype: torch.dtype, param_dtype: torch.dtype = torch.float32,
                requires_grad: bool = True) -> dict[str, torch.Tensor]:
    """Activations to `dtype`, parameters to `param_dtype`; fresh leaves with requires_grad."""
    out = {}
    for k, v in inputs.items():
        t = v.to(dtype if k in ACTIVATIONS[op] else param_dtype).detach()
        if requires_grad and (k in ACTIVATIONS[op] or k in PARAMS_WITH_GRAD.get(op, ())):
            t.requires_grad_(True)
        out[k] = t
    return out


def call_op(op: str, packed: PackedSeqs, inp: dict, backend: Optional[str] = None, **kw):
    """Call the public API of `op` with the inputs of `op_inputs` (kw: positions, mscale, causal, eps)."""
    from . import ops

    if op == "adaln_modulate":
        return ops.adaln_modulate(inp["x"], inp["shift"], inp["scale"], packed, backend=backend, **kw)
    if op == "gated_residual":
        return ops.gated_residual(inp["x"], inp["y"], inp["gate"], packed, backend=backend, **kw)
    if op == "residual_adaln":
        return ops.residual_adaln(inp["x"], inp["y"], inp["gate"], inp["shift"], inp["scale"], packed,
                                  backend=backend, **kw)
    if op == "rope_2d":
        return ops.rope_2d(inp["q"], inp["k"], packed, inp["freqs"], backend=backend, **kw)
    if op == "qk_norm_rope":
        return ops.qk_norm_rope(inp["q"], inp["k"], packed, inp["freqs"], q_weight=inp["q_weight"],
                                q_bias=inp["q_bias"], k_weight=inp["k_weight"], k_bias=inp["k_bias"],
                                backend=backend, **kw)
    if op == "varlen_attention":
        cu, m = packed.cu_seqlens, packed.max_seqlen
        return ops.varlen_attention(inp["q"], inp["k"], inp["v"], cu, cu, m, m, backend=backend, **kw)
    if op == "bias_gelu":
        return ops.bias_gelu(inp["x"], inp["bias"], backend=backend, **kw)
    raise ValueError(f"unknown op {op!r}")


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _forward_and_grads(op, packed, inputs, dtype, param_dtype, backend, grad_seed, kw):
    inp = cast_inputs(op, inputs, dtype, param_dtype)
    outs = _as_tuple(call_op(op, packed, inp, backend, **kw))
    g = torch.Generator().manual_seed(grad_seed)
    gos = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    names = [k for k, v in inp.items() if v.requires_grad]
    gs = torch.autograd.grad(outs, [inp[k] for k in names], gos, allow_unused=True)
    return outs, dict(zip(names, gs))


# atol per dtype, relative to the largest reference magnitude; the 2x rule is what usually binds
_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def check_against_reference(op: str, backend: str, packed: PackedSeqs, dtype: torch.dtype, *, seed: int = 0,
                            factor: float = 2.0, grads: bool = True, shape: Optional[dict] = None, **kw):
    """Forward and every gradient of `backend` against the reference, by the accuracy rule.

    fp32 runs are judged against the fp64 reference (with the fp32 reference as the baseline);
    fp16/bf16 runs against the fp32 reference on the same rounded inputs (with the reference
    run on the low-precision inputs as the baseline).
    """
    inputs = op_inputs(op, packed, seed=seed, **(shape or {}))
    if dtype == torch.float32:
        hi = (torch.float64, torch.float64)
        lo = (torch.float32, torch.float32)
        rounded = inputs
    else:
        rounded = {k: (v.to(dtype).double() if k in ACTIVATIONS[op] else v.float().double()) for k, v in inputs.items()}
        hi = (torch.float64, torch.float64)
        lo = (dtype, torch.float32)
    out_hi, g_hi = _forward_and_grads(op, packed, rounded, *hi, "reference", seed + 1, kw)
    out_lo, g_lo = _forward_and_grads(op, packed, rounded, *lo, "reference", seed + 1, kw)
    out_k, g_k = _forward_and_grads(op, packed, rounded, dtype, torch.float32, backend, seed + 1, kw)
    for i, (o, oh, ol) in enumerate(zip(out_k, out_hi, out_lo)):
        if o.dtype != dtype:
            raise AssertionError(f"{op}[{backend}] output {i} has dtype {o.dtype}, expected {dtype}")
        scale = max(1.0, oh.abs().max().item()) if oh.numel() else 1.0
        assert_accuracy(o, oh, ol, name=f"{op}[{backend},{dtype}] output {i}", factor=factor,
                        atol=_ATOL[dtype] * scale)
    if not grads:
        return
    for name, gk in g_k.items():
        gh, gl = g_hi[name], g_lo[name]
        if gh is None:
            continue
        if gk is None:
            raise AssertionError(f"{op}[{backend},{dtype}]: no gradient for {name}")
        scale = max(1.0, gh.abs().max().item())
        assert_accuracy(gk, gh, gl, name=f"{op}[{backend},{dtype}] d{name}", factor=factor, atol=_ATOL[dtype] * scale)
