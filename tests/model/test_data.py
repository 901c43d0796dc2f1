"""Datasets and batching: shapes, image folder (native-resolution rule), latent folders written by a
tiny random AutoencoderDC, patchify/unpatchify and the packed collate."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from nit_kernels import PackedSeqs
from nit_model.data import (SHAPE_CLASSES, ImageFolderDataset, LatentDataset, LatentWriter, PackCollate, PackedBatch,
                            ShapesDataset, collate_packed, load_image, native_resolution, patchify, unpatchify,
                            unpatchify_packed)
from nit_model.packing import PackedBatchSampler, token_lengths


# ---------------------------------------------------------------------------------------------
# shapes

def test_shapes_deterministic_per_index_and_seed():
    a, b = ShapesDataset(50, seed=7), ShapesDataset(50, seed=7)
    for i in (0, 13, 49):
        xa, ya = a[i]
        xb, yb = b[i]
        assert ya == yb and torch.equal(xa, xb)
    assert torch.equal(a[-1][0], a[49][0])
    c = ShapesDataset(50, seed=8)
    assert not np.array_equal(a.sizes(), c.sizes())
    assert any(a[i][0].shape != c[i][0].shape or not torch.equal(a[i][0], c[i][0]) for i in range(5))
    longer = ShapesDataset(5000, seed=7)  # an item does not depend on the dataset's length
    assert np.array_equal(longer.sizes()[:50], a.sizes()) and np.array_equal(longer.labels()[:50], a.labels())
    assert torch.equal(longer[13][0], a[13][0])
    with pytest.raises(IndexError, match="out of range"):
        a[50]


@pytest.mark.parametrize("stride, lo, hi, aspect", [(8, 32, 128, 3.0), (4, 16, 64, 2.0), (16, 40, 200, 1.0), (1, 5, 9, 1.5)])
def test_shapes_sizes_in_range(stride, lo, hi, aspect):
    ds = ShapesDataset(3000, seed=1, min_side=lo, max_side=hi, max_aspect=aspect, stride=stride)
    s = ds.sizes()
    assert s.shape == (3000, 2) and s.dtype == np.int64
    assert (s % stride == 0).all()
    assert s.min() >= lo and s.max() <= hi
    ratio = s.max(1) / s.min(1)
    assert ratio.max() <= aspect + 1e-9
    assert (s[:, 0] > s[:, 1]).any() == (aspect > 1) and (s[:, 0] < s[:, 1]).any() == (aspect > 1)
    # both ends of the side range are reached
    assert s.max() == hi // stride * stride and s.min() == -(-lo // stride) * stride


def test_shapes_rendered_sizes_labels_and_values():
    ds = ShapesDataset(120, seed=3, stride=8)
    sizes, labels = ds.sizes(), ds.labels()
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, *sizes[i])
        assert y == labels[i]
        assert x.min() >= -1 and x.max() <= 1
        assert (x.amax(dim=(1, 2)) - x.amin(dim=(1, 2))).max() > 0.3, "the shape must stand out from the background"


def test_shapes_labels_balanced():
    ds = ShapesDataset(6000, seed=0)
    counts = np.bincount(ds.labels(), minlength=ds.num_classes)
    assert ds.num_classes == len(SHAPE_CLASSES) >= 4
    assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000, counts


def test_shapes_classes_differ():
    """Same size and the same colour/placement draw, different class -> different pixels."""
    from nit_model.data.shapes import render_shape

    imgs = [render_shape(k, 64, 96, np.random.default_rng(11)) for k in SHAPE_CLASSES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 0.01, (SHAPE_CLASSES[i], SHAPE_CLASSES[j])
    with pytest.raises(ValueError, match="unknown shape"):
        render_shape("hexagon", 8, 8, np.random.default_rng(0))


@pytest.mark.parametrize("kind", SHAPE_CLASSES)
def test_shapes_mono_palette_same_geometry(kind):
    """palette="mono": white on black with the geometry the same rng draws give in colour: the
    pixels mono marks as fully inside are exactly the colour image's one foreground colour."""
    from nit_model.data.shapes import render_shape

    for seed in range(4):
        mono = render_shape(kind, 40, 72, np.random.default_rng(seed), palette="mono")
        colour = render_shape(kind, 40, 72, np.random.default_rng(seed), palette="colour")
        assert np.array_equal(mono[0], mono[1]) and np.array_equal(mono[0], mono[2])
        alpha = mono[0]
        inside, outside = alpha == 1.0, alpha == 0.0
        assert inside.sum() > 20 and outside.sum() > 20 and (inside | outside).mean() > 0.75
        fg = colour[:, inside]
        assert np.allclose(fg, fg[:, :1], atol=1e-6), "inside the mono mask the colour image is its foreground"
        assert np.abs(colour[:, outside] - fg[:, :1]).min(axis=0).min() > 0.2, "outside it is the background"


def test_shapes_dataset_palette():
    mono, colour = ShapesDataset(30, seed=4, palette="mono"), ShapesDataset(30, seed=4)
    assert np.array_equal(mono.sizes(), colour.sizes()) and np.array_equal(mono.labels(), colour.labels())
    assert colour.palette == "colour" and "palette='mono'" in repr(mono)
    for i in range(len(mono)):
        x, y = mono[i]
        assert y == colour[i][1] and x.shape == colour[i][0].shape
        assert x.min() == -1 and x.max() == 1 and ((x == -1) | (x == 1)).float().mean() > 0.75
    with pytest.raises(ValueError, match="unknown palette 'sepia'; choose one of colour, mono"):
        ShapesDataset(10, palette="sepia")


def test_shapes_bad_config():
    with pytest.raises(ValueError, match="no multiple of stride"):
        ShapesDataset(10, min_side=33, max_side=39, stride=8)
    with pytest.raises(ValueError, match="max_aspect"):
        ShapesDataset(10, max_aspect=0.5)
    with pytest.raises(ValueError, match="classes"):
        ShapesDataset(10, classes=("circle", "hexagon"))
    ds = ShapesDataset(200, classes=("ring", "cross"))
    assert ds.num_classes == 2 and set(ds.labels().tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------
# image folder

def _png(path, h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode=None).convert(mode).save(path)
    return arr


def test_native_resolution_rule():
    assert native_resolution(100, 70, stride=32) == ((100, 70), (96, 64))
    assert native_resolution(64, 64, stride=32, max_area=64 * 64) == ((64, 64), (64, 64))
    (rh, rw), (H, W) = native_resolution(300, 200, stride=32, max_area=100 * 100)
    assert rh * rw <= 100 * 100 and abs(rh / rw - 1.5) < 0.02 and (rh, rw) == (122, 81) and (H, W) == (96, 64)
    (rh, rw), (H, W) = native_resolution(4000, 3000, stride=32, max_area=2048 * 2048)
    assert rh * rw <= 2048 * 2048 and (H, W) == (2336, 1760)
    with pytest.raises(ValueError, match=r"20x50 image is smaller than one stride \(32 px\)"):
        native_resolution(20, 50, stride=32)
    with pytest.raises(ValueError, match="after capping the area"):
        native_resolution(40, 4000, stride=32, max_area=64 * 64)


def test_image_folder(tmp_path):
    root = tmp_path / "train"
    a = _png(str(root / "cat" / "a.png"), 100, 70, seed=1)
    _png(str(root / "cat" / "sub" / "b.PNG"), 300, 200, seed=2)
    _png(str(root / "dog" / "c.png"), 64, 64, mode="L", seed=3)
    (root / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(root), stride=32, max_area=100 * 100)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    assert ds.labels().tolist() == [0, 0, 1]
    assert ds.sizes().tolist() == [[96, 64], [96, 64], [64, 64]]
    assert ds.native_sizes().tolist() == [[100, 70], [300, 200], [64, 64]]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, *ds.sizes()[i]) and y == ds.labels()[i]
        assert x.min() >= -1 and x.max() <= 1
    # no resize under the cap: the item is the centred crop of the file, exactly
    x, _ = ds[0]
    expected = torch.from_numpy(a[2:98, 3:67].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(x, expected)
    # grey image -> three equal channels
    g, _ = ds[2]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    # without a cap the large image keeps its native size
    ds2 = ImageFolderDataset(str(root), stride=32, max_area=None)
    assert ds2.sizes().tolist()[1] == [288, 192]
    assert tuple(load_image(str(root / "cat" / "sub" / "b.PNG"), stride=32, max_area=None).shape) == (3, 288, 192)


def test_image_folder_too_small_and_skip(tmp_path):
    root = tmp_path / "data"
    _png(str(root / "a" / "ok.png"), 64, 40)
    _png(str(root / "a" / "tiny.png"), 20, 50)
    with pytest.raises(ValueError, match=r"tiny\.png: a 20x50 image is smaller than one stride .*skip_small"):
        ImageFolderDataset(str(root), stride=32)
    ds = ImageFolderDataset(str(root), stride=32, skip_small=True)
    assert len(ds) == 1 and ds.paths[0].endswith("ok.png")
    assert len(ds.skipped) == 1 and ds.skipped[0][0].endswith("tiny.png")


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path / "noimg"))
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):
        ImageFolderDataset(str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------
# latents

def test_latent_writer_reader_round_trip(tmp_path):
    out = str(tmp_path / "lat")
    rng = torch.Generator().manual_seed(0)
    items = {i: (torch.randn(4, 1 + i % 3, 2 + i % 2, generator=rng), i % 5) for i in range(7)}
    with LatentWriter(out, shard_size=3, meta={"vae": "test"}) as w:
        for i in (3, 0, 6, 1, 5, 2, 4):  # written out of order, indexed in order
            w.add(i, items[i][0], items[i][1], f"src/{i}.png")
    assert w.num_shards == 3
    ds = LatentDataset(out)
    assert len(ds) == 7 and ds.channels == 4 and ds.meta["vae"] == "test"
    assert ds.sizes().tolist() == [list(items[i][0].shape[1:]) for i in range(7)]
    assert ds.labels().tolist() == [items[i][1] for i in range(7)]
    for i in range(7):
        z, y = ds[i]
        assert z.dtype == torch.float32 and y == items[i][1] and ds.source_path(i) == f"src/{i}.png"
        assert torch.equal(z, items[i][0].half().float())
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2[5][0], ds[5][0])
    lines = [json.loads(line) for line in open(os.path.join(out, "index.jsonl"))]
    assert [r["index"] for r in lines] == list(range(7))
    assert set(lines[0]) == {"index", "shard", "key", "h", "w", "label", "path"}
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_latent_writer_refuses_to_mix_and_reader_errors(tmp_path):
    out = str(tmp_path / "lat")
    with LatentWriter(out) as w:
        w.add(0, torch.zeros(2, 1, 1), 0)
        with pytest.raises(ValueError, match="added twice"):
            w.add(0, torch.zeros(2, 1, 1), 0)
        with pytest.raises(ValueError, match="channels"):
            w.add(1, torch.zeros(3, 1, 1), 0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        LatentWriter(out)
    with LatentWriter(out, overwrite=True) as w:
        w.add(0, torch.ones(2, 2, 2), 1)
    assert LatentDataset(out)[0][1] == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDataset(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no index.jsonl"):
        LatentDataset(str(tmp_path))
    # an interrupted extraction leaves no index
    with pytest.raises(RuntimeError):
        with LatentWriter(str(tmp_path / "broken"), shard_size=1) as w:
            w.add(0, torch.zeros(1, 1, 1), 0)
            raise RuntimeError("interrupted")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        LatentDataset(str(tmp_path / "broken"))


def _tiny_dcae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(4,) * 6, decoder_block_out_channels=(4,) * 6,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6, scaling_factor=0.41407).eval()


def test_extract_latents_with_tiny_autoencoder_dc(tmp_path):
    from nit_model.extract_latents import encode, extract_latents, main

    vae = _tiny_dcae()
    root = tmp_path / "imgs"
    _png(str(root / "a" / "0.png"), 64, 96, seed=0)
    _png(str(root / "a" / "1.png"), 70, 100, seed=1)   # cropped to 64x96: batched with 0.png
    _png(str(root / "b" / "2.png"), 96, 64, seed=2)
    _png(str(root / "b" / "3.png"), 20, 64, seed=3)    # too small for stride 32
    with pytest.raises(ValueError, match="3.png"):
        extract_latents(str(root), str(tmp_path / "x"), vae=vae, progress=False)
    out = str(tmp_path / "lat")
    summary = extract_latents(str(root), out, vae=vae, skip_small=True, shard_size=2, batch_size=4, progress=False)
    assert summary["items"] == 3 and summary["shards"] == 2 and summary["channels"] == 4
    assert [os.path.basename(p) for p in summary["skipped"]] == ["3.png"]
    ds = LatentDataset(out)
    assert ds.sizes().tolist() == [[2, 3], [2, 3], [3, 2]] and ds.labels().tolist() == [0, 0, 1]
    assert ds.meta["scaling_factor"] == pytest.approx(0.41407) and ds.meta["stride"] == 32
    assert ds.classes == ["a", "b"] and ds.source_path(2) == os.path.join("b", "2.png")
    images = ImageFolderDataset(str(root), stride=32, skip_small=True)
    for i in range(3):
        z, _ = ds[i]
        direct = vae.encode(images[i][0][None]).latent[0] * 0.41407
        assert z.shape == direct.shape == (4, *ds.sizes()[i])
        torch.testing.assert_close(z, direct, atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(encode(vae, images[0][0][None], scaling_factor=2.0, shift_factor=0.5)[0],
                               (vae.encode(images[0][0][None]).latent[0] - 0.5) * 2.0)

    # the command-line entry point, loading the VAE from a diffusers folder
    vae_dir = str(tmp_path / "vae")
    vae.save_pretrained(vae_dir)
    out2 = str(tmp_path / "lat2")
    assert main(["--data", str(root), "--out", out2, "--vae", vae_dir, "--skip-small", "--num-workers", "0",
                 "--latent-dtype", "float32", "--no-progress"]) == 0
    ds2 = LatentDataset(out2)
    assert ds2.meta["vae_class"] == "AutoencoderDC" and ds2.meta["dtype"] == "float32"
    torch.testing.assert_close(ds2[2][0], ds[2][0], atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# patchify / collate

@pytest.mark.parametrize("c, H, W, p", [(3, 8, 12, 2), (32, 3, 5, 1), (4, 16, 8, 4), (1, 4, 4, 4)])
def test_patchify_layout_and_inverse(c, H, W, p):
    img = torch.randn(c, H, W)
    tok = patchify(img, p)
    h, w = H // p, W // p
    assert tok.shape == (h * w, c, p, p)
    for t in (0, w - 1, h * w // 2, h * w - 1):
        r, col = divmod(t, w)
        assert torch.equal(tok[t], img[:, r * p:(r + 1) * p, col * p:(col + 1) * p])
    assert torch.equal(unpatchify(tok, (h, w)), img)
    # a model output [N, C*p*p] viewed as [N, C, p, p] is the official channel-major order
    assert torch.equal(unpatchify(tok.reshape(h * w, -1).view(h * w, c, p, p), (h, w)), img)


def test_patchify_errors():
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        patchify(torch.zeros(3, 5, 4), 2)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        patchify(torch.zeros(1, 3, 4, 4), 2)
    with pytest.raises(ValueError, match="needs 6 tokens"):
        unpatchify(torch.zeros(5, 3, 2, 2), (2, 3))


def test_collate_packed_shapes_and_inverse():
    ds = ShapesDataset(5, seed=2, stride=8)
    items = [ds[i] for i in range(5)]
    batch = PackCollate(8)(items)
    assert isinstance(batch, PackedBatch)
    sizes = ds.sizes() // 8
    assert batch.sizes.dtype == torch.int32 and batch.sizes.tolist() == sizes.tolist()
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == ds.labels().tolist()
    assert batch.x.shape == (int((sizes[:, 0] * sizes[:, 1]).sum()), 3, 8, 8)
    packed = batch.packed()
    assert isinstance(packed, PackedSeqs) and packed.total_tokens == batch.num_tokens and packed.num_seqs == 5
    for (x, _), back in zip(items, batch.images()):
        assert torch.equal(x, back)
    for i, t in enumerate(packed.split(batch.x)):
        assert torch.equal(t, patchify(items[i][0], 8))
    assert torch.equal(unpatchify_packed(batch.x, sizes.tolist())[3], items[3][0])
    with pytest.raises(ValueError, match="empty"):
        collate_packed([], 8)
    with pytest.raises(ValueError, match="channels"):
        collate_packed([(torch.zeros(3, 8, 8), 0), (torch.zeros(4, 8, 8), 1)], 8)


def test_dataloader_with_packed_sampler():
    ds = ShapesDataset(300, seed=4, stride=8, min_side=16, max_side=64)
    lengths = token_lengths(ds.sizes(), 8)
    sampler = PackedBatchSampler.from_dataset(ds, 128, patch_size=8, seed=0, rank=1, world_size=2)
    assert np.array_equal(sampler.packing.lengths, lengths)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=PackCollate(8))
    sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(sampler) > 0
    packs = list(sampler)
    for batch, pack in zip(batches, packs):
        assert batch.num_tokens == int(lengths[pack].sum()) <= 128
        assert batch.labels.tolist() == ds.labels()[pack].tolist()
        assert batch.sizes.tolist() == (ds.sizes()[pack] // 8).tolist()
