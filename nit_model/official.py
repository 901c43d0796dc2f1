"""The official NiT forward, restated: the formulation of github WZDTHU/NiT's ``nit_model.py``.

``NiTOfficialFormulation`` computes what the official model computes, the way it computes it,
with the same module and parameter names (state dicts load both ways with strict=True):

* conditioning ``c = t_emb + y_emb`` is repeated per token with a Python loop over images;
* every block's adaLN ``Sequential(SiLU, Linear(D, 6D))`` runs on all N tokens ([N, 6D] output);
* LayerNorm (no affine, eps 1e-6) then ``x * (1 + scale) + shift`` as separate tensor ops;
* RoPE multiplies by fp32 cos/sin tables [N, 1, Dh] gathered per token from a 1024-position
  cache, with positions from ``meshgrid(arange(h), arange(w), indexing="xy")`` (so axis 0 runs
  over ``t % h`` and axis 1 over ``t // h``), and ``rotate_half`` on interleaved pairs;
* ``max_seqlen`` is read with ``.item()`` in every attention layer, and attention runs per image
  with ``torch.nn.functional.scaled_dot_product_attention`` where the official code calls
  flash-attn's ``flash_attn_varlen_func`` (same math; flash-attn has no CPU path).

It is the oracle for ``NiT(rope_positions="official")`` and the "official" provider of the
benchmarks. It uses no nit_kernels op.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .model_config import NiTConfig

__all__ = ["NiTOfficialFormulation", "rotate_half", "official_grid", "sdpa_varlen", "repa_projector"]

MAX_CACHED_LEN = 1024  # positions held in the official RoPE cache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x1, x2) -> (-x2, x1) over the last dim."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def official_grid(hw_list) -> torch.Tensor:
    """int64 [2, N]: per token the two axial positions the official model uses (meshgrid 'xy')."""
    grids = []
    for h, w in hw_list:
        g = torch.meshgrid(torch.arange(int(h)), torch.arange(int(w)), indexing="xy")
        grids.append(torch.stack(g, dim=0).reshape(2, -1))
    return torch.cat(grids, dim=-1)


def sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """flash_attn_varlen_func's signature and math on CPU: SDPA image by image.

    q, k, v [N, H, Dh]; returns [N, H, Dh]. The max_seqlen arguments are unused (flash-attn sizes
    its grid with them).
    """
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        qi = q[qs:qe].transpose(0, 1)  # [H, L, Dh]
        ki, vi = k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs, dim=0)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift



def repa_projector(cfg: NiTConfig) -> nn.Sequential:
    """The REPA projector: hidden states [N, D] -> [N, z_dim] (Linear, SiLU, Linear, SiLU, Linear)."""
    return nn.Sequential(nn.Linear(cfg.hidden_size, cfg.projector_dim), nn.SiLU(),
                         nn.Linear(cfg.projector_dim, cfg.projector_dim), nn.SiLU(),
                         nn.Linear(cfg.projector_dim, cfg.z_dim))

class _PatchEmbed(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, stride=p, bias=True)

    def forward(self, x):  # [N, C, p, p] -> [N, D]
        return self.proj(x).flatten(1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, d, freq_size=256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return self.mlp(emb.to(t.dtype))


class _LabelEmbedder(nn.Module):
    def __init__(self, rows, d):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, d)

    def forward(self, y):
        return self.embedding_table(y)


class _Attention(nn.Module):
    def __init__(self, d, heads, qk_norm):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(d, d)

    def forward(self, x, cu_seqlens, freqs_cos, freqs_sin):
        n, d = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).permute(1, 0, 2, 3)
        ori_dtype = qkv.dtype
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * freqs_cos + rotate_half(q) * freqs_sin
        k = k * freqs_cos + rotate_half(k) * freqs_sin
        q, k = q.to(ori_dtype), k.to(ori_dtype)
        max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max().item()
        x = sdpa_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen).reshape(n, d)
        return self.proj(x)


class _Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: NiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(d, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(d, cfg.mlp_hidden)
        if cfg.adaln_lora_dim is None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, cfg.adaln_lora_dim),
                                                  nn.Linear(cfg.adaln_lora_dim, 6 * d))

    def forward(self, x, c, cu_seqlens, freqs_cos, freqs_sin):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cu_seqlens, freqs_cos, freqs_sin)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class _FinalLayer(nn.Module):
    def __init__(self, d, out_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class NiTOfficialFormulation(nn.Module):
    """The official NiT forward (see the module docstring), with the official state-dict names.

    ``forward(x, t, y, hw_list, return_zs=False)``: x [N, C, p, p], t [B], y [B], hw_list int
    [B, 2] (a PackedSeqs is accepted too). Returns [N, C, p, p] (and [zs] with return_zs).
    Weights are initialised like the official model; ``load_state_dict`` moves them to/from a NiT.
    """

    def __init__(self, config: NiTConfig):
        super().__init__()
        cfg = self.config = config
        d = cfg.hidden_size
        self.x_embedder = _PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = _TimestepEmbedder(d, cfg.frequency_embedding_size)
        self.y_embedder = _LabelEmbedder(cfg.num_label_rows, d)
        self.projector = repa_projector(cfg)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.final_layer = _FinalLayer(d, cfg.patch_dim)
        # fp32 angle caches [1024, Dh/2] per axis, each frequency repeated for its pair (official layout)
        freqs, self.mscale = cfg.rope_table()
        pos = torch.arange(MAX_CACHED_LEN, dtype=torch.float32)[:, None]
        self.register_buffer("freqs_h_cached", (pos * freqs[0]).repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("freqs_w_cached", (pos * freqs[1]).repeat_interleave(2, dim=-1), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for t in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.constant_(t, 0)

    def get_rope(self, hw_list):
        grid = official_grid(hw_list).to(self.freqs_h_cached.device)
        if grid.numel() and int(grid.max()) >= MAX_CACHED_LEN:
            raise ValueError(f"image sides above {MAX_CACHED_LEN} tokens exceed the official RoPE cache")
        freqs = torch.cat([self.freqs_h_cached[grid[0]], self.freqs_w_cached[grid[1]]], dim=-1)
        return (freqs.cos() * self.mscale).unsqueeze(1), (freqs.sin() * self.mscale).unsqueeze(1)

    def forward(self, x, t, y, hw_list=None, return_zs: bool = False, *, packed=None):
        hw_list = packed if hw_list is None else hw_list
        hw_list = torch.as_tensor(getattr(hw_list, "sizes", hw_list))  # a PackedSeqs gives its sizes
        cfg = self.config
        p = cfg.patch_size
        flat_in = x.dim() == 2
        if flat_in:
            x = x.reshape(x.shape[0], cfg.in_channels, p, p)
        x = self.x_embedder(x)
        b = hw_list.shape[0]
        freqs_cos, freqs_sin = self.get_rope(hw_list.tolist())
        seqlens = hw_list[:, 0] * hw_list[:, 1]
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32, device=x.device),
                                torch.cumsum(seqlens, dim=0, dtype=torch.int32).to(x.device)])
        c = self.t_embedder(t) + self.y_embedder(y)
        c = torch.cat([c[i].unsqueeze(0).repeat(int(seqlens[i]), 1) for i in range(b)], dim=0)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c, cu_seqlens, freqs_cos, freqs_sin)
            if (i + 1) == cfg.encoder_depth and return_zs:
                zs = [self.projector(x)]
        x = self.final_layer(x, c)
        x = x.reshape(x.shape[0], -1) if flat_in else x.reshape(x.shape[0], cfg.out_channels, p, p)
        return (x, zs) if return_zs else x

    def extra_repr(self) -> str:
        return "formulation of github WZDTHU/NiT nit_model.py (SDPA per image in place of flash-attn)"
