"""NiT: the Native-resolution diffusion Transformer (Wang et al., NeurIPS 2025, arXiv 2506.03131).

A DiT (Peebles & Xie, 2023) with adaLN-Zero conditioning, qk-norm, axial 2D RoPE and attention
restricted to each image of a packed sequence of tokens. Module and parameter names equal those
of the official implementation (github WZDTHU/NiT), so its checkpoints load with ``strict=True``.

What differs from the official formulation is where the work happens, not the math:

* the conditioning ``c = t_emb + y_emb`` and every adaLN Linear run once per image ([B, 6D]),
  and the per-image rows are gathered inside the fused kernels, never repeated per token;
* each block's residual is joined to the next LayerNorm (``residual_adaln``), across block
  boundaries too: ``adaln_modulate`` opens the first block, ``residual_adaln`` joins the attention
  and MLP residuals to the following norms, ``gated_residual`` closes the last block, and
  ``adaln_modulate`` opens the final layer;
* qk-norm and RoPE are one op (``qk_norm_rope``) whose angles come from the pack's sizes (no
  per-token cos/sin tables), feeding ``varlen_attention``; ``max_seqlen`` is computed once per pack;
* with ``selective_recompute`` (default) backward rebuilds, instead of storing, the activations
  that one element-wise pass recomputes from tensors kept anyway: the modulated LayerNorm outputs
  feeding the qkv, fc1 and final Linears, the normalised rotated q and k, and the GELU output.
  Per block that keeps about 12 [N, D] activations where the official formulation keeps ~35.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import nit_kernels as nk
from nit_kernels.nn import GatedResidual, PackedAdaLN, ResidualAdaLN, rebuild_in_backward

from .model_config import NiTConfig
from .official import repa_projector
from .rope_scaling import ScaledAxialRoPE2D, ScaledVarlenSelfAttention

__all__ = ["NiT", "NiTBlock", "FinalLayer", "PatchEmbed", "TimestepEmbedder", "LabelEmbedder", "Mlp",
           "as_packed", "timestep_embedding"]

PackedLike = Union[nk.PackedSeqs, torch.Tensor]


def as_packed(packed: PackedLike, device: torch.device) -> nk.PackedSeqs:
    """A PackedSeqs on `device` from a PackedSeqs or the official int ``hw_list`` [B, 2]."""
    if isinstance(packed, nk.PackedSeqs):
        return packed.to(device)
    if isinstance(packed, torch.Tensor) or isinstance(packed, (list, tuple)):
        return nk.PackedSeqs.from_sizes(packed, device=device)
    raise TypeError(f"packed must be a PackedSeqs or an int hw_list [B, 2] of (h, w) in tokens, "
                    f"got {type(packed).__name__}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of t [B]: ``[cos(t f_j), sin(t f_j)]``, f_j = max_period^(-j/half).

    Computed in fp32 (GLIDE / DiT convention), zero-padded when dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class PatchEmbed(nn.Module):
    """Token values [N, C*p*p] (c, p1, p2 order) -> [N, D].

    ``proj`` is the official ``Conv2d(C, D, p, stride p)``; on one p x p patch it is a Linear with
    the flattened kernel, which is what runs here.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] -> [B, D]: sinusoidal features (256) then Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(w.dtype))


class LabelEmbedder(nn.Module):
    """Class ids y [B] -> [B, D]; row ``num_classes`` (when present) is the null class."""

    def __init__(self, num_rows: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_rows, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class _GeluFc2(torch.autograd.Function):
    """``fc2(gelu_tanh(a))`` that keeps only ``a`` for backward and recomputes the GELU there.

    The GELU output is the largest activation of a block ([N, 4D]); recomputing it costs one
    element-wise pass and saves 4D floats per token per block (selective recomputation,
    Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022).
    Under autocast the weight is cast to a's dtype once, in forward, and that copy serves the
    backward too (one cast per step, not one per use).
    """

    @staticmethod
    def forward(ctx, a, weight, bias):
        w = weight.to(a.dtype)  # a no-op in fp32; under autocast the same cast F.linear would make
        b = None if bias is None else bias.to(a.dtype)
        ctx.save_for_backward(a, w)
        ctx.has_bias, ctx.w_dtype = bias is not None, weight.dtype
        return F.linear(F.gelu(a, approximate="tanh"), w, b)

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        g = g.to(a.dtype)
        act = F.gelu(a, approximate="tanh")
        da = None
        if ctx.needs_input_grad[0]:
            da = torch.ops.aten.gelu_backward(g @ w, a, approximate="tanh")
        g2, act2 = g.reshape(-1, g.shape[-1]), act.reshape(-1, act.shape[-1])
        dw = (g2.t() @ act2).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        db = g2.sum(0).to(ctx.w_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return da, dw, db


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply in: autocast's for this device type when enabled, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _mlp_forward(x2, w1, b1, w2, b2, backend):
    """(a, y): a = x2 @ w1^T without bias, y = gelu_tanh(a + b1) @ w2^T + b2; all in x2's dtype.

    The biases are applied outside the matmuls: on CPU a bf16 ``addmm`` runs at a third of the
    speed of ``mm`` (torch 2.13), and b1 joins the GELU's own pass (fp32, not rounded to bf16)."""
    a = torch.mm(x2, w1.t())
    y = torch.mm(nk.bias_gelu(a, b1, backend=backend), w2.t())
    return a, y.add_(b2.to(y.dtype))


class _FusedMlp(torch.autograd.Function):
    """``fc2(gelu_tanh(fc1(x)))`` that keeps fc1's output before its bias (``a``) for backward
    and recomputes the GELU there, in the same pass as its gradient (``nk.bias_gelu_backward``).

    The GELU output is the largest activation of a block ([N, 4D]); recomputing it costs no
    extra pass and saves 4D values per token per block (selective recomputation, Korthikanti et
    al., "Reducing Activation Recomputation in Large Transformer Models", 2022). Under autocast
    the weights are cast to the compute dtype once, in forward, and those copies serve the
    backward too (one cast per step, not one per use). ``x`` is saved as it came (not its cast),
    so that a ``rebuild_in_backward`` around the Mlp can drop it.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dt, backend):
        x2 = x.reshape(-1, x.shape[-1])
        w1c, w2c = w1.to(dt), w2.to(dt)  # no-ops in fp32
        with torch.autocast(x.device.type, enabled=False):
            a, y = _mlp_forward(x2.to(dt), w1c, b1, w2c, b2, backend)
        ctx.save_for_backward(x, a, w1c, b1, w2c)
        ctx.dt, ctx.backend, ctx.w_dtypes = dt, backend, (w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, a, w1c, b1, w2c = ctx.saved_tensors
        dt, (w1_dt, b1_dt, w2_dt, b2_dt) = ctx.dt, ctx.w_dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(dt)
        with torch.autocast(x.device.type, enabled=False):
            dz, db1, act = nk.bias_gelu_backward(torch.mm(g2, w2c), a, b1, backend=ctx.backend)
            dw2 = torch.mm(g2.t(), act).to(w2_dt)
            db2 = g2.sum(0, dtype=torch.float32).to(b2_dt)
            dw1 = torch.mm(dz.t(), x.reshape(-1, x.shape[-1]).to(dt)).to(w1_dt)
            dx = torch.mm(dz, w1c).to(x.dtype).reshape(x.shape)
        return dx, dw1, db1.to(b1_dt), dw2, db2, None, None


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm's Mlp names). With ``recompute_gelu`` the GELU output is not
    stored for backward but recomputed (same values and gradients, less memory). Where
    ``nk.bias_gelu`` has a kernel (CPU), outside torch.compile, the biases go through it (fc1's)
    and an in-place add (fc2's) rather than the matmuls (``_FusedMlp``); elsewhere the GELU is
    PyTorch's (``_GeluFc2``); under torch.compile the plain Linear formulation is traced."""

    def __init__(self, dim: int, hidden: int, recompute_gelu: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.recompute_gelu = recompute_gelu
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile the partitioner already recomputes cheap element-wise ops
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and not self.recompute_gelu):
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        dt = _compute_dtype(x)
        if not _has_bias_gelu_kernel(x.device, dt, self.backend):
            # no bias_gelu kernel here (CUDA, float64, backend="reference"): its reference would
            # only add passes over [N, 4D] to what PyTorch's Linear and GELU do
            if torch.is_grad_enabled():
                return _GeluFc2.apply(self.fc1(x), self.fc2.weight, self.fc2.bias)
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        if torch.is_grad_enabled():
            return _FusedMlp.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, dt,
                                   self.backend)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        _, y = _mlp_forward(x2, self.fc1.weight.to(dt), self.fc1.bias, self.fc2.weight.to(dt), self.fc2.bias,
                            self.backend)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _has_bias_gelu_kernel(device: torch.device, dtype: torch.dtype, backend: Optional[str]) -> bool:
    """Whether nk.bias_gelu runs a kernel (not its reference) for these tensors."""
    try:
        return nk.dispatch.select(nk.dispatch.Call("bias_gelu", device, dtype), backend)[0] != "reference"
    except nk.BackendUnavailable:
        return False


def _fp32_conditioning(device: torch.device, backend: Optional[str]) -> bool:
    """Whether the per-image conditioning ([B, D] rows: timestep MLP, adaLN Linears) runs in fp32
    under CPU autocast instead of in the autocast dtype.

    Those Linears hold a third of NiT's weights but multiply B rows (one per image): their cost is
    reading the weights, so casting every weight to bf16 in forward and every weight gradient back
    to fp32 in backward costs more than the fp32 products themselves (NiT-S, 1 thread: 1.0 vs
    2.4 ms per block). The outputs are cast to the autocast dtype once, on [B, 6D]. Not on CUDA,
    under torch.compile, or with backend="reference" (the reference formulation stays autocast's).
    """
    return (device.type == "cpu" and torch.is_autocast_enabled("cpu") and backend != "reference"
            and not torch.compiler.is_compiling())


def _adaln_linear(dim: int, out: int, lora_dim: Optional[int]) -> nn.Sequential:
    """SiLU then Linear(dim, out), or the adaLN-LoRA factorisation Linear(dim, r), Linear(r, out)."""
    if lora_dim is None:
        return nn.Sequential(nn.SiLU(), nn.Linear(dim, out))
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim), nn.Linear(lora_dim, out))


def _recompute_modulated(enabled: bool, h, x, shift, scale, norm: PackedAdaLN, packed):
    """While active, a tensor saved for backward that is ``h = norm(x, shift, scale, packed)`` (the
    input of the Linear that follows a packed AdaLN) is not kept but rebuilt in backward from x,
    which the fused kernels keep for their own backward (one element-wise pass)."""
    if not enabled:
        return contextlib.nullcontext()
    x, shift, scale = x.detach(), shift.detach(), scale.detach()
    return rebuild_in_backward((h,), lambda: (norm(x, shift, scale, packed),))


def _selective_recompute(module: nn.Module) -> bool:
    # not under torch.utils.checkpoint (it installs its own saved-tensor hooks) nor torch.compile
    return (module.selective_recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not module.in_checkpoint)


class NiTBlock(nn.Module):
    """One transformer block with adaLN-Zero conditioning, on packed tokens.

    Math (seg = image of each token; rows of the six [B, D] modulations are per image):
    ``x += gate_msa[seg] * attn(LN(x)*(1+scale_msa[seg])+shift_msa[seg])``;
    ``x += gate_mlp[seg] * mlp(LN(x)*(1+scale_mlp[seg])+shift_mlp[seg])``.

    In the fused chain the block receives ``h``, its already-modulated input, and hands the next
    block its modulated input (or None when ``next_mod`` is None, i.e. for the last block).
    """

    def __init__(self, cfg: NiTConfig, rope: Optional[ScaledAxialRoPE2D]):
        super().__init__()
        d, b = cfg.hidden_size, cfg.backend
        self.attn = ScaledVarlenSelfAttention(d, cfg.num_heads, qkv_bias=True, qk_norm=cfg.qk_norm, rope=rope,
                                              backend=b, selective_recompute=cfg.selective_recompute)
        self.mlp = Mlp(d, cfg.mlp_hidden, recompute_gelu=cfg.selective_recompute, backend=b)
        self.adaLN_modulation = _adaln_linear(d, 6 * d, cfg.adaln_lora_dim)
        self.norm = PackedAdaLN(eps=1e-6, backend=b)
        self.residual_adaln = ResidualAdaLN(eps=1e-6, backend=b)
        self.gated_residual = GatedResidual(backend=b)
        self.selective_recompute, self.in_checkpoint = cfg.selective_recompute, False

    def modulation(self, c: torch.Tensor, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
        """c [B, D] -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, D]
        (cast to dtype when given)."""
        m = self.adaLN_modulation(c)
        return (m if dtype is None else m.to(dtype)).chunk(6, dim=-1)

    def forward(self, x, h, mod, next_mod, packed):
        """x [N, D] residual stream, h [N, D] = its modulated LayerNorm; mod: this block's six rows;
        next_mod: (shift, scale) opening the next block, or None. Returns (x_out, h_next or None)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        recompute = _selective_recompute(self)
        with _recompute_modulated(recompute, h, x, shift_msa, scale_msa, self.norm, packed):
            a = self.attn(h, packed)
        x, h = self.residual_adaln(x, a, gate_msa, shift_mlp, scale_mlp, packed)
        with _recompute_modulated(recompute, h, x, shift_mlp, scale_mlp, self.norm, packed):
            y = self.mlp(h)
        if next_mod is None:
            return self.gated_residual(x, y, gate_mlp, packed), None
        return self.residual_adaln(x, y, gate_mlp, next_mod[0], next_mod[1], packed)


class FinalLayer(nn.Module):
    """``linear(LN(x) * (1 + scale[seg]) + shift[seg])`` -> [N, C*p*p]; (shift, scale) from c per image."""

    def __init__(self, hidden_size: int, out_dim: int, backend: Optional[str] = None,
                 selective_recompute: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.norm = PackedAdaLN(eps=1e-6, backend=backend)
        self.selective_recompute, self.in_checkpoint = selective_recompute, False

    def forward(self, x, c, packed):
        if _fp32_conditioning(x.device, self.norm.backend):
            with torch.autocast("cpu", enabled=False):
                m = self.adaLN_modulation(c.float())
            shift, scale = m.to(x.dtype).chunk(2, dim=-1)
        else:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = self.norm(x, shift, scale, packed)
        with _recompute_modulated(_selective_recompute(self), h, x, shift, scale, self.norm, packed):
            return self.linear(h)


class NiT(nn.Module):
    """Class-conditional NiT on packed native-resolution tokens.

    ``forward(x, t, y, packed, return_zs=False)``:
        x: [N, C, p, p] (the official layout) or [N, C*p*p] in (c, p1, p2) order: the noisy tokens
           of B images packed in order, each image's tokens row-major.
        t: [B] floats in [0, 1] (1 = pure noise), or a 0-d tensor shared by all images.
        y: [B] integer class ids; ``config.num_classes`` is the null class (when it has a row).
        packed: a :class:`nit_kernels.PackedSeqs`, or the official int ``hw_list`` [B, 2].
    Returns the predicted velocity in x's layout (and, with return_zs, the list [zs] of REPA
    projector outputs [N, z_dim] after block ``encoder_depth``).
    """

    def __init__(self, config: NiTConfig):
        super().__init__()
        cfg = self.config = config
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(cfg.num_label_rows, d)
        freqs, mscale = cfg.rope_table()
        # one table for every image, unless a per-image scaling rule is set (nit_model.rope_scaling)
        self.rope = ScaledAxialRoPE2D(cfg.head_dim, theta=cfg.rope_theta, freqs=freqs, positions=cfg.rope_positions,
                                      mscale=mscale, backend=cfg.backend)
        self.projector = repa_projector(cfg)  # the official REPA head, as written in official.py
        self.blocks = nn.ModuleList(NiTBlock(cfg, self.rope) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_dim, cfg.backend, cfg.selective_recompute)
        self.first_norm = PackedAdaLN(eps=1e-6, backend=cfg.backend)
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.initialize_weights()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block in backward (torch.utils.checkpoint, use_reentrant=False)."""
        self.gradient_checkpointing = bool(enabled)
        for blk in self.blocks:
            blk.in_checkpoint = blk.attn.in_checkpoint = bool(enabled)

    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform Linears with zero bias, the patch embedding
        like a Linear, N(0, 0.02) label table and timestep MLP weights, zeroed adaLN outputs
        (blocks and final layer) and zeroed output Linear (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, x, t, y, packed: nk.PackedSeqs):
        cfg, b = self.config, packed.num_seqs
        c, p = cfg.in_channels, cfg.patch_size
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"NiT: x must be a float tensor [N, {c}, {p}, {p}] or [N, {cfg.patch_dim}], "
                             f"got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if tuple(x.shape[1:]) not in ((c, p, p), (cfg.patch_dim,)):
            raise ValueError(f"NiT: x must have shape [N, {c}, {p}, {p}] or [N, {cfg.patch_dim}] "
                             f"(in_channels={c}, patch_size={p}), got {tuple(x.shape)}")
        if x.shape[0] != packed.total_tokens:
            raise ValueError(f"NiT: x has {x.shape[0]} tokens but the pack holds {packed.total_tokens} "
                             f"(sum of h*w over {b} images)")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or (t.dim() != 0 and tuple(t.shape) != (b,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"NiT: t must be a float tensor [B={b}] (one time per image), got {got}")
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or tuple(y.shape) != (b,):
            got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"NiT: y must be an integer tensor [B={b}] of class ids, got {got}")
        if not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi >= cfg.num_label_rows:
                bad = lo if lo < 0 else hi
                null = f" ({cfg.null_class} is the null class)" if cfg.num_label_rows > cfg.num_classes else ""
                raise ValueError(f"NiT: class id {bad} is out of range [0, {cfg.num_label_rows - 1}]{null}")

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(t) + y_embedder(y): [B, D], one row per image."""
        return self.t_embedder(t) + self.y_embedder(y)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, packed: Optional[PackedLike] = None,
                return_zs: bool = False, *, hw_list: Optional[torch.Tensor] = None):
        if packed is None:
            if hw_list is None:
                raise ValueError("NiT: pass packed (a PackedSeqs) or hw_list (int [B, 2])")
            packed = hw_list
        packed = as_packed(packed, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
        self._check_inputs(x, t, y, packed)
        if t.dim() == 0:
            t = t.expand(packed.num_seqs)
        shape = x.shape
        h0 = self.x_embedder(x.reshape(shape[0], -1))
        if _fp32_conditioning(h0.device, self.config.backend):
            with torch.autocast("cpu", enabled=False):
                c = self.conditioning(t, y)
                mods = [blk.modulation(c, h0.dtype) for blk in self.blocks]
        else:
            c = self.conditioning(t, y)
            mods = [blk.modulation(c) for blk in self.blocks]
        h = self.first_norm(h0, mods[0][0], mods[0][1], packed)
        x_res, zs = h0, []
        for i, blk in enumerate(self.blocks):
            nxt = mods[i + 1][:2] if i + 1 < len(self.blocks) else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x_res, h = checkpoint(blk, x_res, h, mods[i], nxt, packed, use_reentrant=False)
            else:
                x_res, h = blk(x_res, h, mods[i], nxt, packed)
            if return_zs and i + 1 == self.config.encoder_depth:
                zs = [self.projector(x_res)]
        out = self.final_layer(x_res, c, packed).reshape(shape)
        return (out, zs) if return_zs else out

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
