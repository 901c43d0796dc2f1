"""Packed mixed-resolution sampling: the same images as sampling each alone, class conditioning
and guidance through the pack, size validation, and the files written."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import nit_model
from nit_model.model_config import NiTConfig
from nit_model.model import NiT
from nit_model.report import contact_sheet, save_npz, save_samples
from nit_model.sampling import (_noise, check_sizes, image_seed, load_sampling_model, nearest_valid_sizes, parse_sizes,
                                plan_packs, sample, sample_tokens)

# ------------------------------------------------------------------------------------------------
# a toy "model" whose velocity is exact: per class y, data x0 ~ N(MEANS[y], S^2) in every pixel


MEANS = [-1.0, 0.5, 2.0]
S = 0.3


@dataclasses.dataclass
class ToyConfig:
    in_channels: int = 1
    patch_size: int = 1
    num_classes: int = 3

    @property
    def null_class(self):
        return self.num_classes

    @property
    def num_label_rows(self):
        return self.num_classes + 1


class ToyFlow(torch.nn.Module):
    """forward(x [N, C, p, p], t [B], y [B], packed) -> the exact E[eps - x0 | x_t] per token of
    image b, for class y[b]; the null class is the mixture's first moment only (a mean flow),
    which is all the guidance tests need. Records every call's labels and token count."""

    def __init__(self):
        super().__init__()
        self.config = ToyConfig()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, y, packed):
        self.calls.append((y.tolist(), x.shape[0], float(t[0])))
        seg = packed.seg_ids.long()
        means = torch.tensor(MEANS + [float(np.mean(MEANS))], dtype=x.dtype)[y][seg].view(-1, 1, 1, 1)
        tt = t.to(x.dtype)[seg].view(-1, 1, 1, 1)
        m = (1 - tt) * means
        var = (1 - tt) ** 2 * S ** 2 + tt ** 2
        return tt / var * (x - m) - (means + (1 - tt) * S ** 2 / var * (x - m))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_toy_flow_reaches_the_exact_transport_map_of_each_class_through_the_pack(solver):
    # Images of three sizes and classes in one pack. The exact probability-flow ODE of
    # N(MEANS[y], S^2) maps the initial noise z of every pixel to MEANS[y] + S z; the sampler
    # must approach that map as steps grow, image by image, from each image's own noise.
    sizes, labels, seed = [(16, 16), (8, 32), (24, 12)], [0, 1, 2], 5
    z = [_noise(torch.Generator().manual_seed(image_seed(seed, i)), 1, s, 1) for i, s in enumerate(sizes)]
    errs = []
    for steps in (2, 8, 32):
        out = sample_tokens(ToyFlow(), sizes, labels, steps=steps, solver=solver, seed=seed, progress=False)
        errs.append(max(float((o - (MEANS[y] + S * zi)).abs().max()) for o, zi, y in zip(out, z, labels)))
    # 4x the steps: Euler's error shrinks ~4x (first order), Heun's ~16x (second order)
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] / errs[2] > (3.0 if solver == "euler" else 10.0)
    assert errs[2] < (0.08 if solver == "euler" else 5e-3)
    for o, y in zip(out, labels):  # and so the samples have the class's statistics
        assert abs(float(o.mean()) - MEANS[y]) < 0.1 and abs(float(o.std()) - S) < 0.06


def test_guidance_shares_the_pack_uses_the_null_class_and_only_inside_the_interval():
    toy = ToyFlow()
    sizes, labels = [(4, 4), (2, 6)], [0, 2]
    n_tok = 16 + 12
    sample_tokens(toy, sizes, labels, steps=4, cfg_scale=3.0, cfg_interval=(0.3, 0.8), progress=False)
    # one forward per step; t = 1, .75, .5, .25: guided (both halves in one pack) only at .75 and .5
    assert [c[2] for c in toy.calls] == [1.0, 0.75, 0.5, 0.25]
    assert [c[1] for c in toy.calls] == [n_tok, 2 * n_tok, 2 * n_tok, n_tok]
    assert toy.calls[1][0] == [0, 2, 3, 3]  # conditional labels, then the null class (num_classes)
    assert toy.calls[0][0] == [0, 2]
    # guidance outside every visited t equals no guidance; inside it, it changes the result
    plain = sample_tokens(ToyFlow(), sizes, labels, steps=4, progress=False)
    never = sample_tokens(ToyFlow(), sizes, labels, steps=4, cfg_scale=3.0, cfg_interval=(0.1, 0.2), progress=False)
    always = sample_tokens(ToyFlow(), sizes, labels, steps=4, cfg_scale=3.0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain, never))
    assert all(float((a - b).abs().max()) > 0.1 for a, b in zip(plain, always))


# ------------------------------------------------------------------------------------------------
# the real model: packing does not change any image


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = NiTConfig.from_name("tiny", depth=2, hidden_size=64, num_heads=2, num_classes=6)
    return NiT(cfg).eval()


@pytest.mark.parametrize("solver,cfg", [("euler", 2.0), ("sde", 1.5), ("heun", 1.0)])
def test_packed_mixed_sizes_equal_each_image_alone(tiny, solver, cfg):
    sizes = [(4, 4), (3, 7), (8, 2), (1, 5), (4, 4)]
    labels = [0, 3, 5, 1, 2]
    kw = dict(steps=3, solver=solver, cfg_scale=cfg, cfg_interval=(0.2, 1.0), seed=7, progress=False)
    st = {}
    packed = sample_tokens(tiny, sizes, labels, stats=st, **kw)
    assert st["packs"] == 1
    for i, (s, y) in enumerate(zip(sizes, labels)):
        alone = sample_tokens(tiny, [s], [y], image_ids=[i], **kw)[0]
        torch.testing.assert_close(packed[i], alone, atol=2e-5, rtol=1e-5)
    # a small token budget splits the request into several packs: the same images again
    st2 = {}
    split = sample_tokens(tiny, sizes, labels, token_budget=40, stats=st2, **kw)
    assert st2["packs"] > 1
    for a, b in zip(packed, split):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    # the same seed gives the same image; another seed another one
    other = sample_tokens(tiny, sizes[:1], labels[:1], **{**kw, "seed": 8})[0]
    assert float((other - packed[0]).abs().max()) > 1e-2


def test_plan_packs_budget_groups_and_oversized():
    counts = [64, 256, 128, 64, 900, 128]
    packs = plan_packs(counts, 600, doubled=True)
    assert sorted(i for p in packs for i in p) == list(range(6))
    for p in packs:
        assert sum(2 * counts[i] for i in p) <= 600 or len(p) == 1
    assert [4] in packs  # 1800 doubled tokens: alone
    by_size = plan_packs(counts, 10_000, doubled=False, groups=counts)
    assert sorted(map(sorted, by_size)) == [[0, 3], [1], [2, 5], [4]]
    with pytest.raises(ValueError, match="token_budget"):
        plan_packs(counts, 0, doubled=False)


def test_sizes_are_checked_with_nearest_valid_suggestions():
    assert parse_sizes("256x256, 432X768") == [(256, 256), (432, 768)]
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_sizes("256")
    with pytest.raises(ValueError, match="positive"):
        parse_sizes([(0, 4)])
    # the official README's 432x768 at DC-AE f32 x patch 1: not a multiple of 32 in height
    with pytest.raises(ValueError, match=r"432x768.*stride 32.*height.*416x768, 448x768"):
        check_sizes([(256, 256), (432, 768)], 32)
    assert nearest_valid_sizes(31, 33, 4)[0] == (32, 32)
    assert nearest_valid_sizes(30, 33, 4)[:2] == [(28, 32), (32, 32)]  # ties: the smaller first
    assert nearest_valid_sizes(2, 8, 4)[0] == (4, 8)  # at least one stride a side
    check_sizes([(4, 8), (96, 32)], 4)


def test_sample_request_order_labels_and_errors(tiny):
    res = nit_model.sample(tiny, "16x16,8x24", labels="1,4", num=3, steps=2, seed=3, progress=False)
    assert [im.shape for im in res.images] == [(16, 16, 3)] * 3 + [(8, 24, 3)] * 3
    assert all(im.dtype == np.uint8 for im in res.images)
    assert res.labels == [1, 4, 1, 1, 4, 1]
    assert res.seeds == [image_seed(3, i) for i in range(6)]
    assert res.stats["packs"] == 1 and res.stats["forwards"] == 2
    # decoded pixels are the unpatchified tokens, clamped and rounded
    assert res.tensors[0].shape == (3, 16, 16) and float(res.tensors[0].abs().max()) <= 1.0
    with pytest.raises(ValueError, match=r"10x16.*patch size 4.*nearest valid sizes: 8x16, 12x16"):
        sample(tiny, "10x16", progress=False)
    with pytest.raises(ValueError, match="class id 6 is out of range"):
        sample(tiny, "8x8", labels=[6], progress=False)
    with pytest.raises(ValueError, match="solver must be"):
        sample(tiny, "8x8", solver="ddim", progress=False)
    no_null = NiT(dataclasses.replace(tiny.config, class_dropout_prob=0.0)).eval()
    with pytest.raises(ValueError, match="null class"):
        sample(no_null, "8x8", cfg_scale=2.0, progress=False)


def test_latent_model_decodes_with_its_autoencoder():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(in_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8),
                                  decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                                  decoder_layers_per_block=(1, 1), encoder_block_types="ResBlock",
                                  decoder_block_types="ResBlock", encoder_qkv_multiscales=((), ()),
                                  decoder_qkv_multiscales=((), ()), scaling_factor=0.5).eval()
    model = NiT(NiTConfig.from_name("tiny", in_channels=4, patch_size=1, depth=1, encoder_depth=1, hidden_size=32, num_heads=2,
                                    num_classes=3)).eval()
    sm = load_sampling_model(model, vae=vae)
    assert sm.space == "latents" and sm.vae_factor == 2 and sm.stride == 2
    res = sample(sm, "8x8,4x12", num=1, steps=2, progress=False)
    assert [im.shape for im in res.images] == [(8, 8, 3), (4, 12, 3)]
    lat = sample(sm, "8x8", num=1, steps=2, output="latents", progress=False)
    assert lat.images is None and lat.tensors[0].shape == (4, 4, 4)
    # decoding: latent / scaling -> vae.decode, the same as the autoencoder on its own
    with torch.no_grad():
        ref = vae.decode(lat.tensors[0][None] / 0.5).sample[0].clamp(-1, 1)
    torch.testing.assert_close(res.tensors[0], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"7x8.*VAE factor 2 x patch 1"):
        sample(sm, "7x8", progress=False)


def test_npz_contact_sheet_and_pngs(tmp_path, tiny):
    res = sample(tiny, "8x8,12x4", labels=[0, 5], num=2, steps=1, progress=False)
    files = save_samples(res, str(tmp_path), class_names=["a", "b", "c", "d", "e", "f"])
    assert len(files["pngs"]) == 4 and all(os.path.isfile(p) for p in files["pngs"])
    assert os.path.basename(files["pngs"][1]) == "00001_8x8_f.png"
    assert [os.path.basename(p) for p in files["npz"]] == ["samples_2x8x8x3.npz", "samples_2x12x4x3.npz"]
    assert "one .npz per size" in files["note"]
    with np.load(files["npz"][1]) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (2, 12, 4, 3)
        np.testing.assert_array_equal(z["arr_0"][0], res.images[2])
        assert z["arr_1"].tolist() == [0, 5]
    from PIL import Image
    sheet = Image.open(files["contact_sheet"])
    assert sheet.width >= 12 and sheet.height >= 12
    with pytest.raises(ValueError, match="uint8"):
        save_npz([np.zeros((4, 4, 3), np.float32)], [0], str(tmp_path))
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([], str(tmp_path / "x.png"))


# ------------------------------------------------------------------------------------------------
# RoPE scaling at sampling time, one scale per image (nit_model.rope_scaling)

from nit_kernels import ROPE_METHODS, rope_freqs  # noqa: E402
from nit_model.rope_scaling import (RoPEScaling, parse_rope_methods, resolve_rope_scaling,  # noqa: E402
                                    use_rope_scaling)


@pytest.fixture(scope="module")
def busy():
    """A tiny NiT whose every weight is random (adaLN-Zero would make the output 0)."""
    torch.manual_seed(1)
    cfg = NiTConfig.from_name("tiny", depth=2, hidden_size=64, num_heads=2, num_classes=6)
    m = NiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("method", ROPE_METHODS + ("auto",))
def test_a_method_changes_the_angles_only_beyond_the_trained_range(method):
    ori, base = 8, rope_freqs(32)
    rule = RoPEScaling(method, ori)
    for h, w in [(1, 1), (8, 8), (3, 8), (8, 2)]:  # within the trained sides (one of them 1:4)
        freqs, mscale = rule.table(rule.image_key(h, w), 32, 10000.0)
        assert torch.equal(freqs, base), (method, h, w)
        if method in ("normal", "auto", "linear", "ntk-aware", "ntk-by-parts", "yarn"):
            assert mscale == 1.0
    for h, w in [(12, 12), (4, 16)]:  # beyond: every scaling method rescales its frequencies
        freqs, mscale = rule.table(rule.image_key(h, w), 32, 10000.0)
        if method in ("normal", "scale1", "scale2"):  # these keep the angles (scale1/2: magnitude only)
            assert torch.equal(freqs, base)
        else:
            assert not torch.allclose(freqs, base) and torch.all(freqs <= base * (1 + 1e-6)), (method, h, w)
    # auto: the trained table within the range, its chosen method beyond, as that method would
    auto = RoPEScaling("auto", ori)
    assert auto.image_key(8, 8) == ("trained",)
    from nit_model.rope_scaling import AUTO_METHOD
    assert auto.image_key(12, 12) == RoPEScaling(AUTO_METHOD, ori).image_key(12, 12)


def test_decoupled_scales_follow_each_axis_extent():
    rule = RoPEScaling("linear", 8, decouple=True)
    # grid positions: axis 0 is the column (spans w), axis 1 the row (spans h)
    assert rule.image_key(4, 16, "grid")[1:3] == (2.0, 1.0)
    assert rule.image_key(16, 4, "grid")[1:3] == (1.0, 2.0)
    assert RoPEScaling("linear", 8).image_key(4, 16)[1:3] == (2.0, 2.0)  # coupled: the longer side


@pytest.mark.parametrize("method", ["yarn", "ntk-aware-pro1", "linear"])
def test_mixed_pack_keeps_each_image_its_own_scale(busy, method):
    """One forward over a pack of a trained-range image and two larger ones equals each image
    alone through a model whose fixed table is the official one for that image's size."""
    ori = 6
    sizes = [(4, 6), (12, 12), (9, 3), (8, 16)]
    packed = nk_pack(sizes)
    x = torch.randn(packed.total_tokens, busy.config.patch_dim)
    t = torch.tensor([0.3, 0.7, 0.5, 0.9])
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad(), use_rope_scaling(busy, RoPEScaling(method, ori)):
        out = busy(x, t, y, packed)
    with torch.no_grad():
        plain = busy(x, t, y, packed)
    for i, (part, (h, w)) in enumerate(zip(torch.split(out, [h * w for h, w in sizes]), sizes)):
        if max(h, w) <= ori and method != "ntk-aware-pro1":
            ref_model = busy
        else:  # the official table for one size: the config's rope_method with max_pe_len = (h, w)
            cfg = busy.config.replace(rope_method=method, rope_max_pe_len_h=h, rope_max_pe_len_w=w,
                                      rope_ori_max_pe_len=ori)
            ref_model = NiT(cfg).eval()
            ref_model.load_state_dict(busy.state_dict())
        xi = torch.split(x, [a * b for a, b in sizes])[i]
        with torch.no_grad():
            ref = ref_model(xi, t[i:i + 1], y[i:i + 1], nk_pack([(h, w)]))
        torch.testing.assert_close(part, ref, atol=2e-5, rtol=1e-5)
    # the rule is gone after the block; the larger images did change
    assert busy.rope.scaling is None
    assert float((out[24:] - plain[24:]).abs().max()) > 1e-3
    if method != "ntk-aware-pro1":  # pro1's magnitude factor starts at half the trained side
        torch.testing.assert_close(out[:24], plain[:24], atol=2e-5, rtol=1e-5)


def nk_pack(sizes):
    import nit_kernels as nk
    return nk.PackedSeqs.from_sizes(sizes)


def test_sampling_with_a_rope_method_packs_like_each_image_alone(busy):
    rule = RoPEScaling("ntk-by-parts", 6)
    sizes, labels = [(4, 4), (12, 8), (3, 9), (10, 10)], [0, 1, 2, 3]
    kw = dict(steps=2, cfg_scale=2.0, cfg_interval=(0.3, 1.0), seed=5, progress=False, rope=rule)
    st = {}
    packed = sample_tokens(busy, sizes, labels, stats=st, **kw)
    assert st["packs"] == 1
    for i, (s, y) in enumerate(zip(sizes, labels)):
        alone = sample_tokens(busy, [s], [y], image_ids=[i], **kw)[0]
        torch.testing.assert_close(packed[i], alone, atol=2e-5, rtol=1e-5)
    normal = sample_tokens(busy, sizes, labels, **{**kw, "rope": None})
    torch.testing.assert_close(packed[0], normal[0], atol=2e-5, rtol=1e-5)  # within range: unchanged
    assert float((packed[3] - normal[3]).abs().max()) > 1e-3


def test_rope_method_defaults_and_errors(busy):
    cfg = busy.config
    assert resolve_rope_scaling(None, cfg) is None  # no training max side known: the model's own table
    assert resolve_rope_scaling(None, cfg, ori_max_pe_len=8) == RoPEScaling("auto", 8)
    assert resolve_rope_scaling("normal", cfg, ori_max_pe_len=8) is None
    with pytest.raises(ValueError, match="training max side"):
        resolve_rope_scaling("yarn", cfg)
    with pytest.raises(ValueError, match="unknown RoPE method 'ntk'"):
        resolve_rope_scaling("ntk", cfg, ori_max_pe_len=8)
    with pytest.raises(ValueError, match="positive number of tokens"):
        resolve_rope_scaling("yarn", cfg, ori_max_pe_len=0)
    assert parse_rope_methods("normal, yarn,yarn") == ["normal", "yarn"]
    with pytest.raises(ValueError, match="unknown RoPE method 'bogus'"):
        parse_rope_methods("normal,bogus")
    res = sample(busy, "16x16,48x48", num=1, steps=1, progress=False, rope_method="yarn", rope_ori_max_pe_len=8)
    assert res.settings["rope"] == {"method": "yarn", "ori_max_pe_len": 8, "decouple": False}
    fixed = NiT(cfg.replace(rope_method="yarn", rope_max_pe_len_h=8, rope_max_pe_len_w=8, rope_ori_max_pe_len=4))
    with pytest.raises(ValueError, match="already fixes rope_method"):
        sample(fixed, "16x16", steps=1, progress=False, rope_method="linear", rope_ori_max_pe_len=4)


@pytest.mark.parametrize("positions", ["grid", "official"])
def test_config_decoupled_table_scales_only_the_axis_beyond_training(positions):
    """A 4 x 16-token image (trained sides up to 4): with decouple, only the axis that spans the
    16 columns is rescaled, whichever order the positions take; the same table as the per-image
    rule's."""
    cfg = NiTConfig.from_name("tiny", rope_method="linear", rope_decouple=True, rope_positions=positions,
                              rope_max_pe_len_h=4, rope_max_pe_len_w=16, rope_ori_max_pe_len=4)
    freqs, mscale = cfg.rope_table()
    base = rope_freqs(cfg.head_dim, theta=cfg.rope_theta)
    col = 0 if positions == "grid" else 1  # grid: p0 = t % w; official: p1 = t // h spans w
    torch.testing.assert_close(freqs[col], base[col] / 4)
    torch.testing.assert_close(freqs[1 - col], base[1 - col])
    rule = RoPEScaling("linear", 4, decouple=True)
    ref, ref_mscale = rule.table(rule.image_key(4, 16, positions), cfg.head_dim, cfg.rope_theta)
    torch.testing.assert_close(freqs, ref)
    assert mscale == ref_mscale
