"""Flow matching for packed images (rectified flow / SiT linear path, as NiT trains).

With clean tokens x, noise eps ~ N(0, I) and a time t per image (1 = pure noise):
    x_t = (1 - t) x + t eps,          v target = d x_t / d t = eps - x.
t is logit-normal: t = sigmoid(mu + sigma n), n ~ N(0, 1) (Esser et al. 2024; the official NiT
draws sigma_edm = exp(N(mu, sigma)) and sets t = sigma_edm / (1 + sigma_edm), the same law).
One t per image is broadcast to that image's tokens.

Losses (every token of the pack weighs the same):
    mse   = mean over tokens of mean over the token's values of (v_pred - v)^2
    dir   = mean over tokens of 1 - cos(v_pred_token, v_token)                  (optional)
    proj  = mean over tokens of 1 - cos(zs_token, feature_token)  (REPA, optional; the negative
            cosine similarity plus 1, as the official code writes it)
    loss  = mse + dir_weight * dir + proj_weight * proj
Labels are replaced by the null class with probability ``label_dropout`` (classifier-free guidance).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import nit_kernels as nk

__all__ = ["sample_t", "per_token", "interpolate", "velocity_target", "drop_labels", "FlowLoss",
           "FlowMatchingLoss", "RepaEncoder"]

# features [N, z_dim] per token of the pack, from the clean tokens x and the pack
RepaEncoder = Callable[[torch.Tensor, nk.PackedSeqs], torch.Tensor]


def sample_t(n: int, *, mu: float = 0.0, sigma: float = 1.0, generator: Optional[torch.Generator] = None,
             device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n logit-normal times in (0, 1): sigmoid(mu + sigma * N(0, 1)), shape [n]."""
    z = torch.randn(n, generator=generator, device=device if generator is None else generator.device)
    return torch.sigmoid(mu + sigma * z).to(device=device, dtype=dtype)


def per_token(v: torch.Tensor, packed: nk.PackedSeqs) -> torch.Tensor:
    """Per-image values v [B, ...] repeated for every token of that image: [N, ...]."""
    return torch.repeat_interleave(v, packed.seqlens.to(v.device).long(), dim=0, output_size=packed.total_tokens)


def _bcast(t_tok: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t_tok.reshape(t_tok.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t_tok: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps, with t_tok [N] per token and x, eps [N, ...]."""
    t = _bcast(t_tok, x)
    return (1 - t) * x + t * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x (the time derivative of x_t)."""
    return eps - x


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """y with each label independently replaced by `null_class` with probability p."""
    if not 0 <= p <= 1:
        raise ValueError(f"label dropout probability must be in [0, 1], got {p}")
    if p == 0:
        return y
    u = torch.rand(y.shape, generator=generator, device=y.device if generator is None else generator.device)
    return torch.where(u.to(y.device) < p, torch.full_like(y, null_class), y)


def _token_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token (row) over all its values: [N]."""
    return F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1)


@dataclasses.dataclass
class FlowLoss:
    """Total loss and its parts (detached parts are for logging)."""

    loss: torch.Tensor
    mse: torch.Tensor
    dir: Optional[torch.Tensor]
    proj: Optional[torch.Tensor]
    t: torch.Tensor  # [B] the times drawn
    y: torch.Tensor  # [B] the labels after dropout


@dataclasses.dataclass
class FlowMatchingLoss:
    """The NiT training objective; call it as ``loss_fn(model, x, y, packed)``.

    Everything it needs comes at construction: `model` is only called, as
    ``model(x_t, t, y, packed, return_zs=...)``, so a DistributedDataParallel wrapper (which has no
    ``config``) is passed as is. ``FlowMatchingLoss.for_config(nit_config, ...)`` fills
    ``null_class`` from a NiTConfig and checks that the model has a row for it.

    Args:
        mu, sigma: logit-normal time distribution.
        label_dropout: probability of replacing a label by ``null_class`` (0 disables).
        dir_weight: weight of the direction loss (0 disables).
        proj_weight: weight of the REPA projection loss; used only with an ``encoder``.
        encoder: callable (x_clean [N, ...], packed) -> features [N, z_dim] per token, or None.
        null_class: the label that stands for "no class" (NiTConfig.null_class); required when
            label_dropout > 0.
    """

    mu: float = 0.0
    sigma: float = 1.0
    label_dropout: float = 0.1
    dir_weight: float = 0.0
    proj_weight: float = 1.0
    encoder: Optional[RepaEncoder] = None
    null_class: Optional[int] = None

    def __post_init__(self):
        if self.label_dropout > 0 and self.null_class is None:
            raise ValueError(f"label_dropout={self.label_dropout} needs null_class (the label that stands for no "
                             f"class, NiTConfig.null_class); FlowMatchingLoss.for_config(config, ...) fills it")

    @classmethod
    def for_config(cls, config, **kwargs) -> "FlowMatchingLoss":
        """The loss for a NiT of `config` (its null_class); `kwargs` are the other fields."""
        if kwargs.get("label_dropout", cls.label_dropout) > 0 and config.num_label_rows <= config.null_class:
            raise ValueError("label_dropout > 0 needs a null-class row (config.class_dropout_prob > 0)")
        return cls(null_class=config.null_class, **kwargs)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, packed, *, t: Optional[torch.Tensor] = None,
                 eps: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> FlowLoss:
        """x: clean tokens [N, C, p, p] or [N, C*p*p]; y [B]; packed PackedSeqs (or int hw_list [B, 2]).
        t [B] and eps (like x) are drawn when not given."""
        if not isinstance(packed, nk.PackedSeqs):
            packed = nk.PackedSeqs.from_sizes(packed, device=x.device)
        b = packed.num_seqs
        if t is None:
            t = sample_t(b, mu=self.mu, sigma=self.sigma, generator=generator, device=x.device, dtype=x.dtype)
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                              device=x.device if generator is None else generator.device).to(x.device)
        y = drop_labels(y, self.label_dropout, self.null_class, generator)
        x_t = interpolate(x, eps, per_token(t, packed))
        v = velocity_target(x, eps)
        use_proj = self.encoder is not None and self.proj_weight != 0
        out = model(x_t, t, y, packed, return_zs=use_proj)
        v_pred, zs = out if use_proj else (out, None)
        mse = (v_pred - v).square().mean()
        loss, d, proj = mse, None, None
        if self.dir_weight:
            d = (1 - _token_cos(v_pred, v)).mean()
            loss = loss + self.dir_weight * d
        if use_proj:
            with torch.no_grad():
                feats = self.encoder(x, packed)
            feats = feats if isinstance(feats, (list, tuple)) else [feats]
            if len(zs) != len(feats):
                raise ValueError(f"REPA: the model gave {len(zs)} projections but the encoder {len(feats)} features")
            proj = sum((1 - _token_cos(z, f.to(z.dtype))).mean() for z, f in zip(zs, feats)) / len(zs)
            loss = loss + self.proj_weight * proj
        return FlowLoss(loss=loss, mse=mse.detach(), dir=None if d is None else d.detach(),
                        proj=None if proj is None else proj.detach(), t=t, y=y)
