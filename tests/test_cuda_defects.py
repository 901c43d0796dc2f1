"""Numerical and coverage properties of the compiled kernels that a plain reference grid misses.

Each test runs on the "cpu" backend where the property applies there, and on "cuda_sim" (the
csrc/cuda sources executed on the host by the SIMT simulator) when that backend is built;
without it the cuda_sim cases skip with the reason "cuda_sim backend not built".

- residual_adaln backward on residual streams whose row mean dwarfs the row std: the
  normalised values must come from x_new in fp32, not from x_new rounded to fp16/bf16.
"""
import pytest
import torch

import nit_kernels as nk
from nit_kernels import backends
from nit_kernels.testing import _ATOL, _forward_and_grads, assert_accuracy

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW = (torch.float16, torch.bfloat16)


def _why_not(backend: str):
    """None if `backend` can run here, else the skip reason."""
    if backend == "cuda_sim":
        if "cuda_sim" not in backends.BACKENDS or backends.get("cuda_sim").load_error() is not None:
            return "cuda_sim backend not built"
        return None
    return backends.get(backend).load_error()


def _backend_param(name: str):
    why = _why_not(name)
    return pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why)), id=name)


BACKENDS = [_backend_param("cpu"), _backend_param("cuda_sim")]


def _check(op, backend, packed, inputs, dtype, **kw):
    """Forward and every gradient of `backend` against the reference by the accuracy rule, on
    `inputs` (fp64) rounded to `dtype` (as nit_kernels.testing.check_against_reference does)."""
    rounded = {k: v.to(dtype).double() for k, v in inputs.items()}
    hi = (torch.float64, torch.float64)
    lo = (torch.float32, torch.float32) if dtype == torch.float32 else (dtype, torch.float32)
    out_hi, g_hi = _forward_and_grads(op, packed, rounded, *hi, "reference", 1, kw)
    out_lo, g_lo = _forward_and_grads(op, packed, rounded, *lo, "reference", 1, kw)
    out_k, g_k = _forward_and_grads(op, packed, rounded, dtype, torch.float32, backend, 1, kw)
    pairs = [(f"output {i}", o, oh, ol) for i, (o, oh, ol) in enumerate(zip(out_k, out_hi, out_lo))]
    pairs += [(f"d{n}", g_k[n], g_hi[n], g_lo[n]) for n in g_k]
    for name, k, h, low in pairs:
        scale = max(1.0, h.abs().max().item()) if h.numel() else 1.0
        assert_accuracy(k, h, low, name=f"{op}[{backend},{dtype}] {name}", atol=_ATOL[dtype] * scale)


# ---------------------------------------------------------------------------------------------
# residual_adaln backward on real residual streams (row mean >> row std)
# ---------------------------------------------------------------------------------------------
def _residual_stream(packed, dim, mean_over_std, seed=0):
    """x, y, gate, shift, scale (fp64) with x_new = x + gate*y of row mean ~ mean_over_std x row std."""
    g = torch.Generator().manual_seed(seed)
    n, b = packed.total_tokens, packed.num_seqs

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    std = 0.5 + r(n, 1).abs()
    sign = torch.where(r(n, 1) >= 0, 1.0, -1.0)
    x = std * (r(n, dim) + sign * mean_over_std)
    return {"x": x, "y": r(n, dim) * std * 0.3, "gate": r(b, dim) * 0.5,
            "shift": r(b, dim) * 0.5, "scale": r(b, dim) * 0.5}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dim", [1, 2, 3, 5, 8])
def test_residual_adaln_backward_small_rows_with_large_mean(backend, dtype, dim):
    packed = nk.PackedSeqs.from_sizes([(1, 1), (3, 5), (2, 7)])
    _check("residual_adaln", backend, packed, _residual_stream(packed, dim, 6.0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mean_over_std", [4.0, 16.0])
def test_residual_adaln_backward_wide_rows_with_large_mean(backend, dtype, mean_over_std):
    packed = nk.PackedSeqs.from_sizes([(2, 3), (1, 5)])
    _check("residual_adaln", backend, packed, _residual_stream(packed, 1152, mean_over_std, seed=1), dtype)
