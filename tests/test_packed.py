import pytest
import torch

from nit_kernels import PackedSeqs
from nit_kernels.packed import segment_ids, validate_cu_seqlens


def test_from_sizes_metadata():
    p = PackedSeqs.from_sizes([(2, 3), (1, 1), (4, 1)])
    assert p.sizes.dtype == torch.int32 and p.sizes.tolist() == [[2, 3], [1, 1], [4, 1]]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 6, 7, 11]
    assert (p.max_seqlen, p.total_tokens, p.num_seqs) == (6, 11, 3)
    assert p.seg_ids.dtype == torch.int32
    assert p.seg_ids.tolist() == [0] * 6 + [1] + [2] * 4
    assert p.seqlens.tolist() == [6, 1, 4]
    assert len(p) == 3


def test_from_official_hw_list_tensor():
    hw = torch.tensor([[16, 16], [8, 24]], dtype=torch.int64)
    p = PackedSeqs.from_sizes(hw)
    assert p.cu_seqlens.tolist() == [0, 256, 448]
    assert p.sizes.dtype == torch.int32


def test_single_1x1_image_is_valid():
    p = PackedSeqs.from_sizes([(1, 1)])
    assert (p.total_tokens, p.max_seqlen) == (1, 1)


def test_positions_row_major():
    p = PackedSeqs.from_sizes([(2, 3), (3, 2)])
    p0, p1 = p.positions("grid")
    # token t of an h x w image sits at row t // w, column t % w
    assert p0.tolist() == [0, 1, 2, 0, 1, 2] + [0, 1, 0, 1, 0, 1]
    assert p1.tolist() == [0, 0, 0, 1, 1, 1] + [0, 0, 1, 1, 2, 2]


def test_split_and_to():
    p = PackedSeqs.from_sizes([(2, 2), (1, 3)])
    parts = p.split(torch.arange(7))
    assert [t.tolist() for t in parts] == [[0, 1, 2, 3], [4, 5, 6]]
    assert p.to("cpu") is p
    with pytest.raises(ValueError, match="7 rows"):
        p.split(torch.arange(6))


@pytest.mark.parametrize("sizes, match", [
    ([], "at least one image"),
    ([(0, 3)], "positive"),
    ([(2, -1)], "positive"),
    ([(2, 3, 4)], r"\(h, w\) pair"),
    ([(2.5, 3)], "integers"),
    ([(True, 3)], "integers"),
    (torch.zeros(0, 2, dtype=torch.int32), "at least one image"),
    (torch.ones(3, dtype=torch.int32), r"shape \[B, 2\]"),
    (torch.ones(2, 2), "integer tensor"),
    ("abc", r"pair"),
])
def test_from_sizes_rejects_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        PackedSeqs.from_sizes(sizes)


def _direct(sizes, cu, **over):
    s = torch.tensor(sizes, dtype=torch.int32)
    seqlens = [h * w for h, w in sizes]
    kw = dict(max_seqlen=max(seqlens), total_tokens=sum(seqlens), num_seqs=len(sizes))
    kw.update(over)
    return PackedSeqs(sizes=s, cu_seqlens=cu, **kw)


def test_direct_construction_validates_cu_seqlens():
    ok = _direct([(2, 2), (1, 3)], torch.tensor([0, 4, 7], dtype=torch.int32))
    assert ok.total_tokens == 7
    with pytest.raises(ValueError, match="int32"):
        _direct([(2, 2)], torch.tensor([0, 4], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        _direct([(2, 2)], torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        _direct([(2, 2), (1, 3)], torch.tensor([0, 4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="number of tokens 7"):
        _direct([(2, 2), (1, 3)], torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="image 0"):
        _direct([(2, 2), (1, 3)], torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="B\\+1"):
        _direct([(2, 2), (1, 3)], torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="disagree"):
        _direct([(2, 2), (1, 3)], torch.tensor([0, 4, 7], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ValueError, match="1-D"):
        _direct([(2, 2)], torch.tensor([[0, 4]], dtype=torch.int32))


def test_validate_cu_seqlens_allows_empty_sequences():
    validate_cu_seqlens(torch.tensor([0, 3, 3, 5], dtype=torch.int32), 5)
    seg = segment_ids(torch.tensor([0, 3, 3, 5], dtype=torch.int32), 5)
    assert seg.tolist() == [0, 0, 0, 2, 2]
