"""Huang et al.'s coarse-to-fine multi-contrast framework: the second contrast, each loss term by hand,
the two training stages, every recipe term in the loss, and a short training across contrasts."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from regbench.blocks.affine import affine_displacement, centred_grid
from regbench.blocks.losses import (background_suppression_loss, dual_consistency_loss, mutual_information,
                                    mutual_information_loss, neighbour_smoothness, self_sampled_inverse)
from regbench.blocks.spatial import warp
from regbench.data.prepared import PreparedDataset
from regbench.method import TRAINING_KEYS
from regbench.plugins import load_dataset, load_method
from regbench.training.loop import load_trained, train
from short_training import short_training

torch.set_num_threads(1)

AFFINE_STEPS, DEFORMABLE_STEPS = 20, 250   # the quick recipe: 150 and 750


@pytest.fixture(scope="module")
def ctf():
    return load_method("ctf_multicontrast")


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", overrides)
    return method.build(ndim, recipe), recipe


def translation(shape, vector):
    ndim = len(shape)
    return torch.tensor(vector, dtype=torch.float32).view(1, ndim, *([1] * ndim)).expand(1, ndim, *shape).clone()


# --- recipes


def test_recipes_hold_the_codes_numbers(ctf):
    paper, quick = ctf.recipe("paper"), ctf.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    assert (paper["mi_weight"], paper["background_weight"], paper["dual_weight"], paper["smoothness_weight"]) == (
        4.0, 100.0, 100.0, 1.0)
    assert (paper["affine_mi_weight"], paper["affine_background_weight"], paper["threshold"]) == (1.0, 1.0, 0.1)
    assert (paper["bins"], paper["sigma_ratio"], paper["negative_slope"], paper["dropout"]) == (100, 1.0, 0.3, 0.3)
    assert (paper["affine_width"], paper["affine_pool"], paper["affine_dense"], paper["width"]) == (16, 7, 32, 32)
    assert (paper["affine_lr"], paper["lr"], paper["batch_size"], paper["augment"]) == (1e-4, 1e-2, 32, True)
    assert (paper["flow_init"], paper["bn_momentum"], paper["padding_mode"]) == ("he_normal", 0.01, "border")
    # the quick recipe keeps every loss weight and the threshold
    for key in ("mi_weight", "background_weight", "dual_weight", "smoothness_weight", "affine_mi_weight",
                "affine_background_weight", "threshold", "sigma_ratio"):
        assert quick[key] == paper[key], key
    assert ctf.moving_contrast == "t2"


def test_initialisation_follows_the_code_or_the_recipe(ctf):
    torch.manual_seed(0)
    paper = ctf.build(2, ctf.recipe("paper", {"width": 8}))
    flow = paper.deformable.flow.weight                      # He-normal over fan_in = 8 x 3 x 3
    assert flow.std().item() == pytest.approx(math.sqrt(2 / 72), rel=0.2)
    norms = [m for m in paper.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all((m.momentum, m.eps) == (0.01, 1e-3) for m in norms)
    assert all(m.negative_slope == 0.3 for m in paper.modules() if isinstance(m, torch.nn.LeakyReLU))
    quick, _ = build(ctf, 2)
    assert quick.deformable.flow.weight.std().item() == pytest.approx(1e-5, rel=0.2)
    with pytest.raises(ValueError, match="flow_init"):
        ctf.build(2, ctf.recipe("quick", {"flow_init": "zeros"}))


# --- the loss terms, by hand


def test_mutual_information_by_hand():
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4] = 1.0
    sharp = dict(sigma_ratio=0.1)  # Parzen windows much narrower than a bin: a plain histogram
    assert mutual_information(x, x, **sharp).item() == pytest.approx(math.log(2), rel=1e-5)
    assert mutual_information(x, 1 - x, **sharp).item() == pytest.approx(math.log(2), rel=1e-5)
    assert abs(mutual_information(x, torch.full_like(x, 0.3)).item()) < 1e-4
    # a monotone remapping keeps nearly all of it; noise almost none
    torch.manual_seed(0)
    image = torch.rand(2, 1, 64, 64)
    remapped, noise = mutual_information(image, image.square()), mutual_information(image, torch.rand_like(image))
    assert (remapped > 2.0).all() and (noise < 0.2).all()
    assert mutual_information_loss(image, image.square()).item() == pytest.approx(-remapped.mean().item())


def test_mutual_information_sees_the_second_contrasts_anatomy(small_embedded2d):
    """More with the subject's own T1 than with another subject's (test_embedded checks the T2 itself)."""
    embedded2d = small_embedded2d
    subject, other_subject = embedded2d.split_subjects("train")[:2]
    as_tensor = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    t2 = as_tensor(embedded2d.image(subject, "t2"))
    same = mutual_information(as_tensor(embedded2d.image(subject)), t2).item()
    other = mutual_information(as_tensor(embedded2d.image(other_subject)), t2).item()
    assert same > other + 0.05, (same, other)


def test_background_suppression_by_hand():
    fixed = torch.zeros(1, 1, 8, 8)
    fixed[..., 4:] = 0.8                             # left half background, right half foreground
    warped = torch.zeros(1, 1, 8, 8)
    warped[..., 4:] = torch.rand(8, 4)               # whatever lies on the foreground is not seen
    assert background_suppression_loss(fixed, warped).item() == 0.0   # the warped background is empty
    warped[..., :4, :4] = 0.5                        # a quarter of the image: 0.5 on the background
    assert background_suppression_loss(fixed, warped).item() == pytest.approx(0.25 * 0.25)
    # the threshold gamma = 0.1: 0.09 counts as background, 0.11 does not
    fixed = torch.tensor([0.09, 0.11]).reshape(1, 1, 1, 2)
    assert background_suppression_loss(fixed, torch.zeros_like(fixed)).item() == pytest.approx(0.09 ** 2 / 2)
    assert background_suppression_loss(fixed, torch.zeros_like(fixed), threshold=0.2).item() == pytest.approx(
        (0.09 ** 2 + 0.11 ** 2) / 2)


def test_neighbour_smoothness_by_hand():
    H, W, c = 10, 12, 2.0
    u = torch.zeros(1, 2, H, W)
    u[:, 0] = c   # zero padding: |c| on edge voxels, 2|c| at the 4 corners, 0 inside
    by_hand = (4 * (2 * c) ** 2 + (2 * (H - 2) + 2 * (W - 2)) * c ** 2) / (2 * H * W)
    assert neighbour_smoothness(u).item() == pytest.approx(by_hand)
    # 3D, the same code: 3 outside neighbours at corners, 2 along edges, 1 on faces
    D = 6
    v = torch.zeros(1, 3, D, H, W)
    v[:, 1] = c
    edges = 4 * ((D - 2) + (H - 2) + (W - 2))
    faces = 2 * ((D - 2) * (H - 2) + (H - 2) * (W - 2) + (D - 2) * (W - 2))
    by_hand = (8 * 9 + edges * 4 + faces) * c ** 2 / (3 * D * H * W)
    assert neighbour_smoothness(v).item() == pytest.approx(by_hand)


def test_dual_consistency_by_hand():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 4:11, 5:12] = torch.rand(7, 7)
    assert dual_consistency_loss(image, image, torch.zeros(1, 2, 16, 16)).item() == pytest.approx(0, abs=1e-12)
    # an integer translation and back: exact wherever the image is empty near the border
    u = translation((16, 16), (2.0, -1.0))
    torch.testing.assert_close(self_sampled_inverse(u, "border"), -u)
    assert dual_consistency_loss(image, warp(image, u, padding_mode="border"), u).item() == pytest.approx(0, abs=1e-12)
    # everything collapsed onto the centre (9 x 9, centre 4, where the image is 0): the inverse made by
    # self-sampling is 0, so the image comes back as 0 and the loss is the mean of its square, 9 / 81
    image = torch.zeros(1, 1, 9, 9)
    image[..., 0:3, 0:3] = 1.0
    collapse = -centred_grid((9, 9))[None]   # x + u(x) = the centre, for every x
    warped = warp(image, collapse, padding_mode="border")
    assert warped.abs().max() == 0.0
    assert dual_consistency_loss(image, warped, collapse).item() == pytest.approx(1 / 9)


# --- the networks


def test_untrained_affine_network_is_the_identity_and_matches_affine_grid(ctf):
    net, recipe = build(ctf, 2)
    net.set_stage(0)
    net.eval()
    fixed, moving = torch.rand(2, 1, 64, 48), torch.rand(2, 1, 64, 48)
    assert net(fixed, moving).abs().max().item() == 0.0   # zero weights, identity bias
    assert net.affine.head.out_features == 6
    # [A | t] on normalised coordinates (array-axis order) = grid_sample(affine_grid) with align_corners=True,
    # whose theta acts on (x, y) = (axis 1, axis 0)
    theta_to_voxels = sys.modules[type(ctf).__module__].theta_to_voxels
    theta = torch.tensor([[[1.1, 0.2, 0.05], [-0.1, 0.9, -0.1]]])
    W, b = theta_to_voxels(theta, (64, 48))
    ours = warp(moving[:1], affine_displacement(W, b, (64, 48)))
    theta_xy = theta[:, [1, 0]][:, :, [1, 0, 2]]
    grid = F.affine_grid(theta_xy, (1, 1, 64, 48), align_corners=True)
    torch.testing.assert_close(ours, F.grid_sample(moving[:1], grid, align_corners=True), atol=1e-4, rtol=0)


def test_affine_sampler_is_the_codes_keras_sampler_by_hand(ctf):
    """Per axis: corners trunc(p) and trunc(p) + 1 clipped to the image, weighted with the clipped corners."""
    stn_warp = sys.modules[type(ctf).__module__].stn_warp
    image = torch.tensor([[2.0, 4.0, 8.0, 16.0, 32.0], [200.0, 400.0, 800.0, 1600.0, 3200.0]])[None, None]
    sampled_at = torch.tensor([[-1.5, -0.5, 1.25, 3.5, 4.0],     # positions along axis 1, on row 0
                               [-1.0, 0.0, 3.9, 4.5, 7.0]])
    u = torch.zeros(2, 2, 2, 5)
    u[:, 1, 0] = sampled_at - torch.arange(5.0)
    by_hand = torch.tensor([[0.0,                      # p <= -1: both corners clip to 0, the weights cancel
                             1.5 * 2 - 0.5 * 4,        # -1 < p < 0: corners 0 and 1, the line extrapolated
                             0.75 * 4 + 0.25 * 8,      # inside: linear
                             0.5 * 16 + 0.5 * 32,
                             0.0],                     # at the last voxel already 0
                            [0.0, 2.0, 0.1 * 16 + 0.9 * 32, 0.0, 0.0]])
    out = stn_warp(image, u)
    torch.testing.assert_close(out[:, 0, 0], by_hand)
    assert warp(image, u, padding_mode="border")[1, 0, 0, 3] == 32.0   # the border clamp it replaces
    # row 1 is the last voxel along axis 0: 0 whatever the column, as the code's identity leaves the last row
    assert out[:, 0, 1].abs().max() == 0.0
    # the same rule along axis 0, and in 3D through the same code
    transposed = stn_warp(image.transpose(2, 3).contiguous(), u.flip(1).transpose(2, 3).contiguous())
    torch.testing.assert_close(transposed.transpose(2, 3), out)
    volume = torch.stack([image, image], dim=2)                       # 1 x 1 x 2 x 2 x 5, axis 0 held at p = 0
    u3 = torch.cat([torch.zeros(2, 1, 2, 2, 5), torch.stack([u, u], dim=2)], dim=1)
    torch.testing.assert_close(stn_warp(volume, u3)[:, :, 0], out)
    # inside the image it is grid_sample's linear interpolation
    torch.manual_seed(0)
    smooth, small = torch.rand(1, 1, 12, 14), torch.rand(1, 2, 12, 14) * 0.8
    inside = (slice(None), slice(None), slice(0, 10), slice(0, 12))
    torch.testing.assert_close(stn_warp(smooth, small)[inside], warp(smooth, small)[inside])


def test_affine_stage_samples_beyond_the_image_as_the_code(ctf):
    """M_A by hand for a translation of (-0.5, +0.5) voxels of a linear ramp, where interpolation is exact."""
    net, _ = build(ctf, 2)
    net.set_stage(0)
    net.eval()
    H, W = 32, 40
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                                indexing="ij")
    moving = (1 + cols + 100 * rows)[None, None]
    with torch.no_grad():  # theta's translation is normalised: a voxel is 2 / (S - 1)
        net.affine.head.bias.copy_(torch.tensor([1.0, 0.0, -0.5 * 2 / (H - 1), 0.0, 1.0, 0.5 * 2 / (W - 1)]))
    aligned = net.align(torch.zeros_like(moving), moving)[0][0, 0]
    by_hand = 1 + (cols + 0.5) + 100 * (rows - 0.5)   # row 0 samples p = -0.5: extrapolated, 1.5 cols - 48.5
    by_hand[:, -1] = 0.0                              # the last column samples p = W - 0.5: past the last voxel
    torch.testing.assert_close(aligned, by_hand, atol=1e-3, rtol=0)
    assert aligned[0, 0].item() == pytest.approx(1.5 * 1.5 - 0.5 * 101.5)   # 1.5 (1 + 2) / 2 - 0.5 (101 + 102) / 2


@pytest.mark.parametrize("shape", [(64, 80), (40, 52), (32, 40, 36)])
def test_displacement_has_the_fixed_images_shape(ctf, shape):
    ndim = len(shape)
    net, recipe = build(ctf, ndim, affine_width=4, width=4, affine_pool=2)
    assert net.affine.head.out_features == ndim * (ndim + 1)
    net.eval()
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = ctf.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape) and torch.isfinite(u).all()
    with pytest.raises(ValueError, match="32 voxels"):
        ctf.register(net, fixed[..., :16], moving[..., :16], recipe)


def test_register_is_the_affine_then_the_deformable_warp(ctf):
    net, recipe = build(ctf, 2)
    with torch.no_grad():  # a non-trivial affine, and a DT-Net that shifts by (1.5, -0.5) voxels
        net.affine.head.bias.copy_(torch.tensor([1.05, 0.03, 0.02, -0.02, 0.97, -0.03]))
        net.deformable.flow.weight.zero_()
        net.deformable.flow.bias.copy_(torch.tensor([1.5, -0.5]))
    net.eval()
    fixed = torch.rand(1, 1, 64, 64)
    grid = centred_grid((64, 64))
    moving = torch.exp(-grid.square().sum(0) / (2 * 8.0 ** 2))[None, None]   # a smooth blob, ~0 at the border
    u = ctf.register(net, fixed, moving, recipe)
    aligned = net.align(fixed, moving)[0]
    twice = warp(aligned, net.deformable(aligned, fixed), padding_mode="border")
    once = warp(moving, u, padding_mode="border")
    # one resampling instead of two: the same image up to the interpolation of the second
    assert (once - twice).abs().max() < 5e-3 and (once - moving).abs().max() > 0.05


# --- stages and loss terms


def test_two_stages_affine_first_then_frozen(ctf):
    net, recipe = build(ctf, 2, affine_iterations=7, iterations=9, affine_lr=1e-4, lr=1e-2)
    stages = ctf.training_stages(net, recipe)
    assert [(s.name, s.iterations, s.lr) for s in stages] == [("affine", 7, 1e-4), ("deformable", 9, None)]
    assert {id(p) for p in stages[0].parameters} == {id(p) for p in net.affine.parameters()}
    assert {id(p) for p in stages[1].parameters} == {id(p) for p in net.deformable.parameters()}
    ctf.start_stage(net, 1, recipe)
    net.train()  # the training loop switches the whole network to training mode
    assert not net.affine.training and net.deformable.training
    norm = net.affine.blocks[0][1]
    before = norm.running_mean.clone()
    batch = {"fixed": torch.rand(2, 1, 64, 64), "moving": torch.rand(2, 1, 64, 64)}
    ctf.loss_terms(net, batch, recipe)
    torch.testing.assert_close(norm.running_mean, before, rtol=0, atol=0)   # the frozen AT-Net's statistics stay
    ctf.start_stage(net, 0, recipe)
    assert net.affine.training


def fixed_with_background(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 1, *shape, generator=generator) * 0.8 + 0.2
    image[..., :8, :] = 0.0   # background rows, below gamma
    return image


def test_loss_terms_are_the_recipes_terms_with_its_weights(ctf):
    net, recipe = build(ctf, 2, background_weight=50.0, mi_weight=3.0, dual_weight=70.0, smoothness_weight=2.0,
                        affine_mi_weight=0.5, affine_background_weight=0.25)
    shape = (64, 64)
    fixed = fixed_with_background(shape)
    moving = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    batch = {"fixed": fixed, "moving": moving}
    mi = lambda f, m: mutual_information_loss(f, m, recipe["bins"])  # noqa: E731

    ctf.start_stage(net, 0, recipe)
    net.eval()  # no dropout, so that the terms can be recomputed
    terms = ctf.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {"mutual_information": 0.5, "background": 0.25}
    aligned = net.align(fixed, moving)[0]
    torch.testing.assert_close(terms["mutual_information"][1], mi(fixed, aligned))
    torch.testing.assert_close(terms["background"][1], background_suppression_loss(fixed, aligned))

    ctf.start_stage(net, 1, recipe)
    terms = ctf.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "smoothness": 2.0, "background": 50.0, "mutual_information": 3.0, "dual_consistency": 70.0}
    u = net.deformable(aligned, fixed)
    deformed = warp(aligned, u, padding_mode="border")
    torch.testing.assert_close(terms["smoothness"][1], neighbour_smoothness(u))
    torch.testing.assert_close(terms["background"][1], background_suppression_loss(fixed, deformed))
    torch.testing.assert_close(terms["mutual_information"][1], mi(fixed, deformed))
    torch.testing.assert_close(terms["dual_consistency"][1], dual_consistency_loss(aligned, deformed, u))
    # every term is there, active, and moves the DT-Net's gradient: dropping one changes training
    for name, (weight, value) in terms.items():
        assert value.abs() > 0, name
        gradient = torch.autograd.grad(weight * value, net.deformable.flow.weight, retain_graph=True)[0]
        assert gradient.abs().sum() > 0, name


def test_paired_augmentation_moves_both_images_alike(ctf):
    augment = sys.modules[type(ctf).__module__].paired_augmentation
    torch.manual_seed(0)
    image = torch.rand(4, 1, 32, 32)
    first, second = augment([image, image.clone()])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, image)
    # no rotation, zoom or shift: each item is itself or its mirror along the last axis
    flipped = augment([image], rotation_degrees=0, shift=0, zoom=0)[0]
    for item, out in zip(image, flipped):
        assert torch.allclose(out, item, atol=1e-5) or torch.allclose(out, item.flip(-1), atol=1e-5)


def test_augmentation_is_used_in_training_only(ctf):
    net, recipe = build(ctf, 2, augment=True)
    ctf.start_stage(net, 0, recipe)
    batch = {"fixed": fixed_with_background((64, 64)), "moving": torch.rand(2, 1, 64, 64)}
    net.eval()
    still = [float(v.detach()) for _, v in ctf.loss_terms(net, batch, recipe).values()]
    assert still == [float(v.detach()) for _, v in ctf.loss_terms(net, batch, recipe).values()]
    net.train()
    torch.manual_seed(1)
    moved = [float(v.detach()) for _, v in ctf.loss_terms(net, batch, recipe).values()]
    assert moved != still


# --- training on the embedded data, T1 fixed against T2-like moving


def test_short_training_across_contrasts_lowers_the_loss_and_beats_identity(ctf, small_embedded2d, tmp_path):
    recipe = ctf.recipe("quick", {"affine_iterations": AFFINE_STEPS, "iterations": DEFORMABLE_STEPS,
                                  "checkpoint_every": 1000})
    assert small_embedded2d.moving_contrast(ctf) == "t2"
    run = short_training(ctf, recipe, small_embedded2d, tmp_path / "run", contrast="t2")   # fixed T1, moving T2
    assert run.saved_recipe == recipe and run.summary["iterations"] == AFFINE_STEPS + DEFORMABLE_STEPS
    assert run.trained_loss < run.untrained_loss - 0.1, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)


@pytest.fixture(scope="module")
def embedded2d_with_val(tmp_path_factory):
    """The small training set of ``small_embedded2d`` with the default n_val = 2: 4 val pairs (1 with n_val = 1)."""
    root = tmp_path_factory.mktemp("embedded2d_with_val")
    source = load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options({"n_train": 8, "n_val": 2, "n_test": 1}))
    return PreparedDataset(root / "prepared")


def test_quick_affine_stage_alone_beats_no_registration_on_val(ctf, embedded2d_with_val, tmp_path):
    """The recipe's MI between the fixed T1 and the moving T2 after the quick recipe's AT-Net (M_A), above the MI
    without registration on every val pair and by 0.03 on average (0.749 to about 0.79; 20 steps at the code's
    lr 1e-4, the former budget, reach 0.773 here)."""
    dataset = embedded2d_with_val
    quick = ctf.recipe("quick")
    assert quick["affine_lr"] == ctf.recipe("paper")["affine_lr"] == 1e-4
    assert quick["affine_iterations"] >= 100 and quick["affine_iterations"] + quick["iterations"] <= 900
    recipe = ctf.recipe("quick", {"iterations": 0, "checkpoint_every": 1000})   # the affine stage alone
    train(ctf, recipe, dataset, tmp_path / "run", seed=0)
    net, _ = load_trained(ctf, tmp_path / "run" / "model.pt")
    similarity = lambda f, m: mutual_information(f, m, recipe["bins"], recipe["sigma_ratio"]).item()  # noqa: E731
    pairs = [dataset.pair(p.fixed, p.moving, "t2") for p in dataset.split_pairs("val").itertuples()]
    assert len(pairs) == 4
    with torch.no_grad():
        before = [similarity(b["fixed"], b["moving"]) for b in pairs]
        after = [similarity(b["fixed"], net.align(b["fixed"], b["moving"])[0]) for b in pairs]
        theta = net.affine(pairs[0]["moving"], pairs[0]["fixed"])[0]
    assert (theta - torch.tensor([[1.0, 0, 0], [0, 1, 0]])).abs().max() > 0.01   # no longer the identity
    assert all(a > b + 0.005 for a, b in zip(after, before)), (before, after)
    assert sum(after) / 4 > sum(before) / 4 + 0.03, (before, after)
