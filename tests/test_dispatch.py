"""Backend selection: argument, then the override (NIT_KERNELS_BACKEND or set_override), then
automatic; the choice is cached per kind of call; refusals say why."""
import os

import pytest
import torch

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.dispatch import BACKENDS, OPS, Call


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
            assert dispatch.get("reference").refuse(Call(op, torch.device("cpu"), dtype)) is None


def test_auto_prefers_compiled_cpu_then_reference():
    call = Call("adaln_modulate", torch.device("cpu"), torch.float32)
    name, _ = dispatch.select(call)
    expect = "cpu" if dispatch.get("cpu").refuse(call) is None else "reference"
    assert name == expect
    # float64 is served by the reference only
    name, _ = dispatch.select(Call("adaln_modulate", torch.device("cpu"), torch.float64))
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


@pytest.fixture
def restore_override():
    yield
    dispatch.set_override(None)


def test_override_selects_and_falls_through(monkeypatch, restore_override):
    x, sh, sc, p = _adaln_args()
    calls = []
    ref = dispatch.get("reference")
    ref._load()
    orig = ref._ops["adaln_modulate"]

    def spy(*a):
        calls.append("reference")
        return orig(*a)

    monkeypatch.setitem(ref._ops, "adaln_modulate", spy)
    nk.adaln_modulate(x, sh, sc, p)  # cached choice (cpu if built) ...
    dispatch.set_override("reference")  # ... which a new override replaces
    nk.adaln_modulate(x, sh, sc, p)
    assert calls == ["reference"]
    # a backend that does not implement the op leaves that op to automatic choice
    dispatch.set_override("flash_attn")
    name, _ = dispatch.select(Call("adaln_modulate", torch.device("cpu"), torch.float32))
    assert name in ("cpu", "reference")
    # but one that implements it and cannot serve the call is an error
    dispatch.set_override("reference")
    assert dispatch.select(Call("adaln_modulate", torch.device("cpu"), torch.float16))[0] == "reference"
    dispatch.set_override("auto")
    assert dispatch.override() is None
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        dispatch.set_override("nonsense")


def test_choice_is_made_once_per_call_kind(monkeypatch, restore_override):
    """Eager calls of one kind reuse the cached choice; set_override makes them choose again."""
    x, sh, sc, p = _adaln_args()
    made = []
    choose = dispatch._choose
    monkeypatch.setattr(dispatch, "_choose", lambda *key: made.append(key) or choose(*key))
    dispatch.set_override(None)
    for _ in range(3):
        nk.adaln_modulate(x, sh, sc, p)
    nk.adaln_modulate(x.double(), sh.double(), sc.double(), p)
    assert [k[2] for k in made] == [torch.float32, torch.float64]
    dispatch.set_override("reference")
    nk.adaln_modulate(x, sh, sc, p)
    assert len(made) == 3 and made[-1][0] == "adaln_modulate"


def test_environment_variable_sets_the_override():
    """NIT_KERNELS_BACKEND is read once, at the first selection of a process (a fresh one here;
    then it is read again as if by a new process, for the other values)."""
    import subprocess
    import sys
    code = (
        "import os, torch, nit_kernels as nk\n"
        "from nit_kernels import dispatch\n"
        "p = nk.PackedSeqs.from_sizes([(2, 3)])\n"
        "for value in ('reference', 'flash_attn', 'nonsense'):\n"
        "    os.environ['NIT_KERNELS_BACKEND'] = value\n"
        "    dispatch._override = dispatch._UNREAD\n"
        "    dispatch._CHOSEN.clear()\n"
        "    try:\n"
        "        nk.adaln_modulate(torch.randn(6, 8), torch.zeros(1, 8), torch.zeros(1, 8), p)\n"
        "        print(value, dispatch._override, sorted(set(dispatch._CHOSEN.values())))\n"
        "    except ValueError as e:\n"
        "        print(value, 'ERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "NIT_KERNELS_BACKEND": "reference"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "reference reference ['reference']", r.stdout
    auto = "cpu" if dispatch.get("cpu").load_error() is None else "reference"
    assert lines[1] == f"flash_attn flash_attn ['{auto}']", r.stdout  # flash_attn has no adaln: automatic
    assert lines[2].startswith("nonsense ERROR unknown backend 'nonsense'"), r.stdout


def test_explain_lists_a_reason_for_every_refusal():
    why = dispatch.explain(Call("varlen_attention", torch.device("cpu"), torch.float16, head_dim=64))
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
