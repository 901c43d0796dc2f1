"""Flow matching: interpolation, targets, time law, label dropout, losses, a training smoke test."""
import math

import pytest
import torch

import nit_kernels as nk
from nit_model.model_config import NiTConfig
from nit_model.flow import FlowMatchingLoss, drop_labels, interpolate, per_token, sample_t, velocity_target
from nit_model.model import NiT

SIZES = [(2, 3), (1, 1), (4, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py



class Oracle(torch.nn.Module):
    """Returns a fixed prediction (and fixed REPA projections) whatever it is given."""

    def __init__(self, v, zs=None):
        super().__init__()
        self.v, self.zs = v, zs
        self.calls = []

    def forward(self, x, t, y, packed, return_zs=False):
        self.calls.append((x, t, y))
        return (self.v, self.zs) if return_zs else self.v


def _batch(c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = nk.PackedSeqs.from_sizes(SIZES)
    x = torch.randn(packed.total_tokens, c, 1, 1, generator=g)
    eps = torch.randn(x.shape, generator=g)
    t = torch.rand(packed.num_seqs, generator=g)
    y = torch.tensor([0, 1, 2])
    return x, eps, t, y, packed


def test_interpolation_uses_one_time_per_image():
    x, eps, t, y, packed = _batch()
    tt = per_token(t, packed)
    assert tt.shape == (packed.total_tokens,)
    assert torch.equal(tt, torch.cat([t[i].repeat(h * w) for i, (h, w) in enumerate(SIZES)]))
    xt = interpolate(x, eps, tt)
    seg = packed.seg_ids.long()
    assert torch.allclose(xt, (1 - t[seg, None, None, None]) * x + t[seg, None, None, None] * eps)
    assert torch.equal(interpolate(x, eps, torch.zeros(x.shape[0])), x)
    assert torch.equal(interpolate(x, eps, torch.ones(x.shape[0])), eps)
    # v is the time derivative of the path
    h = 1e-3
    d = (interpolate(x, eps, tt + h) - interpolate(x, eps, tt - h)) / (2 * h)
    assert torch.allclose(d, velocity_target(x, eps), atol=1e-3)


def test_loss_is_zero_for_the_exact_velocity_and_mse_otherwise():
    x, eps, t, y, packed = _batch()
    v = eps - x
    loss_fn = FlowMatchingLoss(label_dropout=0.0, dir_weight=0.5)
    out = loss_fn(Oracle(v), x, y, packed, t=t, eps=eps)
    assert out.loss.abs().item() < 1e-6 and out.mse.item() == 0 and out.dir.abs().item() < 1e-6
    wrong = torch.zeros_like(v)
    out = FlowMatchingLoss(label_dropout=0.0)(Oracle(wrong), x, y, packed, t=t, eps=eps)
    assert torch.allclose(out.loss, v.square().mean()) and out.dir is None and out.proj is None
    # the model saw x_t, the per-image times and the labels
    model = Oracle(v)
    loss_fn(model, x, y, packed, t=t, eps=eps)
    xt, tm, ym = model.calls[0]
    assert torch.equal(xt, interpolate(x, eps, per_token(t, packed))) and torch.equal(tm, t) and torch.equal(ym, y)


def test_direction_loss_is_one_minus_cosine_per_token():
    x, eps, t, y, packed = _batch(c=4)
    v = eps - x
    pred = -v  # opposite direction on every token: cos = -1
    out = FlowMatchingLoss(label_dropout=0.0, dir_weight=2.0)(Oracle(pred), x, y, packed, t=t, eps=eps)
    assert torch.allclose(out.dir, torch.tensor(2.0))
    assert torch.allclose(out.loss, (pred - v).square().mean() + 2.0 * 2.0)


def test_repa_projection_loss():
    x, eps, t, y, packed = _batch()
    z = torch.randn(packed.total_tokens, 8)
    v = eps - x
    same = FlowMatchingLoss(label_dropout=0.0, encoder=lambda xc, p: 3 * z)
    assert same(Oracle(v, [z]), x, y, packed, t=t, eps=eps).proj.abs().item() < 1e-6
    opposite = FlowMatchingLoss(label_dropout=0.0, proj_weight=0.5, encoder=lambda xc, p: -z)
    out = opposite(Oracle(v, [z]), x, y, packed, t=t, eps=eps)
    assert torch.allclose(out.proj, torch.tensor(2.0)) and torch.allclose(out.loss, torch.tensor(1.0))
    # no encoder: the model is not asked for projections
    model = Oracle(v)
    FlowMatchingLoss(label_dropout=0.0)(model, x, y, packed, t=t, eps=eps)


def test_logit_normal_time_statistics():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, generator=g)
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    assert abs(t.median().item() - 0.5) < 0.005
    t = sample_t(200_000, mu=-0.5, sigma=0.7, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.5) < 0.01 and abs(logit.std().item() - 0.7) < 0.01
    assert abs(t.median().item() - 1 / (1 + math.exp(0.5))) < 0.005


def test_label_dropout_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (100_000,), generator=g)
    d = drop_labels(y, 0.1, null_class=10, generator=g)
    dropped = d == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert torch.equal(d[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert (drop_labels(y, 1.0, 10) == 10).all()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        drop_labels(y, 1.5, 10)


def test_training_a_tiny_nit_reduces_the_loss():
    torch.manual_seed(0)
    cfg = NiTConfig.from_name("tiny", depth=2, hidden_size=64)
    model = NiT(cfg)
    packed = nk.PackedSeqs.from_sizes([(4, 4), (2, 6), (3, 3)])
    x = torch.randn(packed.total_tokens, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    y = torch.tensor([1, 2, 3])
    t = torch.tensor([0.2, 0.5, 0.8])
    eps = torch.randn_like(x)
    loss_fn = FlowMatchingLoss(label_dropout=0.0, dir_weight=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = loss_fn(model, x, y, packed, t=t, eps=eps)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    # label dropout uses the config's null class
    out = FlowMatchingLoss.for_config(cfg, label_dropout=1.0)(model, x, y, packed)
    assert (out.y == cfg.null_class).all() and out.t.shape == (3,)


def test_the_loss_needs_no_model_config_so_a_ddp_module_is_called_as_is():
    """Everything the loss needs comes at construction: the model is only called (a DDP wrapper,
    which has no `config`, can be passed directly)."""
    x, eps, t, y, packed = _batch()
    model = Oracle(eps - x)
    assert not hasattr(model, "config")
    out = FlowMatchingLoss(label_dropout=1.0, null_class=7)(model, x, y, packed, t=t, eps=eps)
    assert (out.y == 7).all() and (model.calls[0][2] == 7).all()
    cfg = NiTConfig.from_name("tiny")
    assert FlowMatchingLoss.for_config(cfg, label_dropout=0.5).null_class == cfg.null_class


def test_label_dropout_without_a_null_class_is_refused_at_construction():
    with pytest.raises(ValueError, match="null_class"):
        FlowMatchingLoss(label_dropout=0.1)
    no_null_row = NiTConfig.from_name("tiny", class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null-class row"):
        FlowMatchingLoss.for_config(no_null_row, label_dropout=0.1)
    assert FlowMatchingLoss.for_config(no_null_row, label_dropout=0.0).label_dropout == 0.0
