"""Backend selection: argument, then NIT_KERNELS_BACKEND, then automatic; refusals say why."""
import pytest
import torch

import nit_kernels as nk
from nit_kernels import backends
from nit_kernels.backends import BACKENDS, OPS, Call


def _adaln_args():
    p = nk.PackedSeqs.from_sizes([(2, 3)])
    return torch.randn(6, 8), torch.randn(1, 8), torch.randn(1, 8), p


def test_available_backends_reports_every_backend():
    avail = nk.available_backends()
    assert set(avail) == set(BACKENDS)
    assert avail["reference"] is None
    for name, why in avail.items():
        assert why is None or isinstance(why, str) and why
    report = nk.backends_report()
    for name in BACKENDS:
        assert name in report


def test_reference_serves_every_call():
    for op in OPS:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            assert backends.get("reference").refuse(Call(op, torch.device("cpu"), dtype)) is None


def test_auto_prefers_compiled_cpu_then_reference():
    call = Call("adaln_modulate", torch.device("cpu"), torch.float32)
    name, _ = backends.select(call)
    expect = "cpu" if backends.get("cpu").refuse(call) is None else "reference"
    assert name == expect
    # float64 is served by the reference only
    name, _ = backends.select(Call("adaln_modulate", torch.device("cpu"), torch.float64))
    assert name == "reference"


def test_explicit_backend_that_cannot_serve_raises_with_reasons():
    x, sh, sc, p = _adaln_args()
    with pytest.raises(nk.BackendUnavailable) as e:
        nk.adaln_modulate(x, sh, sc, p, backend="flash_attn")
    msg = str(e.value)
    assert "flash_attn" in msg and "Usable for this call" in msg and "reference" in msg
    if not torch.cuda.is_available():
        with pytest.raises(nk.BackendUnavailable, match="cuda"):
            nk.adaln_modulate(x, sh, sc, p, backend="cuda")


def test_unknown_backend_name():
    x, sh, sc, p = _adaln_args()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        nk.adaln_modulate(x, sh, sc, p, backend="fast")


def test_environment_variable_selects_and_falls_through(monkeypatch):
    x, sh, sc, p = _adaln_args()
    calls = []
    ref = backends.get("reference")
    ref._load()
    orig = ref._ops["adaln_modulate"]

    def spy(*a):
        calls.append("reference")
        return orig(*a)

    monkeypatch.setitem(ref._ops, "adaln_modulate", spy)
    monkeypatch.setenv("NIT_KERNELS_BACKEND", "reference")
    nk.adaln_modulate(x, sh, sc, p)
    assert calls == ["reference"]
    # a backend that does not implement the op leaves that op to automatic choice
    monkeypatch.setenv("NIT_KERNELS_BACKEND", "flash_attn")
    name, _ = backends.select(Call("adaln_modulate", torch.device("cpu"), torch.float32))
    assert name in ("cpu", "reference")
    # but one that implements it and cannot serve the call is an error
    monkeypatch.setenv("NIT_KERNELS_BACKEND", "reference")
    assert backends.select(Call("adaln_modulate", torch.device("cpu"), torch.float16))[0] == "reference"
    monkeypatch.setenv("NIT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        nk.adaln_modulate(x, sh, sc, p)


def test_explain_lists_a_reason_for_every_refusal():
    why = backends.explain(Call("varlen_attention", torch.device("cpu"), torch.float16, head_dim=64))
    assert why["reference"] is None
    assert why["flash_attn"]  # never serves CPU tensors


def test_import_without_extension_and_triton(tmp_path):
    """`import nit_kernels` works when _C and triton cannot be imported; those backends say why."""
    import subprocess
    import sys
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in ('nit_kernels._C', 'triton') or name.startswith('triton.'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, nit_kernels as nk\n"
        "a = nk.available_backends()\n"
        "assert 'not built' in a['cpu'], a['cpu']\n"
        "assert 'triton' in a['triton'], a['triton']\n"
        "p = nk.PackedSeqs.from_sizes([(2, 2)])\n"
        "y = nk.adaln_modulate(torch.randn(4, 8), torch.zeros(1, 8), torch.zeros(1, 8), p)\n"
        "print('ok', y.shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
