"""Drop-in ``nn.Module`` layers for packed (native-resolution) transformers.

Images of different sizes are flattened to tokens and concatenated into one sequence; a
:class:`~nit_kernels.PackedSeqs` says where each image starts and its (h, w) in tokens. These
modules are thin wrappers of the functional API (``nit_kernels.ops``), so they run on whichever
backend is chosen (``backend=None``: automatic) and are differentiable and torch.compile-able.

=====================  =========================================================================
module                 forward
=====================  =========================================================================
AxialRoPE2D            (q [N, H, Dh], k [N, Hk, Dh], packed) -> rotated (q, k)
VarlenSelfAttention    (x [N, D], packed) -> [N, D]: qkv, qk-norm, 2D RoPE, per-image attention, proj
PackedAdaLN            (x [N, D], shift [B, D], scale [B, D], packed) -> LN(x)*(1+scale[seg])+shift[seg]
GatedResidual          (x [N, D], y [N, D], gate [B, D], packed) -> x + gate[seg]*y
ResidualAdaLN          (x, y, gate, shift, scale, packed) -> (x + gate[seg]*y, PackedAdaLN of that)
=====================  =========================================================================

``seg`` maps every token to its image; rows of shift/scale/gate are per image, never per token.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .freqs import rope_freqs
from .packed import POSITIONS, PackedSeqs

__all__ = ["AxialRoPE2D", "VarlenSelfAttention", "PackedAdaLN", "GatedResidual", "ResidualAdaLN",
           "rebuild_in_backward"]


class _Recipe:
    """Stands in a saved-tensor slot for target ``index``; rebuilds every target once, on first use."""

    def __init__(self, index: int, shared: dict):
        self.index, self.shared = index, shared

    def get(self) -> torch.Tensor:
        if "values" not in self.shared:
            with torch.no_grad():
                self.shared["values"] = tuple(self.shared["rebuild"]())
        return self.shared["values"][self.index]


def _key(t: torch.Tensor):
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def rebuild_in_backward(targets: Sequence[torch.Tensor], rebuild: Callable[[], Sequence[torch.Tensor]]):
    """Context manager: tensors in `targets` that autograd saves inside the block are not kept;
    ``rebuild()`` (run without grad, once) recomputes them when backward needs them.

    For activations that are cheap to recompute from tensors kept anyway (e.g. a normalised,
    rotated q from the q that qk_norm_rope saves). `rebuild` must return the targets' values in
    order and must not capture tensors that require grad (detach them). Other saved tensors are
    stored as usual. Do not use it inside torch.utils.checkpoint (which has its own hooks).
    """
    keys = {_key(t): i for i, t in enumerate(targets)}
    shared = {"rebuild": rebuild}

    def pack(t):
        i = keys.get(_key(t))
        return t if i is None else _Recipe(i, shared)

    def unpack(obj):
        return obj.get() if isinstance(obj, _Recipe) else obj

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class AxialRoPE2D(nn.Module):
    """Axial 2D rotary position embedding of packed queries and keys.

    Holds the frequency table ``freqs`` (fp32 [2, head_dim // 4], a non-persistent buffer that
    stays fp32 whatever dtype the module is cast to) from :func:`nit_kernels.rope_freqs`.
    The first half of Dh rotates with the axis-0 position and ``freqs[0]``, the second half with
    the axis-1 position and ``freqs[1]``, as interleaved pairs:
    ``(x0, x1) -> mscale * (x0 cos a - x1 sin a, x1 cos a + x0 sin a)``, ``a = p * freqs[axis][i]``.

    Args:
        head_dim: Dh, a multiple of 4.
        theta, method, scale, ori_max_pe_len: see :func:`nit_kernels.rope_freqs`.
        positions: "grid" (p0 = column, p1 = row) or "official" (the order of the released
            NiT checkpoints; equal to "grid" on square images).
        mscale: magnitude factor (see :func:`nit_kernels.rope_mscale`).
        freqs: a ready [2, head_dim // 4] table instead of building one from theta/method/scale.
    """

    def __init__(self, head_dim: int, *, theta: float = 10000.0, method: str = "normal",
                 scale: Union[float, Sequence[float]] = 1.0, ori_max_pe_len: Optional[int] = None,
                 positions: str = "grid", mscale: float = 1.0, freqs: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be 'grid' or 'official', got {positions!r}")
        if freqs is None:
            freqs = rope_freqs(head_dim, theta=theta, method=method, scale=scale, ori_max_pe_len=ori_max_pe_len)
        elif tuple(freqs.shape) != (2, head_dim // 4):
            raise ValueError(f"freqs must have shape (2, {head_dim // 4}) for head_dim {head_dim}, got {tuple(freqs.shape)}")
        self.head_dim, self.positions, self.mscale, self.backend = head_dim, positions, float(mscale), backend
        self._freqs_fp32 = freqs.detach().float().cpu()
        self.register_buffer("freqs", self._freqs_fp32.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # the table is consumed in fp32 by every kernel: follow device moves, never dtype casts
        super()._apply(fn, recurse)
        self.freqs = self._freqs_fp32.to(self.freqs.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, packed: PackedSeqs) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, H, Dh], k [N, Hk, Dh] -> rotated (q, k), same shapes and dtypes."""
        return ops.rope_2d(q, k, packed, self.freqs, positions=self.positions, mscale=self.mscale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, positions={self.positions!r}, mscale={self.mscale:g}"


class VarlenSelfAttention(nn.Module):
    """Multi-head self-attention inside each packed image, with qk-norm and axial 2D RoPE.

    ``x [N, D] -> qkv [N, 3, H, Dh] -> (LayerNorm_Dh(q), LayerNorm_Dh(k)) -> RoPE -> attention
    restricted to each image (cu_seqlens) -> proj -> [N, D]``. The submodule names (qkv, q_norm,
    k_norm, proj) are those of the timm / NiT Attention, so their checkpoints load unchanged.
    q_norm and k_norm are ``nn.LayerNorm(Dh)`` holding the affine parameters; the forward passes
    them to the fused ``qk_norm_rope`` op instead of calling them.

    Args:
        dim: D; num_heads: H (Dh = D / H, a multiple of 4 when RoPE is used).
        qkv_bias: bias in the qkv projection. qk_norm: LayerNorm of q and k over Dh (eps 1e-5).
        rope: an :class:`AxialRoPE2D` (may be shared between layers) or None for no RoPE.
        backend: passed to every nit_kernels op.
        selective_recompute: do not keep the normalised, rotated q and k for the attention
            backward; rebuild them there from the q and k that qk_norm_rope keeps (one extra
            element-wise pass; saves 2 x [N, D] activations per layer). Ignored under
            torch.compile and torch.utils.checkpoint.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = True,
                 qk_norm_eps: float = 1e-5, rope: Optional[AxialRoPE2D] = None, backend: Optional[str] = None,
                 selective_recompute: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"rope was built for head_dim {rope.head_dim}, attention has head_dim {self.head_dim}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.qk_norm = qk_norm
        self.selective_recompute = selective_recompute
        self.in_checkpoint = False  # set by a model that wraps this layer in torch.utils.checkpoint

    def _transform_qk(self, q, k, packed):
        """qk-norm and RoPE as configured, q [N, H, Dh], k [N, H, Dh]."""
        if self.qk_norm and self.rope is not None:
            r = self.rope
            return ops.qk_norm_rope(q, k, packed, r.freqs, q_weight=self.q_norm.weight, q_bias=self.q_norm.bias,
                                    k_weight=self.k_norm.weight, k_bias=self.k_norm.bias, eps=self.q_norm.eps,
                                    positions=r.positions, mscale=r.mscale, backend=self.backend)
        if self.qk_norm:
            return self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            return self.rope(q, k, packed)
        return q, k

    def forward(self, x: torch.Tensor, packed: PackedSeqs) -> torch.Tensor:
        """x [N, D] -> [N, D]; attention never crosses images."""
        n, d = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        recompute = (self.selective_recompute and (self.qk_norm or self.rope is not None) and not self.in_checkpoint
                     and torch.is_grad_enabled() and not torch.compiler.is_compiling())
        ctx = contextlib.nullcontext()
        if recompute:
            # own storages, so the [N, 3D] qkv output is not kept alive by views
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            q0, k0 = q.detach(), k.detach()
            q, k = self._transform_qk(q, k, packed)
            ctx = rebuild_in_backward((q, k), lambda: self._transform_qk(q0, k0, packed))
        else:
            q, k = self._transform_qk(q, k, packed)
        with ctx:
            o = ops.varlen_attention(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                     packed.max_seqlen, backend=self.backend)
        return self.proj(o.reshape(n, d))


class PackedAdaLN(nn.Module):
    """``LN(x) * (1 + scale[seg]) + shift[seg]``: x [N, D]; shift, scale [B, D] (per image).

    LayerNorm without affine parameters (biased variance, eps 1e-6 by default). Parameter-free.
    """

    def __init__(self, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.eps, self.backend = eps, backend

    def forward(self, x, shift, scale, packed: PackedSeqs) -> torch.Tensor:
        return ops.adaln_modulate(x, shift, scale, packed, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class GatedResidual(nn.Module):
    """``x + gate[seg] * y``: x, y [N, D]; gate [B, D] (per image). Parameter-free."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend

    def forward(self, x, y, gate, packed: PackedSeqs) -> torch.Tensor:
        return ops.gated_residual(x, y, gate, packed, backend=self.backend)


class ResidualAdaLN(nn.Module):
    """A gated residual joined to the next AdaLN in one pass (parameter-free).

    ``x_new = x + gate[seg] * y``; ``h = LN(x_new) * (1 + scale[seg]) + shift[seg]``;
    x, y [N, D]; gate, shift, scale [B, D]. Returns (x_new, h).
    """

    def __init__(self, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.eps, self.backend = eps, backend

    def forward(self, x, y, gate, shift, scale, packed: PackedSeqs) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.residual_adaln(x, y, gate, shift, scale, packed, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"
