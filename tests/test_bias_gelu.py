"""bias_gelu: gelu_tanh(x + bias) and its one-pass backward (dx, dbias, recomputed y).

Against the fp64 reference in fp32/fp16/bf16 (error bounded by the rounding of the output dtype
plus the kernel's exp approximation), NaN propagation, widths that are not multiples of the
vector width, row counts that are not multiples of the row block, bias in another dtype than x,
bad inputs, opcheck of the raw ops, autograd through the public function, and dispatch of the
backends without a kernel to the reference.
"""
import pytest
import torch
import torch.nn.functional as F

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.backends import reference as ref

_WHY = dispatch.get("cpu").load_error()
_HAS_CPU = _WHY is None and dispatch.get("cpu").implements("bias_gelu")
cpu_only = pytest.mark.skipif(not _HAS_CPU, reason=f"cpu kernel of bias_gelu unavailable: {_WHY}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# per-element tolerance relative to max(1, |value|): half an ulp of the output dtype for the final
# rounding, plus the error of the fp32 math (exp polynomial, division) for fp32
_TOL = {torch.float32: 2e-6, torch.float16: 2 ** -11 + 2e-6, torch.bfloat16: 2 ** -8 + 2e-6}


def _data(n, h, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * scale).to(dtype)
    bias = torch.randn(h, generator=g)
    dy = torch.randn(n, h, generator=g).to(dtype)
    return x, bias, dy


def _exact(x, bias, dy):
    """fp64: y, dx, dbias of gelu_tanh(x + bias), from the rounded inputs."""
    z = x.double() + bias.double()
    y = F.gelu(z, approximate="tanh")
    dx = torch.ops.aten.gelu_backward(dy.double(), z, approximate="tanh")
    return y, dx, dx.sum(0)


def _close(got, want, tol, name):
    err = ((got.double() - want) / want.abs().clamp_min(1.0)).abs().max().item()
    assert err <= tol, f"{name}: max relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_only)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h", [(1, 1), (7, 13), (33, 40), (70, 1536), (5, 385)])
def test_forward_and_backward_match_fp64(backend, dtype, n, h):
    x, bias, dy = _data(n, h, dtype, seed=n * 1000 + h)
    y, dx, db = _exact(x, bias, dy)
    got_y = nk.bias_gelu(x, bias, backend=backend)
    got_dx, got_db, got_y2 = nk.bias_gelu_backward(dy, x, bias, backend=backend)
    assert got_y.dtype == dtype and got_dx.dtype == dtype and got_y2.dtype == dtype
    assert got_db.dtype == bias.dtype and got_db.shape == bias.shape
    _close(got_y, y, _TOL[dtype], "y")
    _close(got_y2, y, _TOL[dtype], "y (backward)")
    # dx: gelu' sums terms of size ~1 that cancel near z = -0.75 (PyTorch's fp32 gelu_backward
    # is off by up to 4e-6 here, the kernel by 2e-6)
    _close(got_dx, dx, _TOL[dtype] + 6e-6, "dx")
    # dbias sums the fp32 dx before rounding: its error is that of fp32 sums of n terms
    _close(got_db, db, 1e-5 * max(1, n) ** 0.5 + 2e-6, "dbias")


@cpu_only
def test_wide_range_of_inputs_fp32():
    """Every regime of the approximation: deep negative (y -> 0), around 0, large positive (y -> x)."""
    x = torch.linspace(-30, 30, 24001).reshape(1, -1)
    bias = torch.zeros(x.shape[1])
    dy = torch.ones_like(x)
    y, dx, _ = _exact(x, bias, dy)
    got_dx, _, got_y = nk.bias_gelu_backward(dy, x, bias, backend="cpu")
    # absolute error, as y and dx underflow for very negative x
    assert (nk.bias_gelu(x, bias, backend="cpu").double() - y).abs().max() <= 4e-6 * y.abs().clamp_min(1).max()
    assert ((got_y.double() - y).abs() / y.abs().clamp_min(1)).max() <= 2e-6
    assert ((got_dx.double() - dx).abs() / dx.abs().clamp_min(1)).max() <= 4e-6


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_only)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(backend, dtype):
    x, bias, dy = _data(9, 21, dtype)
    x[2, 5] = float("nan")
    bias[17] = float("nan")
    dy[4, 3] = float("nan")
    y = nk.bias_gelu(x, bias, backend=backend)
    dx, db, y2 = nk.bias_gelu_backward(dy, x, bias, backend=backend)
    for t in (y, y2):
        assert torch.isnan(t[2, 5]) and torch.isnan(t[:, 17]).all()
        assert torch.isnan(t).sum() == t.shape[0] + 1  # nothing else
    assert torch.isnan(dx[2, 5]) and torch.isnan(dx[:, 17]).all() and torch.isnan(dx[4, 3])
    assert torch.isnan(db[5]) and torch.isnan(db[17]) and torch.isnan(db[3])
    assert torch.isnan(db).sum() == 3


@cpu_only
@pytest.mark.parametrize("bias_dtype", DTYPES)
def test_bias_in_another_dtype(bias_dtype):
    x, bias, dy = _data(20, 24, torch.bfloat16)
    bias = bias.to(bias_dtype)
    got = nk.bias_gelu_backward(dy, x, bias, backend="cpu")
    want = ref.bias_gelu_bwd(dy, x, bias)
    assert got[1].dtype == bias_dtype
    for name, a, b in zip(("dx", "dbias", "y"), got, want):
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-2, msg=name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=cpu_only)])
def test_autograd_through_the_public_function(backend):
    x, bias, dy = _data(11, 19, torch.float64 if backend == "reference" else torch.float32)
    x, bias = x.requires_grad_(), bias.to(x.dtype).requires_grad_()
    y = nk.bias_gelu(x, bias, backend=backend)
    gx, gb = torch.autograd.grad(y, (x, bias), dy)
    # autograd runs the same backend's backward
    want_dx, want_db, _ = nk.bias_gelu_backward(dy, x.detach(), bias.detach(), backend=backend)
    torch.testing.assert_close(gx, want_dx, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, want_db, rtol=1e-12, atol=0)
    if backend == "reference":
        assert torch.autograd.gradcheck(lambda a, b: nk.bias_gelu(a, b, backend="reference"),
                                        (x[:3, :5].detach().clone().requires_grad_(),
                                         bias[:5].detach().clone().requires_grad_()))


@cpu_only
def test_results_do_not_depend_on_the_thread_count():
    x, bias, dy = _data(300, 77, torch.bfloat16)
    prev = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(nk.bias_gelu_backward(dy, x, bias, backend="cpu"))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


@cpu_only
def test_opcheck_of_the_raw_ops():
    for dtype in DTYPES:
        x, bias, dy = _data(6, 10, dtype)
        torch.library.opcheck(torch.ops.nit.bias_gelu_fwd, (x, bias))
        torch.library.opcheck(torch.ops.nit.bias_gelu_bwd, (dy, x, bias),
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_give_clear_errors():
    x, bias, dy = _data(4, 6, torch.float32)
    cases = [
        (lambda: nk.bias_gelu(x[0], bias), r"x must be \[N, H\], got shape \(6,\)"),
        (lambda: nk.bias_gelu(x, bias[:5]), r"bias must have shape \[6\] .* got \(5,\)"),
        (lambda: nk.bias_gelu(x.long(), bias), "x must be a floating-point tensor"),
        (lambda: nk.bias_gelu_backward(dy[:3], x, bias), r"dy must match x \(\(4, 6\)"),
        (lambda: nk.bias_gelu_backward(dy.bfloat16(), x, bias), "dy must match x"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@cpu_only
def test_raw_ops_refuse_bad_inputs():
    x, bias, dy = _data(4, 6, torch.float32)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[6\], got \[5\]"):
        torch.ops.nit.bias_gelu_fwd(x, bias[:5])
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.nit.bias_gelu_fwd(x.t(), torch.zeros(4))
    with pytest.raises(RuntimeError, match="dy has dtype"):
        torch.ops.nit.bias_gelu_bwd(dy.half(), x, bias)


def test_backends_without_a_kernel_run_the_reference():
    """bias_gelu has a cpu kernel only: float64, and any backend that lacks it, fall back to the reference."""
    name, _ = dispatch.select(dispatch.Call("bias_gelu", torch.device("cpu"), torch.float64))
    assert name == "reference"
    for b in ("cuda", "triton", "flash_attn", "cuda_sim"):
        assert not dispatch.get(b).implements("bias_gelu"), b
    if _HAS_CPU:
        assert dispatch.select(dispatch.Call("bias_gelu", torch.device("cpu"), torch.bfloat16))[0] == "cpu"


def _has_avx512() -> bool:
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


@cpu_only
@pytest.mark.parametrize("bits", ["256", pytest.param("512", marks=pytest.mark.skipif(
    not _has_avx512(), reason="the CPU has no AVX-512F/BW/VL/DQ"))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_vector_width(monkeypatch, bits, dtype):
    """Both row kernels (forced by NIT_CPU_GELU_VECTOR_BITS) against fp64, odd widths, NaN."""
    monkeypatch.setenv("NIT_CPU_GELU_VECTOR_BITS", bits)
    for n, h in ((3, 1), (5, 15), (4, 17), (40, 33), (33, 1536)):
        x, bias, dy = _data(n, h, dtype, seed=h)
        x[0, -1] = float("nan")
        y, dx, db = _exact(x, bias, dy)
        got_y = nk.bias_gelu(x, bias, backend="cpu")
        got_dx, got_db, got_y2 = nk.bias_gelu_backward(dy, x, bias, backend="cpu")
        for t in (got_y, got_y2, got_dx):
            assert torch.isnan(t[0, -1]) and torch.isnan(t).sum() == 1
        assert torch.isnan(got_db[-1]) and torch.isnan(got_db).sum() == 1
        keep = (slice(None), slice(None, h - 1)) if h > 1 else (slice(1, None), slice(None))
        _close(got_y[keep], y[keep], _TOL[dtype], "y")
        _close(got_y2[keep], y[keep], _TOL[dtype], "y (backward)")
        _close(got_dx[keep], dx[keep], _TOL[dtype] + 6e-6, "dx")
        if h > 1:
            _close(got_db[:-1], db[:-1], 1e-5 * max(1, n) ** 0.5 + 2e-6, "dbias")


def _has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)


@cpu_only
@pytest.mark.skipif(not (_has_avx512() and _has_avx512_bf16()), reason="the CPU has no AVX-512 with AVX512-BF16")
@pytest.mark.parametrize("native", ["0", "1"])
def test_bf16_rounding_of_the_512_bit_rows(monkeypatch, native):
    """The 512-bit rows round bf16 by the CPU's conversion or by integer arithmetic
    (NIT_CPU_GELU_NATIVE_BF16): both round to nearest even, keep NaN, and agree."""
    monkeypatch.setenv("NIT_CPU_GELU_VECTOR_BITS", "512")
    x, bias, dy = _data(37, 45, torch.bfloat16, seed=3)
    x[2, 5] = float("nan")
    monkeypatch.setenv("NIT_CPU_GELU_NATIVE_BF16", native)
    got = (nk.bias_gelu(x, bias, backend="cpu"),) + tuple(nk.bias_gelu_backward(dy, x, bias, backend="cpu"))
    monkeypatch.setenv("NIT_CPU_GELU_NATIVE_BF16", "1" if native == "0" else "0")
    other = (nk.bias_gelu(x, bias, backend="cpu"),) + tuple(nk.bias_gelu_backward(dy, x, bias, backend="cpu"))
    y, dx, db = _exact(x, bias, dy)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[2, 5] = False
    for name, a, b, want in zip(("y", "dx", "dbias", "y (backward)"), got, other, (y, dx, db, y)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0, msg=name)
        if name != "dbias":
            assert torch.isnan(a[2, 5])
            _close(a[keep], want[keep], _TOL[torch.bfloat16] + 6e-6, name)
    monkeypatch.setenv("NIT_CPU_GELU_NATIVE_BF16", "2")
    with pytest.raises(RuntimeError, match="NIT_CPU_GELU_NATIVE_BF16 must be 0 or 1"):
        nk.bias_gelu(x, bias, backend="cpu")


@cpu_only
def test_bad_vector_width_is_refused(monkeypatch):
    x, bias, _ = _data(2, 3, torch.float32)
    monkeypatch.setenv("NIT_CPU_GELU_VECTOR_BITS", "128")
    with pytest.raises(RuntimeError, match="NIT_CPU_GELU_VECTOR_BITS must be 256 or 512, got '128'"):
        nk.bias_gelu(x, bias, backend="cpu")
