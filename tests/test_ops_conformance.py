"""Every compiled backend (cpu, cuda) against the reference: forward and all gradients, every op,
fp32/fp16/bf16, odd shapes, by the accuracy rule of nit_kernels.testing.assert_accuracy.

An op a backend does not implement, or a backend unusable here (cuda without a GPU), is skipped
with the backend's own reason. Triton has its own module (tests/test_triton_*.py) because the
interpreter needs smaller grids.
"""
import pytest
import torch

from nit_kernels import PackedSeqs, dispatch
from nit_kernels.dispatch import Call
from nit_kernels.testing import ODD_PACKS, check_against_reference, random_sizes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACKS = {
    "odd": ODD_PACKS[4],           # 1x1, 1x7, 5x1, 3x5, 4x4, 2x9
    "one-3x97": ((3, 97),),
    "many": tuple(random_sizes(60, max_side=9, seed=1)),
}
ELEMENTWISE = ("adaln_modulate", "gated_residual", "residual_adaln")
CASES = (
    [(op, {"dim": d}, {}) for op in ELEMENTWISE for d in (384, 769)]
    + [(op, {"heads": 3, "kv_heads": kvh, "head_dim": hd}, kw)
       for op in ("rope_2d", "qk_norm_rope") for hd in (64, 72) for kvh in (3, 1)
       for kw in ({"positions": "grid"}, {"positions": "official", "mscale": 1.25})]
    + [("varlen_attention", {"heads": 2, "head_dim": hd}, {"causal": c}) for hd in (64, 72, 128) for c in (False, True)]
)


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _skip_unless_served(backend, op, dtype, head_dim=None):
    call = Call(op, torch.device(_device(backend)), dtype, head_dim=head_dim)
    why = dispatch.get(backend).refuse(call)
    if why is not None:
        pytest.skip(f"{backend} cannot run {op}: {why}")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pack", PACKS, ids=str)
@pytest.mark.parametrize("op, shape, kw", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in {**c[1], **c[2]}.items())}" for c in CASES])
def test_backend_matches_reference(backend, dtype, pack, op, shape, kw):
    _skip_unless_served(backend, op, dtype, shape.get("head_dim"))
    packed = PackedSeqs.from_sizes(PACKS[pack], device=_device(backend))
    check_against_reference(op, backend, packed, dtype, shape=shape, **kw)
