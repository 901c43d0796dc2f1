"""The triton backend inside PyTorch: determinism, torch.library registration (opcheck,
torch.compile), refusals, the GPU-only paths, and a compile check of the GPU kernels.

Tests marked `gpu` need a CUDA device and the compiled kernels: on a GPU machine run
``TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_integration.py``.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import nit_kernels as nk
from nit_kernels import PackedSeqs, dispatch
from nit_kernels.dispatch import Call
from nit_kernels.testing import ODD_PACKS, call_op, cast_inputs, check_against_reference, op_inputs

_WHY = dispatch.get("triton").load_error()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable: {_WHY}")

if _WHY is None:
    import nit_kernels.backends.triton as nkt
    from nit_kernels.backends.triton import _common

    if nkt.interpreting():
        _common.contiguous_interpreter_transpose()
    DEVICE = "cpu" if nkt.interpreting() else "cuda"
    COMPILED_GPU = not nkt.interpreting() and torch.cuda.is_available()
else:
    DEVICE, COMPILED_GPU = "cpu", False

COMPILE_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                             "triton_compile_check.py")


def _compile_check():
    """tools/triton_compile_check.py as a module (it is a script, not part of the package)."""
    import importlib.util
    if "triton_compile_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("triton_compile_check", COMPILE_CHECK)
        sys.modules[spec.name] = mod = importlib.util.module_from_spec(spec)  # its dataclasses look it up
        spec.loader.exec_module(mod)
    return sys.modules["triton_compile_check"]


needs_compiled_gpu = pytest.mark.skipif(
    not COMPILED_GPU, reason="needs the compiled kernels on a GPU (run with TRITON_INTERPRET=0 on a CUDA machine)")
SHAPES = {"adaln_modulate": {"dim": 40}, "gated_residual": {"dim": 40}, "residual_adaln": {"dim": 40},
          "rope_2d": {"heads": 2, "kv_heads": 1, "head_dim": 16}, "qk_norm_rope": {"heads": 2, "head_dim": 16},
          "varlen_attention": {"heads": 2, "head_dim": 24}}


def _packed(sizes=ODD_PACKS[4]):
    return PackedSeqs.from_sizes(sizes, device=DEVICE)


def _grads(op, packed, seed=0, **kw):
    inp = cast_inputs(op, op_inputs(op, packed, seed=seed, **SHAPES[op]), torch.float32)
    inp = {k: v.to(DEVICE).detach().requires_grad_(v.requires_grad) for k, v in inp.items()}
    outs = call_op(op, packed, inp, "triton", **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed + 1)
    gos = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outs]
    names = [k for k, v in inp.items() if v.requires_grad]
    return dict(zip(names, torch.autograd.grad(outs, [inp[k] for k in names], gos)))


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(SHAPES))
def test_deterministic_mode_gives_bitwise_repeatable_gradients(op):
    packed = _packed(ODD_PACKS[4] + ODD_PACKS[5])
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(op, packed), _grads(op, packed)
    finally:
        torch.use_deterministic_algorithms(False)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{op}: d{name} differs between two runs"


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual", "residual_adaln"])
def test_atomic_and_deterministic_reductions_agree(op):
    """The two reduction paths of the per-image gradients compute the same sums (up to order)."""
    packed = _packed(ODD_PACKS[4] + ODD_PACKS[5])
    fast = _grads(op, packed)
    torch.use_deterministic_algorithms(True)
    try:
        det = _grads(op, packed)
    finally:
        torch.use_deterministic_algorithms(False)
    for name in fast:
        torch.testing.assert_close(fast[name], det[name], rtol=1e-5, atol=1e-5, msg=f"{op}: d{name}")


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------
def _opcheck_cases():
    from nit_kernels.backends.triton import _checks
    ops = torch.ops.nit_triton
    p = _packed(((2, 3), (1, 4), (3, 1)))
    n, b, cu, sizes = p.total_tokens, p.num_seqs, p.cu_seqlens, p.sizes
    r = lambda *s: torch.randn(*s, device=DEVICE, requires_grad=True)  # noqa: E731
    f = nk.rope_freqs(16).to(DEVICE)
    w = lambda: torch.randn(16, device=DEVICE, requires_grad=True)  # noqa: E731
    cases = {name: (getattr(ops, name).default, args) for name, args in {
        "adaln_modulate_fwd": (r(n, 24), r(b, 24), r(b, 24), cu, 1e-6),
        "gated_residual_fwd": (r(n, 24), r(n, 24), r(b, 24), cu),
        "residual_adaln_fwd": (r(n, 24), r(n, 24), r(b, 24), r(b, 24), r(b, 24), cu, 1e-6),
        "rope_2d": (r(n, 2, 16), r(n, 1, 16), cu, sizes, f, "official", 1.5, False),
        "qk_norm_rope_fwd": (r(n, 2, 16), r(n, 2, 16), cu, sizes, f, w(), w(), w(), w(), 1e-5, "grid", 1.0),
        "varlen_attention_fwd": (r(n, 2, 24), r(n, 1, 24), r(n, 1, 24), cu, cu, p.max_seqlen, p.max_seqlen, 0.3, True),
    }.items()}
    cases["checked_cu_seqlens"] = (_checks._checked_op, (cu, n, p.max_seqlen, sizes, "op,cu_seqlens,max_seqlen"))
    return cases


@pytest.mark.parametrize("name", ["adaln_modulate_fwd", "gated_residual_fwd", "residual_adaln_fwd", "rope_2d",
                                  "qk_norm_rope_fwd", "varlen_attention_fwd", "checked_cu_seqlens"])
def test_opcheck(name):
    """Schema, fake kernel, autograd registration and AOT dispatch of each nit_triton op."""
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_through_the_public_api():
    """A block's worth of ops, backend="triton", compiled with fullgraph=True: same values and gradients."""
    p = _packed(((2, 3), (1, 4), (3, 3)))
    n, b, d, h, hd = p.total_tokens, p.num_seqs, 32, 2, 16
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in
              [(n, d), (n, d), (b, d), (b, d), (b, d), (n, h, hd), (n, h, hd), (n, h, hd), (hd,), (hd,)]]
    freqs = nk.rope_freqs(hd).to(DEVICE)

    def block(x, y, gate, shift, scale, q, k, v, w, bias):
        x, hmod = nk.residual_adaln(x, y, gate, shift, scale, p, backend="triton")
        hmod = nk.adaln_modulate(hmod, shift, scale, p, backend="triton")
        x = nk.gated_residual(x, hmod, gate, p, backend="triton")
        q, k = nk.qk_norm_rope(q, k, p, freqs, q_weight=w, q_bias=bias, k_weight=w, k_bias=bias, backend="triton")
        q, k = nk.rope_2d(q, k, p, freqs, positions="official", backend="triton")
        o = nk.varlen_attention(q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen, backend="triton")
        return x.square().sum() + (o * o.detach().sign()).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    want = block(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for i, (a, e) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"gradient of input {i}")


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def test_refuses_cpu_tensors_without_the_interpreter():
    """End to end in a fresh process without TRITON_INTERPRET: a clear reason, not a driver error."""
    code = (
        "import torch, nit_kernels as nk\n"
        "p = nk.PackedSeqs.from_sizes([(2, 2)])\n"
        "try:\n"
        "    nk.adaln_modulate(torch.randn(4, 8), torch.zeros(1, 8), torch.zeros(1, 8), p, backend='triton')\n"
        "except nk.BackendUnavailable as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "TRITON_INTERPRET=1" in r.stdout, r.stdout


def test_refusal_reasons(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(nkt, "INTERPRETED", True)
    assert "head_dim 160 is not supported" in nkt.refuse(Call("varlen_attention", cpu, torch.float16, head_dim=160))
    assert "bfloat16 attention" in nkt.refuse(Call("varlen_attention", cpu, torch.bfloat16, head_dim=64))
    assert "unset TRITON_INTERPRET" in nkt.refuse(Call("rope_2d", cuda, torch.float16, head_dim=64))
    assert "float64" in nkt.refuse(Call("adaln_modulate", cpu, torch.float64))
    assert nkt.refuse(Call("adaln_modulate", cpu, torch.bfloat16)) is None
    assert nkt.refuse(Call("varlen_attention", cpu, torch.float16, head_dim=72)) is None
    monkeypatch.setattr(nkt, "INTERPRETED", False)
    assert "TRITON_INTERPRET=1" in nkt.refuse(Call("adaln_modulate", cpu, torch.float32))
    assert nkt.refuse(Call("varlen_attention", cuda, torch.bfloat16, head_dim=128)) is None


def test_explicit_request_explains_the_refusal():
    q = torch.randn(4, 1, 256, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(nk.BackendUnavailable, match=r"backend 'triton'.*head_dim 256 is not supported"):
        nk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 attention (the interpreter's tl.dot is wrong on bf16), autotune, triton_op
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_compiled_gpu
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_attention_gpu(head_dim, causal):
    packed = _packed(ODD_PACKS[4] + ((13, 21),))
    check_against_reference("varlen_attention", "triton", packed, torch.bfloat16,
                            shape={"heads": 4, "kv_heads": 2, "head_dim": head_dim}, causal=causal)


@pytest.mark.gpu
@needs_compiled_gpu
def test_autotune_path_gpu():
    """On a GPU the attention kernels run through their autotuners, which pick and cache a config."""
    from nit_kernels.backends.triton import attention
    packed = _packed(((24, 24), (7, 40)))
    check_against_reference("varlen_attention", "triton", packed, torch.float16,
                            shape={"heads": 2, "head_dim": 72}, causal=True)
    for tuner in (attention._attn_fwd_tuned, attention._attn_bwd_dkdv_tuned, attention._attn_bwd_dq_tuned):
        assert tuner.cache, f"{tuner.fn.__name__} did not autotune"
        assert any(cfg in tuner.configs for cfg in tuner.cache.values())


@pytest.mark.gpu
@needs_compiled_gpu
def test_triton_op_path_gpu():
    """On a GPU each op is a triton_op, whose kernels torch.compile sees; compiled equals eager."""
    from torch._library.triton import get_triton_kernels_for_op
    assert _common.USE_TRITON_OP
    assert get_triton_kernels_for_op("nit_triton::varlen_attention_fwd")
    test_torch_compile_fullgraph_through_the_public_api()


# ---------------------------------------------------------------------------------------------
# the GPU kernels compile and fit on sm_80 and sm_90 (no GPU needed: Triton's bundled ptxas)
# ---------------------------------------------------------------------------------------------
def test_gpu_kernels_compile_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(COMPILE_CHECK), "--quick", "--arch", "80,90"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 failing or not fitting" in r.stdout


def test_gpu_launchers_trace_with_fake_tensors_and_symbolic_sizes(monkeypatch):
    """On a GPU each op is a triton_op, which torch.compile traces with fake tensors and symbolic
    sizes. The launchers' GPU branch (autotuned kernels, GPU tile sizes) is traced here the same way
    (make_fx, symbolic), with the kernel launches recorded instead of run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from nit_kernels.backends.triton import adaln, attention, rope
    compile_check = _compile_check()
    for mod in (_common, adaln, attention, rope):
        monkeypatch.setattr(mod, "INTERPRETED", False)
    p = PackedSeqs.from_sizes([(3, 5), (2, 2), (1, 1)])
    n, b, cu, sizes = p.total_tokens, p.num_seqs, p.cu_seqlens, p.sizes
    r = torch.randn
    x, rows, st = r(n, 40), r(b, 40), torch.ones(n)
    q, k, f, w, qs = r(n, 4, 16), r(n, 2, 16), nk.rope_freqs(16), r(16), torch.ones(n, 4)
    ks = torch.ones(n, 2)
    out, lse = r(n, 4, 16), torch.zeros(4, n)
    cases = [
        (adaln.adaln_modulate_fwd, (x, rows, rows, cu, 1e-6)), (adaln.adaln_modulate_bwd, (x, x, rows, st, st, cu)),
        (adaln.gated_residual_fwd, (x, x, rows, cu)), (adaln.gated_residual_bwd, (x, x, rows, cu)),
        (adaln.residual_adaln_fwd, (x, x, rows, rows, rows, cu, 1e-6)),
        (adaln.residual_adaln_bwd, (x, x, x, x, rows, rows, st, st, cu)),
        (rope.rope_2d, (q, k, cu, sizes, f, "grid", 1.0, False)),
        (rope.qk_norm_rope_fwd, (q, k, cu, sizes, f, w, w, w, w, 1e-5, "official", 1.0)),
        (rope.qk_norm_rope_bwd, (q, k, q, k, cu, sizes, f, w, w, qs, qs, ks, ks, "grid", 1.0)),
        (attention.varlen_attention_fwd, (q, k, k, cu, cu, p.max_seqlen, p.max_seqlen, 0.25, True)),
        (attention.varlen_attention_bwd, (q, q, k, k, out, lse, cu, cu, p.max_seqlen, p.max_seqlen, 0.25, False)),
    ]
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            for fn, args in cases:
                launches = []
                with compile_check.recording(launches):
                    def call(*ts, fn=fn, args=args):  # tensors traced, other arguments fixed
                        it = iter(ts)
                        return fn(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])

                    make_fx(call, tracing_mode="symbolic")(*[a for a in args if isinstance(a, torch.Tensor)])
                assert launches, f"{fn.__name__} launched nothing"
                for launch in launches:
                    grid = launch.grid({**launch.kwargs, "BLOCK_M": 64, "BLOCK_N": 64}) if callable(launch.grid) \
                        else launch.grid
                    assert len(grid) in (1, 2, 3), (fn.__name__, grid)
                    symbolic = {k: v for k, v in launch.kwargs.items() if isinstance(v, (torch.SymInt, torch.SymFloat))}
                    assert not symbolic, f"{fn.__name__}: compile-time arguments must be concrete, got {symbolic}"
                    if fn.__name__.startswith("varlen_attention"):
                        assert launch.kernel in (attention._attn_fwd_tuned, attention._attn_bwd_dkdv_tuned,
                                                 attention._attn_bwd_dq_tuned, attention._attn_delta_kernel)
        finally:
            torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------
# forged metadata: the ops check it themselves (direct op calls and torch.compile skip the
# eager checks of nit_kernels.ops), never a crash, a hang or a wrong answer
# ---------------------------------------------------------------------------------------------
_FORGED_PRELUDE = (
    "import torch, nit_kernels as nk\n"
    "import nit_kernels.backends.triton\n"
    "ops = torch.ops.nit_triton\n"
    "def expect(name, fn):\n"
    "    try:\n"
    "        fn()\n"
    "    except (ValueError, RuntimeError) as e:\n"
    "        print('RAISED', name, type(e).__name__, str(e).splitlines()[0][:160], flush=True)\n"
    "    else:\n"
    "        print('NO ERROR', name, flush=True)\n"
    "cu = torch.tensor([0, 10, 100000], dtype=torch.int32)\n"
    "good = torch.tensor([0, 10, 100], dtype=torch.int32)\n"
    "q = torch.randn(100, 2, 16)\n"
)


def _run_forged(body: str, timeout: int):
    """Runs `body` in a fresh interpreter process: a segfault or a hang fails only this test."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    try:
        r = subprocess.run([sys.executable, "-c", _FORGED_PRELUDE + body], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung: no answer within {timeout} s; output so far: {e.stdout!r}")
    assert r.returncode == 0, f"exit code {r.returncode} (negative: killed by a signal)\n{r.stdout}\n{r.stderr[-3000:]}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("RAISED", "NO ERROR"))]
    return lines, r


@pytest.mark.skipif(DEVICE != "cpu", reason="the forged packs run under the interpreter")
def test_forged_packs_raise_in_direct_op_calls():
    """cu_seqlens past the tokens, a short sizes table and a zero width: each op raises a clear error
    (before the ops checked their metadata, the attention call crashed the process with SIGSEGV)."""
    body = (
        "x = torch.randn(100, 8); rows = torch.zeros(2, 8)\n"
        "sizes = torch.tensor([[2, 5], [9, 10]], dtype=torch.int32)\n"
        "expect('attention', lambda: ops.varlen_attention_fwd(q, q, q, cu, cu, 100000, 100000, 0.25, False))\n"
        "expect('attention_bwd', lambda: ops.varlen_attention_bwd(q, q, q, q, q, torch.zeros(2, 100), cu, cu,"
        " 100000, 100000, 0.25, False))\n"
        "expect('adaln_fwd', lambda: ops.adaln_modulate_fwd(x, rows, rows, cu, 1e-6))\n"
        "expect('adaln_bwd', lambda: ops.adaln_modulate_bwd(x, x, rows, x[:, 0], x[:, 0], cu))\n"
        "expect('gated_bwd', lambda: ops.gated_residual_bwd(x, x, rows, cu))\n"
        "expect('residual_bwd', lambda: ops.residual_adaln_bwd(x, x, x, x, rows, rows, x[:, 0], x[:, 0], cu))\n"
        "expect('adaln_rows', lambda: ops.adaln_modulate_fwd(x, rows[:1], rows, good, 1e-6))\n"
        "f = nk.rope_freqs(16)\n"
        "expect('rope_cu', lambda: ops.rope_2d(q, q, cu, sizes, f, 'grid', 1.0, False))\n"
        "expect('rope_short_sizes', lambda: ops.rope_2d(q, q, good, sizes[:1], f, 'grid', 1.0, False))\n"
        "bad = torch.tensor([[10, 1], [90, 0]], dtype=torch.int32)\n"
        "expect('rope_zero_width', lambda: ops.rope_2d(q, q, good, bad, f, 'grid', 1.0, False))\n"
        "wrong = torch.tensor([[2, 5], [9, 9]], dtype=torch.int32)\n"
        "expect('rope_sizes_vs_cu', lambda: ops.rope_2d(q, q, good, wrong, f, 'grid', 1.0, False))\n"
    )
    lines, r = _run_forged(body, timeout=240)
    assert len(lines) == 11, r.stdout + r.stderr[-2000:]
    for line in lines:
        assert line.startswith("RAISED") and "ValueError" in line, line
    assert "cu_seqlens_q[-1]=100000 must equal the number of tokens 100" in lines[0], lines[0]


@pytest.mark.skipif(DEVICE != "cpu", reason="the forged packs run under the interpreter")
def test_forged_packs_raise_under_torch_compile_and_huge_max_seqlen_does_not_hang():
    """Under torch.compile the eager checks of nit_kernels.ops are skipped: the op raises itself.
    max_seqlen = 2**40 is refused at once (it used to size a grid of 2**34 programs: a hang)."""
    body = (
        "f = torch.compile(lambda q, cu: nk.varlen_attention(q, q, q, cu, cu, 100000, 100000, backend='triton'),"
        " fullgraph=True)\n"
        "expect('compiled', lambda: f(q, cu))\n"
        "expect('huge_max_seqlen', lambda: ops.varlen_attention_fwd(q, q, q, good, good, 2**40, 2**40, 0.25, False))\n"
    )
    lines, r = _run_forged(body, timeout=180)
    assert len(lines) == 2, r.stdout + r.stderr[-2000:]
    assert lines[0].startswith("RAISED compiled") and "cu_seqlens" in lines[0], lines[0]
    assert lines[1].startswith("RAISED huge_max_seqlen ValueError") and "max_seqlen_q" in lines[1], lines[1]


def test_max_seqlen_smaller_than_the_longest_sequence_raises():
    """It used to leave the rows past max_seqlen unwritten (26 of 100 wrong, no error)."""
    cu = torch.tensor([0, 10, 100], dtype=torch.int32, device=DEVICE)
    q = torch.randn(100, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"max_seqlen_q=64 is smaller than the longest sequence \(90\)"):
        torch.ops.nit_triton.varlen_attention_fwd(q, q, q, cu, cu, 64, 90, 0.25, False)
    with pytest.raises(ValueError, match=r"max_seqlen_k=-1 must be in"):
        torch.ops.nit_triton.varlen_attention_fwd(q, q, q, cu, cu, 90, -1, 0.25, False)
    out = torch.ops.nit_triton.varlen_attention_fwd(q, q, q, cu, cu, 90, 90, 0.25, False)[0]
    torch.testing.assert_close(out, nk.varlen_attention(q, q, q, cu, cu, 90, 90, softmax_scale=0.25,
                                                        backend="reference"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# launches under the inputs' device (a kernel on cuda:1 tensors while cuda:0 is current)
# ---------------------------------------------------------------------------------------------
def test_every_launch_runs_under_the_device_guard_of_its_inputs(monkeypatch):
    """Triton launches on the current device, so each launcher must enter its inputs' device first.
    The guard is replaced by a recorder; every kernel launch (forward and backward of every op) must
    happen while a guard entered with the inputs' device is open. The GPU half is
    tests/test_gpu_triton.py::test_tensors_on_a_second_device."""
    from nit_kernels.backends.triton import adaln, attention, rope
    active = []

    @contextlib.contextmanager
    def guard(t):
        active.append(t.device)
        try:
            yield
        finally:
            active.pop()

    launches = []

    def recording(real):
        def wrap(kernel):
            launcher = real(kernel)

            class _Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        launches.append((getattr(kernel, "__name__", str(kernel)), list(active)))
                        return launcher[grid](*args, **kwargs)
                    return launch
            return _Grid()
        return wrap

    monkeypatch.setattr(_common, "device_guard", guard)
    for mod in (adaln, attention, rope):
        monkeypatch.setattr(mod, "wrap_triton", recording(mod.wrap_triton))
    p = _packed(((2, 3), (1, 4)))
    for op in SHAPES:
        _grads(op, p)
    assert launches, "no kernel was launched"
    unguarded = [name for name, devices in launches if devices != [torch.device(DEVICE)]]
    assert not unguarded, f"launched outside a guard of the inputs' device: {unguarded}"


# ---------------------------------------------------------------------------------------------
# grid limits and the work-item schedule (plain Python: the launch arithmetic, no kernels)
# ---------------------------------------------------------------------------------------------
def test_grid_axes_beyond_the_device_limits_raise():
    from nit_kernels.backends.triton import _checks
    _checks.check_grid("op", (2**31 - 1, 65535, 65535))
    with pytest.raises(ValueError, match=r"grid axis 1 \(heads\) needs 65536 blocks, more than the device allows"):
        _checks.check_grid("op", (1, 65536))
    with pytest.raises(ValueError, match="grid axis 0"):
        _checks.check_grid("op", (2**31, 1))
    q = torch.zeros(1, 70_000, 16, device=DEVICE)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"grid axis 1 \(heads\) needs 70000 blocks"):
        torch.ops.nit_triton.varlen_attention_fwd(q, q, q, cu, cu, 1, 1, 0.25, False)


def test_rope_head_groups_beyond_the_grid_limit_raise(monkeypatch):
    """On a GPU RoPE puts groups of 4 heads on grid axis 1: 300,000 heads need 75,000 > 65,535."""
    from nit_kernels.backends.triton import rope
    monkeypatch.setattr(rope, "INTERPRETED", False)
    q = torch.zeros(1, 300_000, 4)
    with pytest.raises(ValueError, match=r"grid axis 1 \(head groups\) needs 75001 blocks"):
        rope._tiling(q, q[:, :1], gpu_elems=1024)


def test_work_items_cover_every_tile_once_within_the_host_bound():
    """tile_table lists each sequence's tiles of every block size; the host-side grid bound
    cdiv(N, BLOCK) + B covers them without reading cu_seqlens, and no program goes idle past a
    short sequence's end (the old grid was cdiv(max_seqlen, 64) x B programs per head)."""
    from nit_kernels.backends.triton import _common, attention
    lens = [1, 0, 64, 65, 3, 200, 0, 17] + [5] * 30
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    table = _common.tile_table(cu, attention.TILE_BLOCKS)
    assert table.dtype == torch.int32 and tuple(table.shape) == (len(attention.TILE_BLOCKS), len(lens) + 1)
    n, b = sum(lens), len(lens)
    for r, bs in enumerate(attention.TILE_BLOCKS):
        items = [(i, t) for i, ln in enumerate(lens) for t in range(-(-ln // bs))]  # the flat work list
        assert table[r].tolist() == [0] + torch.tensor([-(-ln // bs) for ln in lens]).cumsum(0).tolist()
        grid = attention._grid(n, "BLOCK_M", 3, b)({"BLOCK_M": bs})
        assert grid[0] >= len(items) and grid[1] == 3
        # program p works on the item p (segment_of_scalar's search of the table row, in Python)
        for p, (seq, tile) in enumerate(items):
            found = max(i for i in range(b) if table[r, i] <= p)
            assert (found, p - int(table[r, found])) == (seq, tile)
    old_programs = -(-max(lens) // 64) * b
    assert int(table[2, -1]) * 3 < old_programs  # 40 work items instead of 152 programs


def test_metadata_is_read_once_per_pack_and_again_after_an_in_place_change(monkeypatch):
    """The host read of cu_seqlens (a stream synchronisation on a GPU) is paid once per pack, not
    once per op: layers sharing a pack hit the cache; an in-place change is seen (tensor version)."""
    from nit_kernels.backends.triton import _checks
    reads = []
    real = _checks._facts
    monkeypatch.setattr(_checks, "_facts", lambda cu, sizes: (reads.append(sizes is not None), real(cu, sizes))[1])
    p = _packed(((2, 3), (4, 4)))
    x, rows = torch.randn(p.total_tokens, 16, device=DEVICE), torch.zeros(p.num_seqs, 16, device=DEVICE)
    for _ in range(3):
        nk.adaln_modulate(x, rows, rows, p, backend="triton")
    assert len(reads) == 1
    p.cu_seqlens[2] = 30  # a forged pack: the cached facts must not vouch for it
    with pytest.raises(ValueError, match="cu_seqlens"):
        torch.ops.nit_triton.adaln_modulate_fwd(x, rows, rows, p.cu_seqlens, 1e-6)
    assert len(reads) == 2
