"""Exponential moving average of a model's weights, updated with fused multi-tensor ops."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copies of every floating-point parameter, kept in fp32.

    ``update()`` computes, for all parameters at once (``torch._foreach_lerp_``: one multi-tensor op
    for the whole list instead of one per tensor, and one pass over the weights instead of the two
    of a multiply then an add):
        ema = decay * ema + (1 - decay) * param = ema + (1 - decay) * (param - ema)
    Buffers are not averaged: ``state_dict()`` takes them from the live model, so it is a full
    state dict of the model with the averaged parameters, loadable with ``strict=True``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model, self.decay = model, float(decay)
        named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step: ``ema = decay * ema + (1 - decay) * param`` over all parameters."""
        src = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in self.params]
        torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every averaged parameter replaced by its EMA (cast back to
        the parameter's dtype)."""
        sd = dict(self.model.state_dict())
        for n, s, p in zip(self.names, self.shadow, self.params):
            sd[n] = s.to(p.dtype)
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Set the shadow weights from a state dict holding every averaged parameter."""
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"EMA state misses {len(missing)} parameter(s): {', '.join(missing[:5])}")
        for n, s in zip(self.names, self.shadow):
            if tuple(sd[n].shape) != tuple(s.shape):
                raise ValueError(f"EMA state: {n} has shape {tuple(sd[n].shape)}, the model {tuple(s.shape)}")
            s.copy_(sd[n])

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into `model` (a module of the same architecture)."""
        model.load_state_dict(self.state_dict(), strict=True)
        return model
