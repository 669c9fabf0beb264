"""DIRNet: the regressor's layers, the B-spline transformer, the -NCC loss on a hand case, and a short run."""
import pytest
import torch

from regbench.blocks.bspline import bspline_displacement, cubic_bspline
from regbench.blocks.losses import global_ncc
from regbench.method import TRAINING_KEYS, parameter_count
from regbench.plugins import load_method
from regbench.blocks.spatial import warp
from short_training import short_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dirnet():
    return load_method("dirnet")


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", overrides)
    return method.build(ndim, recipe), recipe


def set_output(net, weight_std=0.0, bias=None, seed=1):
    """Give the zero-initialised output conv weights (and a bias), so the net predicts a non-trivial field."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.output.weight.copy_(torch.randn(net.output.weight.shape, generator=generator) * weight_std)
        if bias is not None:
            net.output.bias.copy_(torch.as_tensor(bias, dtype=net.output.bias.dtype))


def test_recipes_hold_the_recipe(dirnet):
    paper, quick = dirnet.recipe("paper"), dirnet.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    # TorchIR's recreation of the MNIST experiment
    assert (paper["spacing"], paper["kernels"], paper["conv_layers"], paper["dense_layers"]) == (8, 16, 5, 2)
    assert (paper["lr"], paper["batch_size"], paper["iterations"], paper["amsgrad"]) == (1e-3, 32, 10_000, True)
    assert (paper["batch_norm"], paper["similarity_weight"], paper["padding_mode"]) == (True, 1.0, "border")
    for key in ("conv_layers", "dense_layers", "batch_norm", "similarity_weight", "amsgrad"):
        assert quick[key] == paper[key]  # the quick run keeps the network's layers and the loss


def test_global_ncc_has_the_hand_value():
    # columns (1, 2, 3, 4) against (1, 3, 2, 4): deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5),
    # sum of products 2.25 - .25 - .25 + 2.25 = 4, sums of squares 5 and 5: CC = 4 / 5
    fixed = torch.tensor([1.0, 2, 3, 4]).expand(1, 1, 3, 4)
    moving = torch.tensor([1.0, 3, 2, 4]).expand(1, 1, 3, 4)
    assert global_ncc(fixed, moving).item() == pytest.approx(-0.8)
    assert global_ncc(fixed, 3 * fixed + 1).item() == pytest.approx(-1.0)


def test_the_loss_is_minus_ncc_of_the_warped_image_and_nothing_else(dirnet):
    # an untrained DIRNet is the identity, so on the hand case its only term is -0.8
    net, recipe = build(dirnet, 2, spacing=1)
    fixed = torch.tensor([1.0, 2, 3, 4]).expand(2, 1, 4, 4).contiguous()
    moving = torch.tensor([1.0, 3, 2, 4]).expand(2, 1, 4, 4).contiguous()
    terms = dirnet.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert set(terms) == {"similarity"} and terms["similarity"][0] == 1.0
    assert terms["similarity"][1].item() == pytest.approx(-0.8)
    # with a non-trivial field: -NCC of the moving image warped (border padding) by the predicted field
    net, recipe = build(dirnet, 2)
    set_output(net, weight_std=0.5)
    batch = {"fixed": torch.rand(2, 1, 48, 64), "moving": torch.rand(2, 1, 48, 64)}
    terms = dirnet.loss_terms(net, batch, recipe)
    u = net(batch["fixed"], batch["moving"])
    assert u.abs().max() > 0.1
    expected = global_ncc(batch["fixed"], warp(batch["moving"], u, padding_mode="border"))
    torch.testing.assert_close(terms["similarity"][1], expected)
    # the term trains the whole regressor
    terms["similarity"][1].backward()
    assert net.output.weight.grad.abs().sum() > 0 and net.regressor[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(64, 48), (16, 24, 32)])
def test_an_untrained_dirnet_is_the_identity_in_2d_and_3d(dirnet, shape):
    ndim = len(shape)
    net, recipe = build(dirnet, ndim, spacing=8)
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = dirnet.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape) and u.abs().max() == 0
    # and a trained-looking one predicts TorchIR's control grid at the spacing: floor(S / 8) points per axis
    set_output(net, weight_std=0.5)
    control = net.control_points(fixed, moving)
    assert control.shape == (2, ndim, *[s // 8 for s in shape])
    torch.testing.assert_close(net(fixed, moving), bspline_displacement(control, shape, 8))


def test_the_regressor_has_the_papers_layers(dirnet):
    # 5 x [3x3 conv, BN, ELU] with avg pools after the first log2(16) = 4, then 2 x [1x1 conv, BN, ELU], 1x1 output
    net, _ = build(dirnet, 2, spacing=16, kernels=16)
    kinds = [type(m).__name__ for m in net.regressor]
    assert kinds.count("Conv2d") == 7 and kinds.count("BatchNorm2d") == 7 and kinds.count("ELU") == 7
    assert kinds.count("AvgPool2d") == 4
    assert [m.kernel_size for m in net.regressor if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 5 + [(1, 1)] * 2
    assert net.output.kernel_size == (1, 1) and net.output.out_channels == 2
    convs = (9 * 2 * 16 + 16) + 4 * (9 * 16 * 16 + 16) + 2 * (16 * 16 + 16)
    assert parameter_count(net) == convs + 7 * 2 * 16 + (16 * 2 + 2)
    # TorchIR's DIRNet (no batch norm) in 3D
    net3d, _ = build(dirnet, 3, spacing=8, kernels=16, batch_norm=False)
    assert parameter_count(net3d) == (27 * 2 * 16 + 16) + 4 * (27 * 16 * 16 + 16) + 2 * (16 * 16 + 16) + (16 * 3 + 3)


def test_a_constant_control_grid_falls_off_past_its_points_as_torchirs(dirnet):
    # 11 x 11 control points at voxels 7, 23, ..., 167 (i 16 + 7), zero beyond: the constant from the second point
    # to the second-to-last, then less towards the border
    net, recipe = build(dirnet, 2, spacing=16)
    set_output(net, bias=[1.5, -2.0])
    u = net(torch.rand(1, 1, 176, 176), torch.rand(1, 1, 176, 176))[0]
    constant = torch.tensor([1.5, -2.0])
    torch.testing.assert_close(u[:, 23:152, 23:152], constant.view(2, 1, 1).expand(2, 129, 129))
    # the last voxel, 175, is half a spacing past the last point: beta(1/2) + beta(3/2) = 1/2 along that axis
    torch.testing.assert_close(u[:, 175, 100], constant / 2)
    torch.testing.assert_close(u[:, 175, 175], constant / 4)
    # the first voxel sees the points at 7 and 23: beta(7/16) + beta(23/16) = 2/3 - 491/4096
    torch.testing.assert_close(u[:, 0, 100], constant * (2 / 3 - 491 / 4096))
    edge = cubic_bspline(torch.tensor(7 / 16)) + cubic_bspline(torch.tensor(23 / 16))
    assert edge.item() == pytest.approx(2 / 3 - 491 / 4096)


def test_training_uses_amsgrad(dirnet):
    net, recipe = build(dirnet, 2)
    (stage,) = dirnet.training_stages(net, recipe)
    assert stage.adam == {"amsgrad": True} and stage.iterations == recipe["iterations"]
    assert len(stage.parameters) == len(list(net.parameters()))


def test_bad_input_is_refused_with_a_clear_error(dirnet):
    with pytest.raises(ValueError, match="power of 2"):
        build(dirnet, 2, spacing=12)
    with pytest.raises(ValueError, match="conv layers"):
        build(dirnet, 2, spacing=64)
    net, _ = build(dirnet, 2, spacing=16)
    with pytest.raises(ValueError, match="smaller than the control spacing"):
        net(torch.rand(1, 1, 12, 40), torch.rand(1, 1, 12, 40))
    with pytest.raises(ValueError, match="B x 1 x"):
        net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 40))


def test_short_training_lowers_the_loss_and_beats_identity(dirnet, small_embedded2d, tmp_path):
    # 150 steps of the quick recipe (about 11 s of one core)
    recipe = dirnet.recipe("quick", {"iterations": 150, "checkpoint_every": 1000})
    run = short_training(dirnet, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 150
    assert run.trained_loss < run.untrained_loss - 0.01, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.05, (run.identity_dice, run.trained_dice)
