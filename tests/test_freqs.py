import math

import pytest
import torch

import nit_kernels as nk


def test_normal_frequencies_formula():
    f = nk.rope_freqs(64)
    d = 32
    expect = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    assert f.shape == (2, 16) and f.dtype == torch.float32
    assert torch.equal(f[0], expect) and torch.equal(f[1], expect)


@pytest.mark.parametrize("method", nk.ROPE_METHODS)
def test_scale_one_is_normal(method):
    f = nk.rope_freqs(72, method=method, scale=1.0, ori_max_pe_len=16)
    assert torch.allclose(f, nk.rope_freqs(72), rtol=1e-6)


def test_linear_divides_by_scale_and_decoupled_axes():
    f = nk.rope_freqs(64, method="linear", scale=(2.0, 4.0))
    base = nk.rope_freqs(64)
    assert torch.allclose(f[0], base[0] / 2) and torch.allclose(f[1], base[1] / 4)
    # scales below 1 never compress positions
    assert torch.equal(nk.rope_freqs(64, method="linear", scale=0.5), base)


def test_ntk_aware_changes_the_base():
    s, d = 3.0, 32
    f = nk.rope_freqs(64, method="ntk-aware", scale=s)
    new_theta = 10000.0 * s ** (d / (d - 2))
    assert torch.allclose(f[0], 1.0 / new_theta ** (torch.arange(0, d, 2).float() / d))
    assert f[0, 0] == 1.0  # the highest frequency is kept
    assert torch.all(f[0, 1:] < nk.rope_freqs(64)[0, 1:])


@pytest.mark.parametrize("method", ["yarn", "ntk-by-parts"])
def test_yarn_family_interpolates_between_extrapolation_and_interpolation(method):
    s = 4.0
    f = nk.rope_freqs(64, method=method, scale=s, ori_max_pe_len=16)[0]
    base = nk.rope_freqs(64)[0]
    assert torch.all(f <= base * (1 + 1e-6)) and torch.all(f >= base / s * (1 - 1e-6))
    assert f[0] == base[0]  # high frequencies extrapolate unchanged
    assert torch.isclose(f[-1], base[-1] / s)  # the lowest ones are interpolated


def test_mscale():
    assert nk.rope_mscale("normal") == 1.0
    assert nk.rope_mscale("yarn", max_pe_len=(32, 16), ori_max_pe_len=16) == pytest.approx(0.1 * math.log(2) + 1)
    assert nk.rope_mscale("yarn", max_pe_len=(8, 8), ori_max_pe_len=16) == 1.0
    assert nk.rope_mscale("ntk-aware-pro1", max_pe_len=(32, 32), ori_max_pe_len=16) == pytest.approx(
        math.sqrt(math.log(64) / math.log(16)))
    with pytest.raises(ValueError, match="max_pe_len"):
        nk.rope_mscale("yarn")


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        nk.rope_freqs(66)
    with pytest.raises(ValueError, match="unknown rope method"):
        nk.rope_freqs(64, method="xpos")
    with pytest.raises(ValueError, match="ori_max_pe_len"):
        nk.rope_freqs(64, method="yarn", scale=2.0)
    with pytest.raises(ValueError, match="pair"):
        nk.rope_freqs(64, scale=(1.0, 2.0, 3.0))
