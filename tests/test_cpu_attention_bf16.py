"""bf16 CPU varlen attention on each path the kernel can take (NIT_CPU_ATTENTION_ISA).

"amx" and "avx512_bf16": bf16 tiles (csrc/cpu/attention_bf16.cpp) whose GEMMs oneDNN's brgemm runs
on AMX-BF16 tiles or, where AMX is absent, with AVX512-BF16 (vdpbf16ps); a process runs the one
oneDNN detects, so the avx512_bf16 tests run on an AMX CPU in a child process started with
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16. "fp32": the fp32 tiles, which every CPU runs. Each path is
judged against the float64 reference by the accuracy rule of nit_kernels.testing (error <= 2x that
of the reference run in bf16 + a small atol), forward and gradients, on the shapes that stress the
tiling (odd head_dim, dv != d, grouped-query heads, cross lengths, causal rows without keys, images
split across backward tasks); NaN and inf propagate as through the reference; huge softmax scales
keep finite gradients; results do not depend on the thread count. Unforced, each image takes the
bf16 tiles or the fp32 tiles by its length, as csrc/cpu/attention_bf16.h documents.
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nit_kernels import dispatch
from nit_kernels.testing import assert_accuracy, assert_close
# the same pack, poison and reference helpers as the fp32 tests
from test_cpu_attention import _cu, _poison, attention_case, reference_pair

CPU = dispatch.get("cpu")
pytestmark = pytest.mark.skipif(not CPU.implements("varlen_attention"),
                                reason=f"cpu backend has no varlen_attention: {CPU.load_error()}")
ENV_ISA = "NIT_CPU_ATTENTION_ISA"
# "default": unforced, each image on the path its length gets (a pack mixes both paths, and an image
# can run its forward on one and its backward on the other)
ISAS = ["amx", "avx512_bf16", "fp32", "default"]


def _min_tokens(backward, head_dim):
    """attention_bf16.h: unforced, an image takes the bf16 tiles when its query and key counts are both
    at least this."""
    return (32 if head_dim <= 64 else 48) if backward else 32


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _runs(isa):
    """Whether this process can force `isa` (the bf16 tiles run on the ISA oneDNN detects)."""
    before = os.environ.get(ENV_ISA)
    os.environ[ENV_ISA] = isa
    try:
        t = torch.zeros(2, 1, 8, dtype=torch.bfloat16)
        cu = torch.tensor([0, 2], dtype=torch.int32)
        torch.ops.nit.varlen_attention_fwd(t, t, t, cu, cu, 2, 2, 1.0, False)
        return True
    except RuntimeError as e:
        if "needs oneDNN's brgemm" not in str(e):
            raise
        return False
    finally:
        os.environ.pop(ENV_ISA) if before is None else os.environ.__setitem__(ENV_ISA, before)


def _use(isa, monkeypatch):
    if isa == "default":
        monkeypatch.delenv(ENV_ISA, raising=False)
        return
    if not _runs(isa):
        pytest.skip(f"oneDNN does not run bf16 on {isa} in this process")
    monkeypatch.setenv(ENV_ISA, isa)


def _default_isa():
    """The path long bf16 images take unforced: amx where oneDNN runs it, else fp32 (avx512_bf16 is
    slower than the fp32 tiles, csrc/cpu/attention_bf16.h: it runs only when forced)."""
    return "amx" if _runs("amx") else "fp32"


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs(lq, lk, heads, kv_heads, head_dim, dv, seed):
    """q, k, v, dout in float64 holding bf16-representable values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).bfloat16().double()

    nq, nk_ = sum(lq), sum(lk)
    return r(nq, heads, head_dim), r(nk_, kv_heads, head_dim), r(nk_, kv_heads, dv), r(nq, heads, dv)


def _run(q, k, v, do, cu_q, cu_k, scale, causal):
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    out, lse = torch.ops.nit.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, scale, causal)
    grads = torch.ops.nit.varlen_attention_bwd(do, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, causal)
    return (out, lse) + tuple(grads)


def _scale_of(t):
    finite = t[torch.isfinite(t)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def check_bf16(lq, lk=None, *, heads=2, kv_heads=None, head_dim=64, dv=None, causal=False, scale=None, seed=0):
    cu_q, cu_k, scale, (q, k, v, do) = attention_case(lq, lk, heads, kv_heads, head_dim, dv, scale, seed,
                                                      inputs=_inputs)
    lo = [t.bfloat16() for t in (q, k, v, do)]
    out, lse, *grads = _run(*lo, cu_q, cu_k, scale, causal)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads)
    (ref, ref_lo), (g_ref, g_lo) = reference_pair((q, k, v, do), lo, cu_q, cu_k, scale, causal)
    assert_accuracy(out, ref, ref_lo, name="out", atol=1e-3 * _scale_of(ref))
    for name, gk, gh, gl in zip(("dq", "dk", "dv"), grads, g_ref, g_lo):
        assert_accuracy(gk, gh, gl, name=name, atol=1e-3 * _scale_of(gh))


SHAPES = {
    "nit-s": dict(lq=[64, 130, 1], heads=6, head_dim=64),
    # images of 1x1, 1x7, 5x1, 3x5, 4x4, 2x9 tokens: with P and dS rounded to bf16 once, dk missed the rule
    "odd images, causal": dict(lq=[1, 7, 5, 15, 16, 18], heads=2, head_dim=64, causal=True),
    "nit-xl head_dim 72, causal": dict(lq=[5, 100, 64], lk=[9, 130, 64], heads=4, head_dim=72, causal=True),
    "odd head_dim 13, dv 40, gqa": dict(lq=[3, 70, 20], lk=[7, 41, 20], heads=4, kv_heads=2, head_dim=13, dv=40),
    "head_dim 128, more queries than keys, causal": dict(lq=[9, 130, 40], lk=[5, 100, 39], heads=2,
                                                         head_dim=128, causal=True),
    "empty and 1-token images": dict(lq=[0, 1, 17, 0], lk=[3, 1, 17, 0], heads=2, head_dim=64),
    "image split over backward tasks": dict(lq=[1100, 5], lk=[1000, 9], heads=2, kv_heads=1, head_dim=72),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_bf16_matches_the_reference(shape, isa, monkeypatch):
    _use(isa, monkeypatch)
    check_bf16(**SHAPES[shape])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [0.0, -0.3])
def test_bf16_zero_and_negative_softmax_scale(scale, isa, monkeypatch):
    _use(isa, monkeypatch)
    check_bf16([10, 70], head_dim=64, causal=True, scale=scale)


NONFINITE = {
    "nan in one query row": ([10, 10], [10, 10], False, _poison("q", 3, 0)),
    "one nan in k": ([10, 10], [10, 10], False, _poison("k", 2, 1, 0)),
    "one nan in v": ([10, 10], [10, 10], False, _poison("v", 12, 0, 5)),
    "all keys of an image -inf": ([10, 10], [10, 10], False, _poison("k", slice(0, 10), value=float("-inf"))),
    "inf in one query row": ([10, 10], [10, 10], False, _poison("q", 14, 1, value=float("inf"))),
    "nan key in a later tile": ([70, 5], [130, 5], False, _poison("k", 100, 1, 3)),
    "causal, nan query of a row without keys": ([6], [2], True, _poison("q", 1)),
    "causal, nan in the first key": ([6, 3], [2, 3], True, _poison("k", 0, 1, 2)),
}


def _autograd(q, k, v, do, cu_q, cu_k, scale, causal, backend):
    import nit_kernels as nk

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    out = nk.varlen_attention(*leaves, cu_q, cu_k, mq, mk, softmax_scale=scale, causal=causal, backend=backend)
    return (out,) + torch.autograd.grad(out, leaves, do)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", NONFINITE, ids=list(NONFINITE))
def test_bf16_nan_and_inf_propagate_like_the_reference(case, isa, monkeypatch):
    _use(isa, monkeypatch)
    lq, lk, causal, poison = NONFINITE[case]
    q, k, v, do = _inputs(lq, lk, 2, 2, 16, 16, 7)
    t = dict(q=q, k=k, v=v, do=do)
    poison(t)
    cu_q, cu_k = _cu(lq), _cu(lk)
    with _threads(1):
        ref = _autograd(q, k, v, do, cu_q, cu_k, 0.25, causal, "reference")
    got = _autograd(*(t[n].bfloat16() for n in ("q", "k", "v", "do")), cu_q, cu_k, 0.25, causal, "cpu")
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        # same NaN/inf positions; finite values within bf16 rounding of the float64 result
        assert_close(a, e, atol=3e-2 * _scale_of(e), rtol=2e-2, name=name)
    assert torch.isnan(got[0]).any() or case.startswith("causal, nan query of a row without"), "nothing propagated"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_huge_softmax_scale_gives_finite_reference_gradients(causal, isa, monkeypatch):
    # scale 1e30: every softmax row is one-hot; dk, dv must not blow up to NaN/inf
    _use(isa, monkeypatch)
    lq = [10, 10, 70]
    cu = _cu(lq)
    for seed in range(3):
        for head_dim in (16, 64):
            q, k, v, do = _inputs(lq, lq, 2, 2, head_dim, head_dim, seed)
            with _threads(1):
                ref = _autograd(q, k, v, do, cu, cu, 1e30, causal, "reference")
            got = _autograd(*(t.bfloat16() for t in (q, k, v, do)), cu, cu, 1e30, causal, "cpu")
            for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
                assert torch.isfinite(a).all(), f"{name} not finite (seed {seed}, head_dim {head_dim})"
                assert_close(a, e, atol=3e-2 * _scale_of(e), rtol=2e-2, name=name)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_thread_count_does_not_change_results(isa, monkeypatch):
    _use(isa, monkeypatch)
    # the 1,100-query image is split over backward tasks on both paths (partial dK/dV summed)
    lq, lk = [1100, 1, 130, 0, 300], [1050, 2, 130, 3, 300]
    args = [t.bfloat16() for t in _inputs(lq, lk, 4, 2, 72, 72, 5)] + [_cu(lq), _cu(lk), 0.1, True]
    with _threads(1):
        one = _run(*args)
    with _threads(2):
        two = _run(*args)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads: {(a.float() - b.float()).abs().max()}"


def _per_image(outs, cu):
    """Split tensors [N, ...] (and lse [H, N]) of a pack into their images."""
    cu, n = cu.tolist(), cu[-1].item()
    return [[t[a:b] if t.shape[0] == n else t[:, a:b] for t in outs] for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize("head_dim", [64, 72])
def test_default_takes_the_bf16_tiles_for_long_images_only(head_dim, monkeypatch):
    """Unforced, an image of at least _min_tokens tokens runs on the bf16 tiles (amx) and a shorter one
    on the fp32 tiles: the images of one pack give bit for bit what the forced paths give them (each
    image is computed by its own tasks)."""
    lq = [16, 64, 40, 31, 48, 32, 47, 1]
    isa = _default_isa()
    q, k, v, do = (t.bfloat16() for t in _inputs(lq, lq, 2, 2, head_dim, head_dim, 1))
    cu = _cu(lq)
    fwd = {}
    for setting in (None, isa, "fp32"):
        if setting is None:
            monkeypatch.delenv(ENV_ISA, raising=False)
        else:
            monkeypatch.setenv(ENV_ISA, setting)
        fwd[setting] = torch.ops.nit.varlen_attention_fwd(q, k, v, cu, cu, 64, 64, 0.125, False)
    out, lse = fwd["fp32"]  # one forward's results for every backward
    bwd = {}
    for setting in (None, isa, "fp32"):
        if setting is None:
            monkeypatch.delenv(ENV_ISA, raising=False)
        else:
            monkeypatch.setenv(ENV_ISA, setting)
        bwd[setting] = torch.ops.nit.varlen_attention_bwd(do, q, k, v, out, lse, cu, cu, 64, 64, 0.125, False)
    for pass_, res, least in (("forward", fwd, _min_tokens(False, head_dim)),
                              ("backward", bwd, _min_tokens(True, head_dim))):
        got, tiles, fp32 = (_per_image(res[s], cu) for s in (None, isa, "fp32"))
        for i, n in enumerate(lq):
            want = tiles[i] if n >= least and isa != "fp32" else fp32[i]
            path = isa if n >= least else "fp32"
            assert all(torch.equal(a, b) for a, b in zip(got[i], want)), \
                f"{pass_}: the {n}-token image did not run on the {path} path"
            if isa != "fp32" and n > 1:  # the two paths are told apart by their bits
                assert not all(torch.equal(a, b) for a, b in zip(tiles[i], fp32[i])), \
                    f"{pass_}: {isa} and fp32 paths gave identical bits on the {n}-token image"


def test_emulated_cpu_without_amx_runs_the_avx512_bf16_path():
    """On a CPU with AMX-BF16 and AVX512-BF16, a child process with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16
    (oneDNN then ignores AMX) detects avx512_bf16, passes this module's avx512_bf16 tests and runs
    every image on the fp32 tiles unforced."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("this process already runs under ONEDNN_MAX_CPU_ISA")
    if not ({"avx512_bf16", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags()):
        pytest.skip("the CPU has no AVX512-BF16")
    if not _runs("amx"):
        pytest.skip("the avx512_bf16 tests ran in this process")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")
    env.pop(ENV_ISA, None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "(avx512_bf16 or default_takes) and not emulated"], env=env, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=1800)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


def test_isa_setting_is_checked(monkeypatch):
    lq = [4]
    args = [t.bfloat16() for t in _inputs(lq, lq, 1, 1, 8, 8, 0)] + [_cu(lq), _cu(lq), 0.3, False]
    monkeypatch.setenv(ENV_ISA, "sse")
    with pytest.raises(RuntimeError, match="NIT_CPU_ATTENTION_ISA must be amx, avx512_bf16 or fp32, got 'sse'"):
        _run(*args)
    # at most one of the two bf16 ISAs runs in a process: the other one is refused
    refused = [isa for isa in ("amx", "avx512_bf16") if not _runs(isa)]
    assert refused
    for isa in refused:
        monkeypatch.setenv(ENV_ISA, isa)
        with pytest.raises(RuntimeError, match=f"NIT_CPU_ATTENTION_ISA={isa} needs oneDNN's brgemm"):
            _run(*args)


def test_other_dtypes_ignore_the_isa_setting(monkeypatch):
    # fp32 and fp16 inputs always run the fp32 tiles: forcing a bf16 ISA must not change their bits
    lq = [30, 50]
    base = _inputs(lq, lq, 2, 2, 32, 32, 4)
    isa = _default_isa()
    if isa == "fp32":
        pytest.skip("no bf16 tiles here")
    for dtype in (torch.float32, torch.float16):
        args = [t.to(dtype) for t in base] + [_cu(lq), _cu(lq), 0.2, True]
        monkeypatch.setenv(ENV_ISA, "fp32")
        ref = _run(*args)
        monkeypatch.setenv(ENV_ISA, isa)
        assert all(torch.equal(a, b) for a, b in zip(ref, _run(*args))), dtype
