"""RoPE scaling chosen at sampling time, one scale per image: resolution extrapolation as NiT does it.

A model trained with image sides up to L0 tokens (``ori_max_pe_len``) has seen RoPE angles
``p * f_i`` for positions p < L0 only. At a larger side L the official sampler (NiT, Wang et al.
2025; FiT, Wang et al. 2024) rescales the frequency table with the dynamic scale
``s = max(1, L / L0)`` (per axis with ``decouple``): position interpolation ("linear", Chen et al.
2023), NTK-aware base change (bloc97, 2023) and its "pro" variants with an attention magnitude
factor, NTK-by-parts and YaRN (Peng et al., 2023). With ``s = 1`` every method gives the trained
frequencies, so sizes within the training range keep the angles they were trained with.

Here the scale is computed for each image from its own size, and a pack of images of different
sizes keeps one table per image: images are grouped by table, and each group's queries and keys
are rotated with its own table (the kernels compute angles per image from its positions; only the
frequency table differs). One forward still serves the whole pack.

``auto`` uses exactly the trained table (and magnitude 1) for every image whose sides are within
the training range and :data:`AUTO_METHOD` beyond it.

    scaling = RoPEScaling("yarn", ori_max_pe_len=16)
    with use_rope_scaling(model, scaling):      # a NiT; restores its own table on exit
        v = model(x, t, y, packed)
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import torch

import nit_kernels as nk
from nit_kernels import ROPE_METHODS, ops, rope_freqs, rope_mscale
from nit_kernels.nn import AxialRoPE2D, VarlenSelfAttention

__all__ = ["ROPE_CHOICES", "AUTO_METHOD", "RoPEScaling", "ScaledAxialRoPE2D", "ScaledVarlenSelfAttention",
           "use_rope_scaling", "training_max_side", "resolve_rope_scaling", "parse_rope_methods"]

# chosen by the per-method evaluation of the shapes demo's native model (1,500 steps, 16 samples per
# size): the lowest mean FD over the six unseen sizes (459 vs 474-518 for the other methods, the
# accuracies equal within sampling noise) and no 2x2 repetition at twice the trained side (quadrant
# correlation -0.05, "normal" 0.21); "linear" is better at the larger squares but worse at 1:3
AUTO_METHOD = "yarn"
ROPE_CHOICES = ROPE_METHODS + ("auto",)


def _axis_extents(h: int, w: int, positions: str) -> tuple[int, int]:
    """How many positions each RoPE axis spans on an h x w image: axis 0 is the column under
    "grid" positions (p0 = t % w) and t % h under the official order (p1 = t // h spans w)."""
    return (w, h) if positions == "grid" else (h, w)


@dataclasses.dataclass(frozen=True)
class RoPEScaling:
    """A per-image RoPE scaling rule.

    method: one of ``nit_kernels.ROPE_METHODS`` or "auto". ori_max_pe_len: the largest side (in
    tokens) seen in training. decouple: scale each axis by its own side (the official
    ``decouple``) instead of both by the longer side.
    """

    method: str
    ori_max_pe_len: Optional[int] = None
    decouple: bool = False

    def __post_init__(self):
        if self.method not in ROPE_CHOICES:
            raise ValueError(f"unknown RoPE method {self.method!r}; choose one of {', '.join(ROPE_CHOICES)}")
        if self.method != "normal":
            v = self.ori_max_pe_len
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RoPE method {self.method!r} needs the training max side in tokens "
                                 f"(ori_max_pe_len, a positive int), got {v!r}")

    def within_training(self, h: int, w: int) -> bool:
        """Whether both sides (tokens) are within the training max side."""
        return self.method == "normal" or max(h, w) <= self.ori_max_pe_len

    def image_key(self, h: int, w: int, positions: str = "grid") -> tuple:
        """What decides the table of an h x w image (tokens): ("trained",) when it is the trained
        table with magnitude 1, else (method, scale axis 0, scale axis 1, mscale)."""
        method = self.method
        if method == "normal" or (method == "auto" and self.within_training(h, w)):
            return ("trained",)
        method = AUTO_METHOD if method == "auto" else method
        ori = self.ori_max_pe_len
        if self.decouple:
            scale = tuple(max(1.0, e / ori) for e in _axis_extents(h, w, positions))
        else:
            scale = (max(1.0, max(h, w) / ori),) * 2
        mscale = rope_mscale(method, max_pe_len=(h, w), ori_max_pe_len=ori)
        if scale == (1.0, 1.0) and mscale == 1.0:
            return ("trained",)  # s = 1 gives the trained frequencies in every method
        return (method, scale[0], scale[1], mscale)

    def table(self, key: tuple, head_dim: int, theta: float) -> tuple[torch.Tensor, float]:
        """(freqs fp32 [2, head_dim // 4], mscale) for an image_key."""
        if key == ("trained",):
            return rope_freqs(head_dim, theta=theta), 1.0
        method, s0, s1, mscale = key
        return rope_freqs(head_dim, theta=theta, method=method, scale=(s0, s1), ori_max_pe_len=self.ori_max_pe_len), mscale


class ScaledAxialRoPE2D(AxialRoPE2D):
    """An AxialRoPE2D whose table can be replaced per image by a :class:`RoPEScaling` rule.

    With ``scaling`` None (the default) it is the plain module: one table for every image. With a
    rule, :meth:`plan` groups the images of a pack by table; the plans of the last few packs are
    kept, as a sampler calls the model many times on the same packs (and every block asks).
    """

    def __init__(self, head_dim: int, *, theta: float = 10000.0, **kw):
        super().__init__(head_dim, theta=theta, **kw)
        self.theta = float(theta)
        self.scaling: Optional[RoPEScaling] = None
        self._plans: list = []  # (pack, plan) of the last few packs, newest last

    def set_scaling(self, scaling: Optional[RoPEScaling]) -> None:
        self.scaling = scaling
        self._plans = []

    def plan(self, packed: nk.PackedSeqs) -> Optional[list]:
        """None without a rule, else a list of (freqs, mscale, token index [n] or None, sub-pack or
        None) per group of images sharing a table; index None means the group is the whole pack."""
        if self.scaling is None:
            return None
        for cached_pack, cached in self._plans:
            if cached_pack is packed:
                return cached
        sizes = [tuple(hw) for hw in packed.sizes.tolist()]
        groups: dict = {}
        for i, (h, w) in enumerate(sizes):
            groups.setdefault(self.scaling.image_key(h, w, self.positions), []).append(i)
        device = packed.cu_seqlens.device
        cu = packed.cu_seqlens.tolist()
        out = []
        for key, members in groups.items():
            freqs, mscale = self.scaling.table(key, self.head_dim, self.theta)
            freqs = freqs.to(device)
            if len(groups) == 1:
                out.append((freqs, mscale, None, None))
                continue
            idx = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in members]).to(device)
            out.append((freqs, mscale, idx, nk.PackedSeqs.from_sizes([sizes[i] for i in members], device=device)))
        # a guided sampler alternates between a pack and its doubled twin: keep both
        self._plans = self._plans[-3:] + [(packed, out)]
        return out


class ScaledVarlenSelfAttention(VarlenSelfAttention):
    """VarlenSelfAttention that rotates each group of images of a pack with its own RoPE table
    when its :class:`ScaledAxialRoPE2D` carries a scaling rule (otherwise unchanged)."""

    def _rotate(self, q, k, packed, freqs, mscale):
        r = self.rope
        if self.qk_norm:
            return ops.qk_norm_rope(q, k, packed, freqs, q_weight=self.q_norm.weight, q_bias=self.q_norm.bias,
                                    k_weight=self.k_norm.weight, k_bias=self.k_norm.bias, eps=self.q_norm.eps,
                                    positions=r.positions, mscale=mscale, backend=self.backend)
        return ops.rope_2d(q, k, packed, freqs, positions=r.positions, mscale=mscale, backend=self.backend)

    def _transform_qk(self, q, k, packed):
        plan = self.rope.plan(packed) if isinstance(self.rope, ScaledAxialRoPE2D) else None
        if plan is None:
            return super()._transform_qk(q, k, packed)
        if plan[0][2] is None:  # one table for the whole pack
            return self._rotate(q, k, packed, plan[0][0], plan[0][1])
        qs, ks, order = [], [], []
        for freqs, mscale, idx, sub in plan:
            qg, kg = self._rotate(q.index_select(0, idx), k.index_select(0, idx), sub, freqs, mscale)
            qs.append(qg)
            ks.append(kg)
            order.append(idx)
        perm = torch.cat(order)  # token positions of the concatenated groups
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return torch.cat(qs).index_select(0, inverse), torch.cat(ks).index_select(0, inverse)


@contextlib.contextmanager
def use_rope_scaling(model: torch.nn.Module, scaling: Optional[RoPEScaling]):
    """Within the block, `model` (a NiT) rotates every image with the table `scaling` gives its size.
    None, or "normal", leaves the model's own table in place."""
    rope = getattr(model, "rope", None)
    if scaling is None or scaling.method == "normal":
        yield model
        return
    if not isinstance(rope, ScaledAxialRoPE2D):
        raise ValueError(f"RoPE method {scaling.method!r} needs a NiT model (its rope module carries the "
                         f"per-image tables), got {type(model).__name__}")
    if getattr(model.config, "rope_method", "normal") != "normal":
        raise ValueError(f"this model's config already fixes rope_method={model.config.rope_method!r}; "
                         f"sample it with rope method 'normal' (its own table) or set rope_method normal")
    previous = rope.scaling
    rope.set_scaling(scaling)
    try:
        yield model
    finally:
        rope.set_scaling(previous)


def training_max_side(config, train_config=None) -> Optional[int]:
    """The largest image side (tokens) of training: the config's rope_ori_max_pe_len when set,
    else the shapes data's max_side over the patch size; None when unknown."""
    if getattr(config, "rope_ori_max_pe_len", None):
        return int(config.rope_ori_max_pe_len)
    data = getattr(train_config, "data", None)
    if data is not None and data.kind == "shapes":
        return int(data.max_side) // int(config.patch_size)
    return None


def resolve_rope_scaling(method: Optional[str], config, train_config=None, *, ori_max_pe_len: Optional[int] = None,
                         decouple: bool = False) -> Optional[RoPEScaling]:
    """The rule for sampling a model: "normal" -> None (the model's own table); a method -> a
    RoPEScaling whose training max side comes from `ori_max_pe_len` or, by default, from the
    checkpoint (`training_max_side`); None (the default) -> "auto" when the checkpoint records its
    training max side and its table is the trained one, else None. Raises ValueError naming what
    is missing."""
    if method is None:
        known = ori_max_pe_len is not None or training_max_side(config, train_config) is not None
        if getattr(config, "rope_method", "normal") != "normal" or not known:
            return None
        method = "auto"
    if method == "normal":
        return None
    if method not in ROPE_CHOICES:
        raise ValueError(f"unknown RoPE method {method!r}; choose one of {', '.join(ROPE_CHOICES)}")
    if ori_max_pe_len is None:
        ori_max_pe_len = training_max_side(config, train_config)
        if ori_max_pe_len is None:
            raise ValueError(f"RoPE method {method!r} needs the training max side in tokens, which this checkpoint "
                             f"does not record: pass --rope-ori-max-pe-len (rope_ori_max_pe_len=)")
    elif isinstance(ori_max_pe_len, bool) or not isinstance(ori_max_pe_len, int) or ori_max_pe_len < 1:
        raise ValueError(f"the training max side (--rope-ori-max-pe-len) must be a positive number of tokens, "
                         f"got {ori_max_pe_len!r}")
    return RoPEScaling(method, int(ori_max_pe_len), bool(decouple))


def parse_rope_methods(spec) -> list[str]:
    """"normal,ntk-aware,yarn" or a list -> ["normal", "ntk-aware", "yarn"] (each checked, no repeats)."""
    items = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else [str(m) for m in spec]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"no RoPE methods given; pass a comma-separated list of {', '.join(ROPE_CHOICES)}")
    bad = [m for m in items if m not in ROPE_CHOICES]
    if bad:
        raise ValueError(f"unknown RoPE method {bad[0]!r}; choose from {', '.join(ROPE_CHOICES)}")
    return list(dict.fromkeys(items))
