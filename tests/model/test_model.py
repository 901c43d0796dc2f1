"""NiT model: official names, official-formulation equivalence, packing, conditioning, I/O."""
import os

import pytest
import torch

import nit_kernels as nk
from nit_kernels.testing import assert_close
from nit_model.weights import CheckpointMismatchError, load_model, load_weights, save_weights
from nit_model.model_config import NiTConfig
from nit_model.model import NiT
from nit_model.official import NiTOfficialFormulation

DATA = os.path.join(os.path.dirname(__file__), "..", "data")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


# small configs: one of its own, one at NiT-S width with few blocks
SMALL = dict(in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=7,
             encoder_depth=2, projector_dim=32, z_dim=16)
S_WIDTH = dict(depth=2, encoder_depth=1, projector_dim=64, z_dim=32, num_classes=10)
SQUARE = [(4, 4), (1, 1), (3, 3)]
NON_SQUARE = [(3, 5), (1, 7), (6, 2), (4, 4), (5, 1)]


def small_cfg(**kw):
    return NiTConfig.from_dict({**SMALL, **kw})


def randomize(model, std=0.2, seed=0):
    """Non-zero weights everywhere (the official init zeroes adaLN and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


def inputs(cfg, sizes, seed=1, flat=False):
    g = torch.Generator().manual_seed(seed)
    packed = nk.PackedSeqs.from_sizes(sizes)
    n, b, c, p = packed.total_tokens, packed.num_seqs, cfg.in_channels, cfg.patch_size
    x = torch.randn(n, c * p * p if flat else c, *(() if flat else (p, p)), generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, cfg.num_label_rows, (b,), generator=g)
    return x, t, y, packed


def official_keys():
    out = {}
    for line in open(os.path.join(DATA, "official_nit_s_state_dict.txt")):
        if line.strip() and not line.startswith("#"):
            k, shape = line.rstrip("\n").split("\t")
            out[k] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


# ---------------------------------------------------------------------------------------------- names
def test_nit_s_state_dict_has_the_official_keys_and_shapes():
    model = NiT(NiTConfig.from_name("NiT-S"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = official_keys()
    assert len(ref) == 185
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    fresh = NiT(NiTConfig.from_name("NiT-S"))
    assert fresh.load_state_dict(model.state_dict(), strict=True).missing_keys == []


def test_official_initialisation():
    model = NiT(NiTConfig.from_name("tiny"))
    for blk in model.blocks:
        assert blk.adaLN_modulation[-1].weight.abs().sum() == 0
    fl = model.final_layer
    assert fl.linear.weight.abs().sum() == 0 and fl.adaLN_modulation[-1].weight.abs().sum() == 0
    assert model.blocks[0].attn.qkv.weight.std() > 0 and model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    x, t, y, packed = inputs(model.config, [(2, 3)])
    assert model(x, t, y, packed).abs().sum() == 0  # adaLN-Zero: the untrained model predicts zero


def test_presets():
    sizes = {n: (c.depth, c.hidden_size, c.num_heads) for n in ("NiT-S", "NiT-B", "NiT-L", "NiT-XL", "NiT-XXL")
             for c in [NiTConfig.from_name(n)]}
    assert sizes == {"NiT-S": (12, 384, 6), "NiT-B": (12, 768, 12), "NiT-L": (24, 1024, 16),
                     "NiT-XL": (28, 1152, 16), "NiT-XXL": (40, 1536, 24)}
    assert NiTConfig.from_name("NiT-XL").head_dim == 72
    s = NiTConfig.from_name("nit-s")
    assert (s.in_channels, s.patch_size, s.qk_norm, s.num_label_rows, s.rope_positions) == (32, 1, True, 1001, "grid")
    with pytest.raises(ValueError, match="unknown NiT preset 'NiT-M'"):
        NiTConfig.from_name("NiT-M")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'hiden_size'"):
        NiTConfig.from_dict({"hiden_size": 10})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        NiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="needs rope_max_pe_len_h"):
        NiTConfig(rope_method="yarn")
    assert NiTConfig.from_dict(s.to_dict()) == s


def test_xxl_adaln_lora_shapes():
    cfg = NiTConfig.from_name("NiT-XXL", depth=1, encoder_depth=1, projector_dim=8, num_classes=2)
    sd = {k: tuple(v.shape) for k, v in NiT(cfg).state_dict().items()}
    assert sd["blocks.0.adaLN_modulation.1.weight"] == (512, 1536)
    assert sd["blocks.0.adaLN_modulation.2.weight"] == (6 * 1536, 512)
    assert sd["final_layer.adaLN_modulation.1.weight"] == (2 * 1536, 1536)
    assert set(NiTOfficialFormulation(cfg).state_dict()) == set(sd)


def test_small_lora_model_matches_official_formulation():
    cfg = small_cfg(adaln_lora_dim=8, rope_positions="official")
    ours = randomize(NiT(cfg))
    off = NiTOfficialFormulation(cfg)
    off.load_state_dict(ours.state_dict(), strict=True)
    x, t, y, packed = inputs(cfg, NON_SQUARE)
    assert_close(ours(x, t, y, packed), off(x, t, y, packed.sizes), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("base", [SMALL, {**NiTConfig.from_name("NiT-S").to_dict(), **S_WIDTH}], ids=["small", "S-width"])
@pytest.mark.parametrize("sizes", [SQUARE, NON_SQUARE], ids=["square", "non-square"])
def test_official_rope_reproduces_official_formulation(base, sizes):
    cfg = NiTConfig.from_dict({**base, "rope_positions": "official"})
    ours = randomize(NiT(cfg), std=0.1)
    off = NiTOfficialFormulation(cfg)
    off.load_state_dict(ours.state_dict(), strict=True)
    x, t, y, packed = inputs(cfg, sizes)
    out, zs = ours(x, t, y, packed, return_zs=True)
    ref, ref_zs = off(x, t, y, packed.sizes, return_zs=True)
    scale = ref.abs().max().item()
    assert scale > 0.1
    assert_close(out, ref, atol=2e-5 * scale, rtol=1e-5, name="velocity")
    assert_close(zs[0], ref_zs[0], atol=2e-5 * ref_zs[0].abs().max().item(), rtol=1e-5, name="zs")
    # and the gradients of every parameter
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    ref_grads = dict(off.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("projector"):
            continue
        r = ref_grads[name].grad
        assert_close(p.grad, r, atol=1e-4 * (r.abs().max().item() + 1e-3), rtol=1e-4, name=name)


def test_grid_equals_official_on_square_and_differs_on_non_square():
    grid = randomize(NiT(small_cfg()))
    off = NiT(small_cfg(rope_positions="official"))
    off.load_state_dict(grid.state_dict())
    x, t, y, packed = inputs(grid.config, SQUARE)
    assert torch.equal(grid(x, t, y, packed), off(x, t, y, packed))
    x, t, y, packed = inputs(grid.config, [(3, 5), (2, 6)])
    a, b = grid(x, t, y, packed), off(x, t, y, packed)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


# ---------------------------------------------------------------------------------------------- packing
def test_packed_forward_and_gradients_equal_per_image():
    model = randomize(NiT(small_cfg()))
    x, t, y, packed = inputs(model.config, NON_SQUARE)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    out = model(x, t, y, packed)
    (out * g).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    outs = []
    for i, (xi, gi) in enumerate(zip(packed.split(x), packed.split(g))):
        oi = model(xi, t[i:i + 1], y[i:i + 1], nk.PackedSeqs.from_sizes([packed.size_list[i]]))
        (oi * gi).sum().backward()
        outs.append(oi)
    assert_close(out, torch.cat(outs), atol=1e-5, rtol=1e-5, name="forward")
    for n, p in model.named_parameters():
        if n in packed_grads:
            assert_close(packed_grads[n], p.grad, atol=1e-4 * (p.grad.abs().max().item() + 1e-3), rtol=1e-4, name=n)


def test_conditioning_is_computed_per_image():
    model = randomize(NiT(small_cfg()))
    x, t, y, packed = inputs(model.config, NON_SQUARE)
    rows = []
    hooks = [m.register_forward_hook(lambda mod, args, out: rows.append((args[0].shape[0], out.shape[0])))
             for m in [blk.adaLN_modulation[1] for blk in model.blocks] + [model.final_layer.adaLN_modulation[1],
                                                                            model.t_embedder.mlp[0]]]
    model(x, t, y, packed)
    for h in hooks:
        h.remove()
    b = packed.num_seqs
    assert len(rows) == model.config.depth + 2 and packed.total_tokens > b
    assert all(r == (b, b) for r in rows), rows


def test_hw_list_and_layouts():
    model = randomize(NiT(small_cfg()))
    x, t, y, packed = inputs(model.config, NON_SQUARE)
    ref = model(x, t, y, packed)
    assert ref.shape == x.shape
    hw = torch.tensor(packed.size_list)
    assert torch.equal(model(x, t, y, hw), ref)
    assert torch.equal(model(x, t, y, hw_list=hw), ref)
    flat = model(x.reshape(x.shape[0], -1), t, y, packed)
    assert flat.shape == (x.shape[0], model.config.patch_dim)
    assert torch.equal(flat, ref.reshape(x.shape[0], -1))
    # one time for every image
    assert torch.equal(model(x, torch.tensor(0.3), y, packed), model(x, torch.full_like(t, 0.3), y, packed))


@pytest.mark.parametrize("variant", [dict(gradient_checkpointing=True), dict(selective_recompute=False),
                                     dict(gradient_checkpointing=True, selective_recompute=False)],
                         ids=["checkpointing", "no-selective-recompute", "checkpointing-only"])
def test_recomputation_gives_the_same_gradients(variant):
    plain = randomize(NiT(small_cfg()))
    other = NiT(small_cfg(**variant))
    other.load_state_dict(plain.state_dict())
    x, t, y, packed = inputs(plain.config, NON_SQUARE)
    for m in (plain, other):
        m(x, t, y, packed).square().sum().backward()
    # without selective recomputation the Mlp runs the plain Linear + F.gelu formulation, which
    # rounds differently in fp32 from the fused one (biases outside the matmuls, bias_gelu); the
    # LayerNorm backwards amplify that (measured: each is within 7e-6 of fp64, relative to the
    # largest gradient of the tensor, and they differ by up to 1.4e-5)
    tol = 1e-6 if other.config.selective_recompute else 3e-5
    for (n, a), (_, b) in zip(plain.named_parameters(), other.named_parameters()):
        if a.grad is not None:
            assert_close(b.grad, a.grad, atol=tol * (a.grad.abs().max().item() + 1e-3), rtol=1e-6, name=n)


def test_recomputed_gelu_gives_the_same_values_and_gradients():
    from nit_model.model import Mlp
    torch.manual_seed(0)
    plain, recomputed = Mlp(16, 64, recompute_gelu=False), Mlp(16, 64, recompute_gelu=True)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(10, 16, requires_grad=True)
    g = torch.randn(10, 16)
    outs, grads = [], []
    for m in (plain, recomputed):
        out = m(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [x, *m.parameters()], g))
    # the recomputing path applies the biases outside the matmuls and evaluates the GELU with
    # its own exp: the same values to fp32 rounding, not bit for bit
    assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5, name="out")
    for name, a, b in zip(["x", "fc1.w", "fc1.b", "fc2.w", "fc2.b"], *grads):
        assert_close(b, a, atol=1e-6, rtol=1e-5, name=name)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors():
    model = NiT(small_cfg())
    x, t, y, packed = inputs(model.config, [(2, 3), (1, 2)])
    cases = [
        (x[:, :3], r"x must have shape \[N, 4, 2, 2\] or \[N, 16\]"),
        (x[:-1], "x has 7 tokens but the pack holds 8"),
    ]
    for bad_x, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(bad_x, t, y, packed)
    with pytest.raises(ValueError, match=r"t must be a float tensor \[B=2\]"):
        model(x, t[:1], y, packed)
    with pytest.raises(ValueError, match=r"y must be an integer tensor \[B=2\]"):
        model(x, t, torch.tensor([1, 2, 3]), packed)
    with pytest.raises(ValueError, match=r"y must be an integer tensor"):
        model(x, t, y.float(), packed)
    with pytest.raises(ValueError, match=r"class id 8 is out of range \[0, 7\] \(7 is the null class\)"):
        model(x, t, torch.tensor([0, 8]), packed)
    with pytest.raises(ValueError, match=r"class id -1 is out of range"):
        model(x, t, torch.tensor([-1, 0]), packed)
    with pytest.raises(ValueError, match="image sizes must be positive"):
        model(x, t, y, torch.tensor([[2, 3], [0, 2]]))
    with pytest.raises(TypeError, match="packed must be a PackedSeqs or an int hw_list"):
        model(x, t, y, "2x3")


# ---------------------------------------------------------------------------------------------- checkpoints
def test_safetensors_round_trip_and_config_metadata(tmp_path):
    model = randomize(NiT(small_cfg(rope_positions="official")))
    path = save_weights(model, tmp_path / "w.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # the temporary file was renamed
    loaded = load_model(path)
    assert loaded.config == model.config
    x, t, y, packed = inputs(model.config, NON_SQUARE)
    assert torch.equal(loaded(x, t, y, packed), model(x, t, y, packed))
    with pytest.raises(ValueError, match="ending in .safetensors"):
        save_weights(model, tmp_path / "w.pt")


def test_pt_checkpoints_with_wrappers(tmp_path):
    model = randomize(NiT(small_cfg()))
    other = randomize(NiT(small_cfg()), seed=3)
    ddp = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": other.state_dict(), "ema": ddp, "steps": 10}, tmp_path / "ckpt.pt")
    fresh = load_weights(NiT(small_cfg()), tmp_path / "ckpt.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    fresh = load_weights(NiT(small_cfg()), tmp_path / "ckpt.pt", prefer=("model",))
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)


def test_official_checkpoint_without_metadata_gets_an_inferred_config(tmp_path):
    from safetensors.torch import save_file
    cfg = small_cfg(num_classes=9, rope_positions="official", encoder_depth=3)
    model = randomize(NiT(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "official.safetensors")
    loaded = load_model(tmp_path / "official.safetensors", encoder_depth=3)
    for f in ("hidden_size", "depth", "num_heads", "in_channels", "patch_size", "num_classes", "z_dim",
              "projector_dim", "rope_positions", "adaln_lora_dim", "encoder_depth"):
        assert getattr(loaded.config, f) == getattr(cfg, f), f
    x, t, y, packed = inputs(cfg, NON_SQUARE)
    assert torch.equal(loaded(x, t, y, packed), model(x, t, y, packed))


class _Payload:
    pass


def test_pt_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"model": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_weights(NiT(small_cfg()), tmp_path / "evil.pt")


def test_checkpoint_of_another_config_fails_clearly(tmp_path):
    tiny = NiT(NiTConfig.from_name("tiny"))
    path = save_weights(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(NiT(NiTConfig.from_name("NiT-S")), path)
    msg = str(e.value)
    assert "missing key(s): blocks.4.attn.qkv.weight" in msg
    assert "mis-shaped key(s): x_embedder.proj.weight (checkpoint (128, 3, 4, 4), model (384, 32, 1, 1))" in msg
    assert "looks like hidden_size=128, in_channels=3, patch_size=4, depth=4" in msg
