"""AiR: the branches and their fusion, the field's units, every loss term on a hand case, and a short run."""
import math

import pytest
import torch
import torch.nn.functional as F

from regbench.blocks.losses import gradient_smoothness, robust_loss
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
    assert (paper["input_size"], paper["patch_sizes"], paper["dim"]) == (64, [8, 16, 32], 128)
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
                "smoothness_weight", "input_size"):
        assert quick[key] == paper[key]  # the quick run keeps every branch and the loss


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
    net, _ = build(air, 2, patch_sizes=[8, 16, 32])
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
def test_the_field_is_in_normalised_units_and_comes_out_in_voxels(air, shape):
    ndim = len(shape)
    net, recipe = build(air, ndim, input_size=32, patch_sizes=[4, 8, 16])
    value = torch.tensor([0.5, -0.25, 0.125][:ndim]).view(1, ndim, *[1] * ndim)
    for index, n in enumerate((8, 4, 2)):
        net.branches[index] = Constant(value.expand(1, ndim, *[n] * ndim))
    u = air.register(net, torch.rand(1, 1, *shape), torch.rand(1, 1, *shape), recipe)
    # [-1, 1] spans the image: 0.5 of a 65-voxel axis is 16 voxels, -0.25 of a 33-voxel axis is -4
    for k, s in enumerate(shape):
        torch.testing.assert_close(u[0, k], torch.full(shape, float(value.flatten()[k]) * (s - 1) / 2))


@pytest.mark.parametrize("shape", [(64, 64), (176, 150), (20, 24, 28)])
def test_untrained_quick_network_is_the_identity_and_the_papers_is_bounded(air, shape):
    ndim = len(shape)
    small = {"input_size": 32, "patch_sizes": [4, 8, 16]} if ndim == 3 else {}
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    net, recipe = build(air, ndim, **small)
    u = air.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape) and u.abs().max() == 0
    # the released code's initialisation: a random field, bounded by tanh to half the image
    net, recipe = build(air, ndim, zero_head=False, **small)
    u = air.register(net, fixed, moving, recipe)
    assert u.abs().max() > 1
    for k, s in enumerate(shape):
        assert u[:, k].abs().max() <= (s - 1) / 2


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


def test_the_loss_is_the_similarity_of_the_warped_image(air):
    net, recipe = build(air, 2, zero_head=False)
    batch = {"fixed": torch.rand(2, 1, 80, 72), "moving": torch.rand(2, 1, 80, 72)}
    terms = air.loss_terms(net, batch, recipe)
    u = air.register(net, batch["fixed"], batch["moving"], recipe)
    expected = robust_loss(batch["fixed"], warp(batch["moving"], u, padding_mode="border"), 0.5, 0.3)
    torch.testing.assert_close(terms["similarity"][1], expected)
    terms["similarity"][1].backward()
    for branch in net.branches:  # every branch and the fusion weights learn from it
        assert branch.embedding.weight.grad.abs().sum() > 0 and branch.positions.grad.abs().sum() > 0
    assert (net.fusion.grad.abs() > 0).all()


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
        build(air, 2, input_size=48)
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


def test_short_training_lowers_the_loss_and_beats_identity(air, small_embedded2d, tmp_path):
    # 150 steps of 16 pairs with the quick network and loss (about 13 s of one core): Dice 0.558 -> 0.607
    recipe = air.recipe("quick", {"iterations": 150, "batch_size": 16, "checkpoint_every": 1000})
    run = short_training(air, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 150
    assert run.trained_loss < run.untrained_loss - 0.01, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)
