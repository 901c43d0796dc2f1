"""A new op through the path docs/ARCHITECTURE.md documents ("Adding an op", an op in its own
package): a toy scaled packed add, ``out = x + scale[seg] * y``, with a reference and a raw cpu
implementation in PyTorch. The test writes exactly the files the document lists into a temporary
package and, in a fresh process (the registrations are process-wide), checks forward, backward,
gradcheck, opcheck, the checking fake, the refused second derivative and the dispatch."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- the list below is checked by tests/test_add_op.py -->"

FILES = {
    "reference.py": '''
        """Reference of toy_scaled_add: out = x + scale[seg] * y (plain PyTorch, fp32 math)."""
        import torch
        from nit_kernels.packed import segment_ids


        def toy_scaled_add(x, y, scale, cu_seqlens):
            seg = segment_ids(cu_seqlens, x.shape[0])
            ct = torch.promote_types(x.dtype, torch.float32)
            return (x.to(ct) + scale.to(ct)[seg] * y.to(ct)).to(x.dtype)
    ''',
    "contract.py": '''
        """The contract of toy_scaled_add: schemas, checking fakes, setup_context and backward."""
        import torch
        from nit_kernels import _autograd
        from nit_kernels._autograd import Contract, check_tensor


        def fake_fwd(x, y, scale, cu_seqlens):
            op = "toy_scaled_add_fwd"
            check_tensor(op, x, "x", (None, None))
            check_tensor(op, y, "y", tuple(x.shape), x.dtype, x.device)
            check_tensor(op, cu_seqlens, "cu_seqlens", (None,), torch.int32, x.device)
            check_tensor(op, scale, "scale", (cu_seqlens.shape[0] - 1, x.shape[1]), x.dtype, x.device)
            return torch.empty_like(x)


        def fake_bwd(dout, y, scale, cu_seqlens):
            return torch.empty_like(y), torch.empty_like(y), torch.empty_like(scale)


        def setup(ctx, inputs, output):
            x, y, scale, cu = inputs
            ctx.save_for_backward(y, scale, cu)


        def backward(bwd, ctx, dout):
            y, scale, cu = ctx.saved_tensors
            dx, dy, dscale = bwd(dout.contiguous(), y, scale, cu)
            return dx, dy, dscale, None


        CONTRACT = _autograd.add_contract(Contract(
            "toy_scaled_add", "toy_scaled_add_fwd", "toy_scaled_add_bwd",
            "(Tensor x, Tensor y, Tensor scale, Tensor cu_seqlens) -> Tensor",
            "(Tensor dout, Tensor y, Tensor scale, Tensor cu_seqlens) -> (Tensor dx, Tensor dy, Tensor dscale)",
            1, fake_fwd, fake_bwd, setup, backward))
    ''',
    "cpu.py": '''
        """Raw functions of toy_scaled_add for the cpu backend, written with torch ops."""
        import torch
        from nit_kernels import _autograd
        from nit_kernels.packed import segment_ids

        NAMESPACE = "nit_toy"


        def toy_scaled_add_fwd(x, y, scale, cu_seqlens):
            seg, ct = segment_ids(cu_seqlens, x.shape[0]), torch.promote_types(x.dtype, torch.float32)
            return (x.to(ct) + scale.to(ct)[seg] * y.to(ct)).to(x.dtype)


        def toy_scaled_add_bwd(dout, y, scale, cu_seqlens):
            seg, ct = segment_ids(cu_seqlens, y.shape[0]), torch.promote_types(y.dtype, torch.float32)
            g = dout.to(ct)
            dscale = torch.zeros(scale.shape, dtype=ct).index_add_(0, seg, g * y.to(ct))
            return dout.clone(), (g * scale.to(ct)[seg]).to(y.dtype), dscale.to(scale.dtype)


        _autograd.define(NAMESPACE, "toy_scaled_add_fwd", toy_scaled_add_fwd)
        _autograd.define(NAMESPACE, "toy_scaled_add_bwd", toy_scaled_add_bwd)
        _autograd.register_fake_and_autograd(NAMESPACE, "toy_scaled_add", "cpu")
        OPS = _autograd.kernel_interface(NAMESPACE, ["toy_scaled_add"])
    ''',
    "__init__.py": '''
        """toy_scaled_add(x, y, scale, packed): x + scale[seg] * y, dispatched like every op."""
        from nit_kernels import dispatch

        from . import contract, cpu, reference  # noqa: F401  (contract first: cpu registers against it)

        dispatch.add_op("toy_scaled_add", {"reference": reference.toy_scaled_add,
                                           "cpu": cpu.OPS["toy_scaled_add"]})


        def scaled_add(x, y, scale, packed, *, backend=None):
            fn = dispatch.kernel("toy_scaled_add", x.device, x.dtype, backend)
            return fn(x, y, scale, packed.cu_seqlens)
    ''',
}

CHECKS = '''
import torch, nit_kernels as nk
from torch._subclasses.fake_tensor import FakeTensorMode
from nit_kernels import dispatch
from nit_kernels.dispatch import Call
import toy

p = nk.PackedSeqs.from_sizes([(2, 3), (1, 1), (4, 2)])
n, b = p.total_tokens, p.num_seqs
g = torch.Generator().manual_seed(0)
leaves = lambda dt: [torch.randn(*s, generator=g, dtype=dt).requires_grad_() for s in ((n, 5), (n, 5), (b, 5))]
x, y, scale = leaves(torch.float32)
want = toy.reference.toy_scaled_add(x, y, scale, p.cu_seqlens)
assert torch.allclose(want, x + scale[p.seg_ids] * y)
want_grads = torch.autograd.grad(want.square().sum(), (x, y, scale))
cpu_ok = dispatch.get("cpu").load_error() is None
backends = ["reference"] + (["cpu"] if cpu_ok else [])
for backend in backends:
    got = toy.scaled_add(x, y, scale, p, backend=backend)
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got.square().sum(), (x, y, scale)), want_grads):
        torch.testing.assert_close(a, e)
print("auto:", dispatch.select(Call("toy_scaled_add", torch.device("cpu"), torch.float32))[0],
      dispatch.select(Call("toy_scaled_add", torch.device("cpu"), torch.float64))[0])

# the raw op: gradcheck in float64, opcheck, the checking fake, no second derivative
raw = toy.cpu.OPS["toy_scaled_add"]
x64, y64, s64 = leaves(torch.float64)
assert torch.autograd.gradcheck(lambda a, b_, c: raw(a, b_, c, p.cu_seqlens), (x64, y64, s64))
torch.library.opcheck(torch.ops.nit_toy.toy_scaled_add_fwd.default, (x, y, scale, p.cu_seqlens))
with FakeTensorMode(allow_non_fake_inputs=True):
    try:
        torch.ops.nit_toy.toy_scaled_add_fwd(torch.empty(n, 5), torch.empty(n, 5), torch.empty(b + 1, 5),
                                             p.cu_seqlens)
    except RuntimeError as e:
        print("fake refused:", str(e).splitlines()[0])
first = torch.autograd.grad(raw(x, y, scale, p.cu_seqlens).square().sum(), (x, y), create_graph=True)
try:
    torch.autograd.grad(first[1].sum(), scale)
except RuntimeError as e:
    print("second derivative refused:", str(e).splitlines()[0])
print("backends", backends)
'''


def _documented_files() -> list[str]:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert MARKER in doc, "docs/ARCHITECTURE.md lost the list of files of a new op"
    lines = doc.split(MARKER, 1)[1].strip().splitlines()
    items = []
    for line in lines:
        if not line.startswith("- "):
            break
        items.append(re.match(r"- `<pkg>/([\w.]+)`", line).group(1))
    return items


def test_toy_op_through_the_documented_path(tmp_path):
    documented = _documented_files()
    assert sorted(documented) == sorted(FILES), f"the document lists {documented}, the toy op needs {sorted(FILES)}"
    pkg = tmp_path / "toy"
    pkg.mkdir()
    for name in documented:
        (pkg / name).write_text(textwrap.dedent(FILES[name]).lstrip())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("NIT_KERNELS_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "fake refused: toy_scaled_add_fwd: scale must have shape" in out, out
    assert "second derivative refused: toy_scaled_add: the cpu backend computes first derivatives only" in out, out
    if "'cpu'" in out.split("backends", 1)[1]:
        assert "auto: cpu reference" in out, out  # cpu serves fp32; float64 falls back to the reference
    else:
        assert "auto: reference reference" in out, out


def test_every_backend_registers_the_contract_schemas():
    """One argument list per op: the schemas of csrc/registration.cpp (library nit), the
    reference's attention and the Triton ops are the contract's, to the letter."""
    import pytest
    import torch

    from nit_kernels import _autograd, dispatch

    namespaces = [("nit_ref", ["varlen_attention"])]
    if dispatch.get("cpu").load_error() is None:
        namespaces.append(("nit", list(_autograd.CORE_OPS)))
    if dispatch.get("triton").load_error() is None:
        namespaces.append(("nit_triton", list(_autograd.CORE_OPS)))
    if len(namespaces) == 1:
        pytest.skip("neither the extension nor triton is available: only the reference registers ops")
    checked = 0
    for ns, ops in namespaces:
        for op in ops:
            c = _autograd.contract(op)
            for name, schema in ((c.fwd, c.fwd_schema), (c.bwd, c.bwd_schema)):
                if schema is None:
                    continue
                want = torch._C.parse_schema(f"{ns}::{name}{schema}")
                got = getattr(torch.ops, ns).__getattr__(name).default._schema
                assert got == want, f"{ns}::{name}: registered {got}, the contract says {want}"
                checked += 1
    assert checked >= 3
