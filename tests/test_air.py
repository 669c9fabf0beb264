"""AiR: the branches and their fusion, native-resolution tiles and their blending, the field's units, the
sampler, every loss term on a hand case, and a short run."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from regbench.blocks.losses import gradient_smoothness, mse, robust_loss
from regbench.blocks.patches import blend, output_corners, stitch, tile_window
from regbench.method import TRAINING_KEYS, parameter_count
from regbench.plugins import load_method
from regbench.blocks.spatial import warp
from short_training import short_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def air():
    return load_method("air")


@pytest.fixture(scope="module")
def module(air):
    import sys

    return sys.modules[type(air).__module__]


def build(method, ndim, which="quick", **overrides):
    torch.manual_seed(0)
    recipe = method.recipe(which, overrides)
    return method.build(ndim, recipe), recipe


class Constant(torch.nn.Module):
    """Stands in for a branch: returns a given coarse field whatever the images."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, memory_image, query_image):
        return self.value.expand(memory_image.shape[0], *self.value.shape[1:])


def test_recipes_hold_the_released_codes_numbers(air):
    paper, quick = air.recipe("paper"), air.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    assert (paper["tile_size"], paper["patch_sizes"], paper["dim"]) == (64, [8, 16, 32], 128)
    assert (paper["tile_stride"], paper["padding_mode"]) == (32, "zeros")
    assert paper["heads"] == [128, 64, 32]
    assert (paper["feedforward"], paper["depth"], paper["fusion_weights"]) == (2048, 1, [0.7, 0.2])
    assert (paper["query_image"], paper["similarity"]) == ("fixed", "robust")
    assert (paper["robust_alpha"], paper["robust_scale"]) == (0.5, 0.3)
    assert (paper["smoothness_weight"], paper["zero_head"]) == (0.0, False)
    assert (paper["lr"], paper["batch_size"], paper["iterations"]) == (1e-4, 1, 10_000)
    (stage,) = air.training_stages(torch.nn.Linear(1, 1), paper)  # StepLR(200, 0.5)
    assert stage.lr_decay == (list(range(200, 10_000, 200)), 0.5)
    assert air.training_stages(torch.nn.Linear(1, 1), quick)[0].lr_decay is None
    for key in ("patch_sizes", "fusion_weights", "query_image", "depth", "similarity", "robust_alpha", "robust_scale",
                "smoothness_weight", "tile_size", "tile_stride", "padding_mode"):
        assert quick[key] == paper[key]  # the quick run keeps every branch, the geometry and the loss


def test_the_deviations_name_the_tiles_the_unverified_loss_and_the_quick_only_changes(air):
    paper = " ".join(d.what for d in air.departures("paper"))
    quick = " ".join(d.what for d in air.departures("quick"))
    for words in ("query", "overlapping 64-voxel tiles", "Training tiles", "RobustLOSS", "pre-alignment", "[-1, 1]", "3D"):
        assert words in paper and words in quick
    assert "zero_head" in quick and "learning rate" in quick
    assert "zero_head" not in paper and "learning rate" not in paper
    options = [d.what for d in air.deviations if not d.recipes]
    assert len(options) == 3 and all(any(k in w for w in options) for k in ("'mse'", "'ncc'", "smoothness_weight"))


def test_the_paper_network_has_the_codes_layers(air):
    net, _ = build(air, 2, "paper")
    D, FF = 128, 2048
    attention, norm = 4 * D * D + 4 * D, 2 * D
    encoder = attention + (D * FF + FF) + (FF * D + D) + 2 * norm
    decoder = 2 * attention + (D * FF + FF) + (FF * D + D) + 3 * norm
    expected = 2  # the fusion weights w1, w2
    for branch, p, heads in zip(net.branches, (8, 16, 32), (128, 64, 32)):
        tokens = (64 // p) ** 2
        assert branch.positions.shape == (1, tokens, D)
        assert branch.encoder.layers[0].self_attn.num_heads == heads
        assert branch.decoder.layers[0].multihead_attn.num_heads == heads
        assert not branch.encoder.layers[0].norm_first and branch.encoder.layers[0].dropout.p == 0
        expected += (p * p * D + D) + tokens * D + encoder + decoder + (D * 2 + 2)
    assert parameter_count(net) == expected == 3_941_000


def test_patches_are_the_images_blocks_in_array_order(air):
    net, _ = build(air, 2, dim=64, heads=[8, 4, 2])
    branch = net.branches[0]
    image = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)
    with torch.no_grad():
        branch.embedding.weight.copy_(torch.eye(64)[: branch.embedding.out_features])  # token = its patch
        branch.embedding.bias.zero_()
        branch.positions.zero_()
    tokens = branch.tokens(image)
    assert tokens.shape == (1, 64, 64)
    # token 9 is patch (1, 1): rows 8..15, columns 8..15, flattened row by row
    torch.testing.assert_close(tokens[0, 9], image[0, 0, 8:16, 8:16].reshape(-1))


def test_the_moving_image_feeds_the_encoder_by_default_and_the_fixed_one_with_the_papers_wording(air):
    fixed, moving = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
    for query_image, memory in (("fixed", moving), ("moving", fixed)):
        net, recipe = build(air, 2, query_image=query_image)
        seen = {}
        branch = net.branches[1]
        branch.encoder.register_forward_pre_hook(lambda mod, args: seen.update(memory=args[0]))
        branch.decoder.register_forward_pre_hook(lambda mod, args: seen.update(query=args[0]))
        net(fixed, moving)
        query = fixed if memory is moving else moving
        torch.testing.assert_close(seen["memory"], branch.tokens(memory))
        torch.testing.assert_close(seen["query"], branch.tokens(query))


def test_cubic_resize_is_pytorchs_bicubic_and_catmull_rom_interpolates(module):
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    for align_corners in (False, True):
        for size in [(8, 10), (16, 20), (3, 7)]:
            torch.testing.assert_close(module.cubic_resize(x, size, a=-0.75, align_corners=align_corners),
                                       F.interpolate(x, size=size, mode="bicubic", align_corners=align_corners))
    # Catmull-Rom on corner-aligned samples passes through the control values and keeps constants
    fine = module.cubic_resize(x, (7, 13), a=-0.5, align_corners=True)
    torch.testing.assert_close(fine[..., ::2, ::3], x)
    torch.testing.assert_close(module.cubic_resize(torch.full((1, 1, 3, 3, 3), 0.7), (9, 5, 11)),
                               torch.full((1, 1, 9, 5, 11), 0.7))
    # the matrix is the kernel at the tap distances: midway between samples, (-1, 9, 9, -1) / 16
    weights = module.cubic_weights(7, 4, a=-0.5, align_corners=True)
    torch.testing.assert_close(weights[3], torch.tensor([-1.0, 9, 9, -1]) / 16)


def test_the_branches_are_fused_with_weights_0_7_0_2_0_1_after_bicubic_upsampling(air):
    net, recipe = build(air, 2)
    generator = torch.Generator().manual_seed(0)
    fields = [torch.rand(1, 2, n, n, generator=generator) * 2 - 1 for n in (8, 4, 2)]
    for index, field in enumerate(fields):
        net.branches[index] = Constant(field)
    out = net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64))
    up = [fields[0]] + [F.interpolate(v, scale_factor=k, mode="bicubic") for v, k in zip(fields[1:], (2, 4))]
    torch.testing.assert_close(out.control, 0.7 * up[0] + 0.2 * up[1] + 0.1 * up[2])
    # the weights are learned
    assert net.fusion.requires_grad and net.fusion.tolist() == pytest.approx([0.7, 0.2])


@pytest.mark.parametrize("shape", [(65, 33), (33, 17, 9)])
def test_the_field_is_in_normalised_units_of_the_tile_and_comes_out_in_voxels(air, shape):
    ndim = len(shape)
    net, recipe = build(air, ndim, tile_size=32, tile_stride=16, patch_sizes=[4, 8, 16])
    value = torch.tensor([0.5, -0.25, 0.125][:ndim]).view(1, ndim, *[1] * ndim)
    for index, n in enumerate((8, 4, 2)):
        net.branches[index] = Constant(value.expand(1, ndim, *[n] * ndim))
    u = air.register(net, torch.rand(1, 1, *shape), torch.rand(1, 1, *shape), recipe)
    # [-1, 1] spans a 32-voxel tile whatever the image's size: 0.5 is 7.75 voxels, -0.25 is -3.875
    for k in range(ndim):
        torch.testing.assert_close(u[0, k], torch.full(shape, float(value.flatten()[k]) * 31 / 2))


@pytest.mark.parametrize("shape", [(64, 64), (176, 150), (20, 24, 28)])
def test_untrained_quick_network_is_the_identity_and_the_papers_is_bounded(air, shape):
    ndim = len(shape)
    small = {"tile_size": 32, "patch_sizes": [4, 8, 16]} if ndim == 3 else {}
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    net, recipe = build(air, ndim, **small)
    u = air.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape) and u.abs().max() == 0
    # the released code's initialisation: a random field, bounded by tanh to half a tile
    net, recipe = build(air, ndim, zero_head=False, **small)
    u = air.register(net, fixed, moving, recipe)
    assert u.abs().max() > 1 and u.abs().max() <= (net.tile_size - 1) / 2


class TileNet(torch.nn.Module):
    """Stands in for the network: takes only tiles, records them, returns ``field(fixed, moving)`` in voxels."""

    def __init__(self, tile_size, field):
        super().__init__()
        self.tile_size, self.field, self.seen = tile_size, field, []

    def forward(self, fixed, moving):
        assert fixed.shape[2:] == moving.shape[2:] == (self.tile_size,) * (fixed.ndim - 2), fixed.shape
        self.seen.append((fixed, moving))
        return SimpleNamespace(displacement=self.field(fixed, moving))


def test_whole_images_are_registered_from_native_resolution_64_voxel_tiles_32_apart(air, module):
    recipe = air.recipe("quick")
    fixed, moving = torch.rand(2, 1, 176, 150), torch.rand(2, 1, 176, 150)
    net = TileNet(64, lambda f, m: torch.zeros(f.shape[0], 2, 64, 64))
    air.register(net, fixed, moving, recipe)
    corners = [(r, c) for r in (0, 32, 64, 96, 112) for c in (0, 32, 64, 86)]
    assert output_corners((176, 150), 64, 32) == corners
    tiles_fixed = torch.cat([f for f, _ in net.seen])
    tiles_moving = torch.cat([m for _, m in net.seen])
    assert len(tiles_fixed) == 2 * len(corners)  # both pairs, every tile, cut at the image's own resolution
    for index, (b, (r, c)) in enumerate((b, corner) for b in range(2) for corner in corners):
        torch.testing.assert_close(tiles_fixed[index], fixed[b, :, r:r + 64, c:c + 64], rtol=0, atol=0)
        torch.testing.assert_close(tiles_moving[index], moving[b, :, r:r + 64, c:c + 64], rtol=0, atol=0)
    # an axis shorter than a tile is padded with 0 at its end
    net.seen.clear()
    small = torch.rand(1, 1, 40, 70)
    assert air.register(net, small, small, recipe).shape == (1, 2, 40, 70)
    (tiles, _), = net.seen  # corners (0, 0) and (0, 6)
    torch.testing.assert_close(tiles[1, :, :40], small[0, :, :, 6:], rtol=0, atol=0)
    assert tiles.shape == (2, 1, 64, 64) and tiles[:, :, 40:].abs().max() == 0
    with pytest.raises(ValueError, match="64x64 tiles"):
        module.AiRNet(2, 64, dim=16, heads=[2, 2, 2], feedforward=16)(small, small)


def test_a_tiles_field_interpolates_one_control_value_an_8_voxel_block_on_the_codes_9_voxel_lattice(air):
    net, recipe = build(air, 2)
    assert (net.tile_size, net.branches[0].patch, net.branches[0].grid) == (64, 8, (8, 8))  # 8 x 8 blocks of 8^2
    generator = torch.Generator().manual_seed(0)
    control = torch.rand(1, 2, 8, 8, generator=generator) * 2 - 1
    net.branches[0] = Constant(control)
    net.branches[1], net.branches[2] = Constant(torch.zeros(1, 2, 4, 4)), Constant(torch.zeros(1, 2, 2, 2))
    with torch.no_grad():
        net.fusion.copy_(torch.tensor([1.0, 0.0]))
    # one control value a block; the corner-aligned Catmull-Rom puts them 63 / 7 = 9 voxels apart in a tile
    lattice = [9 * i for i in range(8)]
    u = air.register(net, torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64), recipe)
    torch.testing.assert_close(u[0][:, lattice][:, :, lattice], control[0] * 31.5)
    assert not torch.allclose(u[0, :, 4, 0], control[0, :, 0, 0] * 31.5)  # in between, interpolated
    # a 176 x 176 image: each tile keeps that lattice at the image's resolution, voxel for voxel; where one tile
    # alone covers the image (its outer quarter at the borders) the field is that tile's
    u = air.register(net, torch.rand(1, 1, 176, 176), torch.rand(1, 1, 176, 176), recipe)
    near, far = [0, 9, 18, 27], [112 + 54, 112 + 63]   # first tile at 0, last at 112
    torch.testing.assert_close(u[0][:, near][:, :, near], control[0, :, :4, :4] * 31.5)
    torch.testing.assert_close(u[0][:, far][:, :, far], control[0, :, 6:, 6:] * 31.5)
    torch.testing.assert_close(u[0][:, far][:, :, near], control[0, :, 6:, :4] * 31.5)


def test_the_whole_image_field_passes_from_tile_to_tile_without_a_step(air):
    # each tile returns a constant: 10 x the mean of its fixed tile; on a ramp neighbouring tiles differ by ~1.8
    recipe = air.recipe("quick")
    ramp = torch.arange(176.0).view(1, 1, 176, 1).expand(1, 1, 176, 150) / 175
    net = TileNet(64, lambda f, m: 10 * f.mean((1, 2, 3), keepdim=True).expand(f.shape[0], 2, 64, 64))
    u = air.register(net, ramp, ramp, recipe)[0, 0]
    tile_values = sorted({round(10 * (r + 31.5) / 175, 6) for r in (0, 32, 64, 96, 112)})
    assert u[0].tolist() == pytest.approx([tile_values[0]] * 150) and u[-1, 0].item() == pytest.approx(tile_values[-1])
    largest_step = (u[1:] - u[:-1]).abs().max().item()
    # averaging the tiles as they are (regbench.blocks.patches.stitch) leaves a step where each tile ends
    tiles = torch.cat([10 * ramp[:, :, r:r + 64, c:c + 64].mean().expand(1, 1, 64, 64)
                       for r, c in output_corners((176, 150), 64, 32)])
    averaged = stitch(tiles, output_corners((176, 150), 64, 32), (176, 150))[0, 0]
    assert (averaged[1:] - averaged[:-1]).abs().max().item() > 0.5
    assert largest_step < 0.15, largest_step
    assert (u[:, 1:] - u[:, :-1]).abs().max().item() < 1e-5  # constant along the other axis
    # tiles a forward pass change nothing but memory
    torch.testing.assert_close(air.register(net, ramp, ramp, {**recipe, "tiles_per_pass": 3})[0, 0], u)


def test_the_tile_window_is_a_raised_cosine_flat_at_the_image_border():
    t = torch.arange(8.0)
    raised = torch.sin(math.pi * (t + 1) / 9) ** 2
    torch.testing.assert_close(tile_window((4,), 8, (20,)), raised)           # inner tile
    first = tile_window((0,), 8, (20,))
    torch.testing.assert_close(first[:4], torch.ones(4))                     # flat toward the border
    torch.testing.assert_close(first[4:], raised[4:])
    torch.testing.assert_close(tile_window((12,), 8, (20,)), first.flip(0))  # flush with the far border
    torch.testing.assert_close(tile_window((0, 4), 8, (8, 20)), torch.ones(8, 1) * raised)
    assert tile_window((4,), 8, (20,)).min() > 0
    # weights are normalised: tiles of one value blend to that value
    corners = output_corners((20, 13), 8, 4)
    torch.testing.assert_close(blend(torch.full((len(corners), 2, 8, 8), 0.3), corners, (20, 13)),
                               torch.full((1, 2, 20, 13), 0.3))
    with pytest.raises(ValueError, match="inside the grid"):
        blend(torch.zeros(1, 1, 8, 8), [(0, 10)], (20, 13))


def hand_batch(shape=(64, 64)):
    """fixed 0, moving 0.3 on the left half and 0 on the right: residual 0.3 on half the pixels."""
    fixed = torch.zeros(2, 1, *shape)
    moving = torch.zeros(2, 1, *shape)
    moving[..., : shape[-1] // 2] = 0.3
    return {"fixed": fixed, "moving": moving}


def test_robust_loss_has_the_hand_values():
    fixed, moved = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.3)
    # alpha 0.5, c 0.3, r = c: 3 [(1 / 1.5 + 1)^(1/4) - 1]
    assert robust_loss(fixed, moved).item() == pytest.approx(3 * ((5 / 3) ** 0.25 - 1), rel=1e-6)
    assert robust_loss(fixed, moved, alpha=2.0, scale=0.15).item() == pytest.approx(0.5 * 4.0)
    assert robust_loss(fixed, moved, alpha=0.0, scale=0.3).item() == pytest.approx(math.log(1.5))
    assert robust_loss(fixed, fixed).item() == 0.0
    # quadratic for small residuals: rho(r) ~ (r / c)^2 / 2
    assert robust_loss(fixed, moved * 1e-3).item() == pytest.approx(0.5 * 1e-6, rel=1e-3)
    with pytest.raises(ValueError, match="scale"):
        robust_loss(fixed, moved, scale=0.0)


@pytest.mark.parametrize("similarity, expected", [
    ("robust", 0.5 * 3 * ((5 / 3) ** 0.25 - 1)),   # half the pixels at r = c
    ("mse", 0.5 * 0.09),
])
def test_the_similarity_term_on_the_hand_case(air, similarity, expected):
    net, recipe = build(air, 2, similarity=similarity)  # the untrained quick network is the identity
    terms = air.loss_terms(net, hand_batch(), recipe)
    assert set(terms) == {"similarity"} and terms["similarity"][0] == 1.0
    assert terms["similarity"][1].item() == pytest.approx(expected, rel=1e-5)


def test_the_ncc_similarity_on_the_hand_case(air):
    # columns cycling (1, 2, 3, 4) against (1, 3, 2, 4): CC = 4 / 5
    net, recipe = build(air, 2, similarity="ncc")
    fixed = torch.tensor([1.0, 2, 3, 4]).repeat(16).expand(1, 1, 64, 64).contiguous()
    moving = torch.tensor([1.0, 3, 2, 4]).repeat(16).expand(1, 1, 64, 64).contiguous()
    terms = air.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert terms["similarity"][1].item() == pytest.approx(-0.8, rel=1e-5)


def test_training_scores_one_native_tile_a_pair_from_the_registration_tiles_at_one_corner_in_both_images(air):
    net, recipe = build(air, 2, zero_head=False)
    seen = {}
    net.register_forward_hook(lambda mod, args, out: seen.update(fixed=args[0], moving=args[1], u=out.displacement))
    batch = {"fixed": torch.rand(3, 1, 100, 50), "moving": torch.rand(3, 1, 100, 50)}
    torch.manual_seed(1)
    terms = air.loss_terms(net, batch, recipe)
    torch.manual_seed(1)
    lattice = output_corners((100, 64), 64, 32)  # the 50-voxel axis padded with 0 to a tile: rows 0, 32, 36
    assert lattice == [(0, 0), (32, 0), (36, 0)]
    corners = [lattice[i] for i in torch.randint(3, (3,)).tolist()]
    assert seen["fixed"].shape == seen["moving"].shape == (3, 1, 64, 64)
    for b, (r, c) in enumerate(corners):
        torch.testing.assert_close(seen["fixed"][b, :, :, :50], batch["fixed"][b, :, r:r + 64], rtol=0, atol=0)
        torch.testing.assert_close(seen["moving"][b, :, :, :50], batch["moving"][b, :, r:r + 64], rtol=0, atol=0)
        assert seen["fixed"][b, :, :, 50:].abs().max() == 0
    # the similarity of the warped tile alone (0 outside it, as the code's sampler)
    expected = robust_loss(seen["fixed"], warp(seen["moving"], seen["u"], padding_mode="zeros"), 0.5, 0.3)
    torch.testing.assert_close(terms["similarity"][1], expected)
    terms["similarity"][1].backward()
    for branch in net.branches:  # every branch and the fusion weights learn from it
        assert branch.embedding.weight.grad.abs().sum() > 0 and branch.positions.grad.abs().sum() > 0
    assert (net.fusion.grad.abs() > 0).all()


def test_the_sampler_reads_0_outside_the_tile_not_its_border(air):
    # every branch says 0.5 along axis 0: 15.75 voxels of a 64-voxel tile; rows 49..63 sample past the last row
    # (0), row 48 a quarter voxel before it (0.25, the rest of the way to 0); with the border continued all read 1
    net, recipe = build(air, 2, similarity="mse")
    for index, n in enumerate((8, 4, 2)):
        value = torch.zeros(1, 2, n, n)
        value[:, 0] = 0.5
        net.branches[index] = Constant(value)
    ones = torch.ones(1, 1, 64, 64)
    terms = air.loss_terms(net, {"fixed": ones, "moving": ones}, recipe)
    assert terms["similarity"][1].item() == pytest.approx((0.75 ** 2 + 15) / 64, rel=1e-5)
    u = net(ones, ones).displacement
    assert mse(ones, warp(ones, u, padding_mode="border")).item() == pytest.approx(0, abs=1e-10)


def test_the_smoothness_term_is_grad_of_the_fused_control_grid(air):
    s = 0.1
    ramp = torch.zeros(1, 2, 8, 8)
    ramp[0, 0] = s * torch.arange(8.0).view(8, 1)  # channel 0 grows by s a grid step along axis 0
    for weight in (0.0, 0.5):
        net, recipe = build(air, 2, smoothness_weight=weight)
        net.branches[0] = Constant(ramp)
        net.branches[1], net.branches[2] = Constant(torch.zeros(1, 2, 4, 4)), Constant(torch.zeros(1, 2, 2, 2))
        with torch.no_grad():
            net.fusion.copy_(torch.tensor([1.0, 0.0]))
        terms = air.loss_terms(net, hand_batch(), recipe)
        if weight == 0:
            assert set(terms) == {"similarity"}  # the code's default path: no regulariser
            continue
        # differences: s on channel 0 along axis 0, 0 elsewhere; mean over channels s^2 / 2, over axes / 2
        assert terms["smoothness"][0] == 0.5
        assert terms["smoothness"][1].item() == pytest.approx(s * s / 4)
        assert gradient_smoothness(ramp).item() == pytest.approx(s * s / 4)


def test_the_smoothness_term_changes_the_gradient_when_weighted(air):
    batch = {"fixed": torch.rand(1, 1, 64, 64), "moving": torch.rand(1, 1, 64, 64)}

    def gradient(weight):
        net, recipe = build(air, 2, zero_head=False, smoothness_weight=weight)
        terms = air.loss_terms(net, batch, recipe)
        sum(w * v for w, v in terms.values()).backward()
        return net.branches[0].head.weight.grad.clone()

    assert not torch.allclose(gradient(0.0), gradient(1.0))


def test_bad_input_is_refused_with_a_clear_error(air):
    with pytest.raises(ValueError, match="multiple of every patch size"):
        build(air, 2, tile_size=48)
    with pytest.raises(ValueError, match="divisible"):
        build(air, 2, heads=[8, 4, 3])
    with pytest.raises(ValueError, match="query_image"):
        build(air, 2, query_image="both")
    with pytest.raises(ValueError, match="one head count per patch size"):
        build(air, 2, heads=[8, 4])
    net, recipe = build(air, 2, similarity="lncc")
    with pytest.raises(ValueError, match="similarity"):
        air.loss_terms(net, hand_batch(), recipe)
    net, recipe = build(air, 2)
    with pytest.raises(ValueError, match="B x 1 x"):
        net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 60))
    with pytest.raises(ValueError, match="64x64 tiles"):
        net(torch.rand(1, 1, 80, 64), torch.rand(1, 1, 80, 64))


def test_short_training_lowers_the_loss_and_beats_identity(air, small_embedded2d, tmp_path):
    # the quick network, 1000 steps of 16 tiles (about 35 s of one core): it leaves the identity after some 500
    recipe = air.recipe("quick", {"iterations": 1000, "checkpoint_every": 1000})
    run = short_training(air, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 1000
    assert run.trained_loss < run.untrained_loss - 0.01, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)
