"""ICNet: the code's network, each loss term on a case computed by hand, every recipe term in the loss, training."""
import pytest
import torch

from regbench.blocks.losses import (antifolding_loss, gradient_smoothness, inverse_consistency_loss, mse,
                                    self_sampled_inverse)
from regbench.method import TRAINING_KEYS, parameter_count
from regbench.plugins import load_method
from regbench.blocks.spatial import warp
from short_training import short_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def icnet():
    return load_method("icnet")


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", overrides)
    return method.build(ndim, recipe), recipe


def translation(shape, vector):
    vector = torch.tensor(vector, dtype=torch.float32).view(1, len(shape), *([1] * len(shape)))
    return vector.expand(1, len(shape), *shape).clone()


class Constant(torch.nn.Module):
    """Stands in for the output convolution: a fixed pre-tanh field."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(value)

    def forward(self, features):
        return self.value.expand(features.shape[0], *self.value.shape[1:])


def test_recipes_hold_the_codes_numbers(icnet):
    paper, quick = icnet.recipe("paper"), icnet.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    assert (paper["smoothness_weight"], paper["inverse_weight"], paper["antifold_weight"]) == (0.5, 0.05, 1e5)
    assert (paper["lr"], paper["batch_size"], paper["iterations"]) == (5e-4, 1, 20_001)
    assert (paper["start_channel"], paper["zscore"]) == (8, True)
    # Train.py: range_flow = 7 voxels of its 1 mm images
    assert (paper["range_flow_mm"], paper["working_spacing_mm"]) == (7.0, 1.0) and build(icnet, 3)[0].range_flow == 7.0
    assert (paper["inverse_consistency"], paper["antifold_components"], paper["padding_mode"]) == (
        "composition", "all", "zeros")
    # the quick recipe changes the budget only
    assert {k for k in paper if paper[k] != quick[k]} <= {"iterations", "lr", "checkpoint_every", "log_every"}


def conv(ndim, channels_in, channels_out, kernel=3):
    return kernel ** ndim * channels_in * channels_out


def test_network_is_modelflow_stride_layer_by_layer(icnet):
    # Models.py, c = 8, 3D: biasless 3^3 convs, 2^3 transposed convs with bias, a biasless 1^3 conv to 3 channels
    c = 8
    convs = [(2, c), (c, c), (c, 2 * c), (2 * c, 2 * c), (2 * c, 4 * c), (4 * c, 4 * c), (4 * c, 8 * c), (8 * c, 8 * c),
             (8 * c, 16 * c), (16 * c, 8 * c),                                     # ec0 .. ec9
             (16 * c, 8 * c), (8 * c, 4 * c), (8 * c, 4 * c), (4 * c, 2 * c), (4 * c, 4 * c), (4 * c, 2 * c),
             (3 * c, 2 * c), (2 * c, 2 * c)]                                       # dc1 .. dc8
    ups = [8 * c, 4 * c, 2 * c, 2 * c]
    expected = (sum(conv(3, i, o) for i, o in convs) + sum(conv(3, u, u, 2) + u for u in ups) + conv(3, 2 * c, 3, 1))
    net, _ = build(icnet, 3)
    assert parameter_count(net) == expected == 1_111_840
    assert not any(name.endswith("bias") for name, _ in net.named_parameters() if not name.startswith("up."))


@pytest.mark.parametrize("shape", [(64, 80), (37, 50), (16, 32, 24)])
def test_flows_are_bounded_and_have_the_fixed_images_shape(icnet, shape):
    ndim = len(shape)
    net, recipe = build(icnet, ndim)
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = icnet.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape)
    assert u.abs().max() <= 7.0
    terms = icnet.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert all(torch.isfinite(value) for _, value in terms.values())


@pytest.mark.parametrize("shape, spacing", [((64, 48), (0.5, 0.5)),          # twice the code's voxels per mm
                                             ((40, 30), (1.0, 2.0)),          # anisotropic
                                             ((20, 18, 16), (1.2, 1.2, 1.2))])  # IXI's voxels
def test_the_largest_displacement_is_seven_mm_on_any_grid(icnet, shape, spacing):
    # the code's bound is 7 voxels of its 1 mm images: with tanh saturated, every vector is 7 mm long along each
    # axis on the dataset's grid, whatever its voxels (on a 0.5 mm grid: 14 voxels, not 7)
    net, recipe = build(icnet, len(shape))
    adapter = icnet.grid_adapter(shape, spacing, recipe)
    assert adapter.active and adapter.spacing == (1.0,) * len(shape)
    for sign in (1.0, -1.0):
        net.out = Constant(torch.full((1, len(shape), *adapter.shape), 20.0 * sign))  # tanh(20) = 1
        fixed, moving = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
        u = icnet.register_on_dataset_grid(net, fixed, moving, recipe, adapter)
        assert u.shape == (1, len(shape), *shape)
        millimetres = u * torch.tensor(spacing).view(1, -1, *([1] * len(shape)))
        torch.testing.assert_close(millimetres, torch.full_like(u, 7.0 * sign))


def test_the_working_grid_holds_the_datasets_field_of_view_at_1_mm(icnet):
    recipe = icnet.recipe("quick")
    # embedded2d and OASIS: 1 mm voxels, their own working grid (nothing resampled, the quick run unchanged)
    assert not icnet.grid_adapter((176, 176), (1.0, 1.0), recipe).active
    assert not icnet.grid_adapter((160, 192, 224), (1.0, 1.0, 1.0), recipe).active
    # 63 x 0.5 = 31.5 mm and 47 x 0.5 = 23.5 mm between the first and last voxel centres: 33 x 25 voxels of 1 mm
    assert icnet.grid_adapter((64, 48), (0.5, 0.5), recipe).shape == (33, 25)
    # IXI (160 x 192 x 160 at 1.2 mm: 190.8 x 229.2 x 190.8 mm)
    assert icnet.grid_adapter((160, 192, 160), (1.2,) * 3, recipe).shape == (192, 231, 192)
    # another working spacing keeps the bound in mm: 7 mm = 3.5 voxels of 2 mm
    coarse = icnet.recipe("quick", {"working_spacing_mm": 2.0})
    assert icnet.build(2, coarse).range_flow == 3.5
    assert icnet.grid_adapter((64, 48), (1.0, 1.0), coarse).shape == (33, 25)
    with pytest.raises(ValueError, match="working_spacing_mm"):
        icnet.build(2, icnet.recipe("quick", {"working_spacing_mm": 0.0}))


def test_one_network_gives_both_directions(icnet):
    net, recipe = build(icnet, 2)
    a, b = torch.rand(2, 1, 48, 48), torch.rand(2, 1, 48, 48)
    forward, backward = net.both(a, b)
    torch.testing.assert_close(forward, net(a, b))
    torch.testing.assert_close(backward, net(b, a))
    assert not torch.allclose(forward, backward)


def test_inverse_consistency_of_a_translation_by_hand():
    # F_AB = t, F_BA = -t: each is the other's exact inverse. Inside the grid the residual
    # F_AB(x) + F_BA(x + F_AB(x)) is t - t = 0; with zero padding the samples beyond the grid read 0, so the
    # residual is t on the voxels that t carries outside: 3H + 2W - 6 of them for t = (2, -3), both ways.
    H, W = 20, 24
    t = (2.0, -3.0)
    forward, backward = translation((H, W), t), translation((H, W), (-t[0], -t[1]))
    outside = 3 * H + 2 * W - 6
    by_hand = 2 * outside * (t[0] ** 2 + t[1] ** 2) / (2 * H * W)  # two directions, MSE over 2 components
    for variant in ("composition", "inverse_network"):
        value = inverse_consistency_loss(forward, backward, variant, padding_mode="zeros")
        assert value.item() == pytest.approx(by_hand, rel=1e-6)
        assert inverse_consistency_loss(forward, backward, variant, padding_mode="border").item() == 0.0
    # a flow and a flow that is not its inverse: the same translation both ways
    assert inverse_consistency_loss(forward, forward, padding_mode="border").item() == pytest.approx(
        2 * (4 * t[0] ** 2 + 4 * t[1] ** 2) / 2)
    with pytest.raises(ValueError, match="variant"):
        inverse_consistency_loss(forward, backward, "paper")


def test_the_two_versions_differ_where_the_flow_varies():
    torch.manual_seed(0)
    forward, backward = torch.nn.functional.interpolate(torch.randn(2, 2, 4, 4) * 2, size=(32, 32), mode="bilinear",
                                                        align_corners=True).split(1)
    composition = inverse_consistency_loss(forward, backward, "composition")
    network = inverse_consistency_loss(forward, backward, "inverse_network")
    torch.testing.assert_close(composition,
                               mse(forward, -warp(backward, forward)) + mse(backward, -warp(forward, backward)))
    inverse_network = mse(backward, self_sampled_inverse(forward)) + mse(forward, self_sampled_inverse(backward))
    torch.testing.assert_close(network, inverse_network)
    assert composition > 0 and network > 0 and not torch.isclose(composition, network)


def test_inverse_network_inverts_a_translation(icnet):
    net, _ = build(icnet, 2)
    flow = translation((16, 16), (1.0, 2.0))
    inverse = net.inverse(flow)
    torch.testing.assert_close(inverse[..., :15, :14], -flow[..., :15, :14])   # samples inside the grid
    assert inverse[..., 15:, :].abs().max() < 1e-5  # zero padding beyond the grid (up to rounding)


def test_antifolding_by_hand():
    H, W = 12, 10
    u = torch.zeros(1, 2, H, W)
    u[:, 0] = 0.9 * torch.arange(H, dtype=torch.float32)[:, None] * -1  # slope -0.9: compressed, no fold
    assert antifolding_loss(u).item() == 0.0
    u[:, 0] = -1.5 * torch.arange(H, dtype=torch.float32)[:, None]      # slope -1.5: folds everywhere along axis 0
    # axis 0: component 0 has D u + 1 = -0.5 -> 0.5^3 = 0.125 at (H - 1) W voxels; component 1 has D u + 1 = 1 -> 0
    # mean over both components: 0.0625; axis 1: no violation. (1/2)(0.0625 + 0) = 0.03125
    assert antifolding_loss(u).item() == pytest.approx(0.03125)
    assert antifolding_loss(u, "diagonal").item() == pytest.approx(0.0625)
    # the code's version also penalises an off-diagonal slope below -1; the paper's reasoning does not
    v = torch.zeros(1, 2, H, W)
    v[:, 1] = -1.5 * torch.arange(H, dtype=torch.float32)[:, None]
    assert antifolding_loss(v).item() == pytest.approx(0.03125) and antifolding_loss(v, "diagonal").item() == 0.0


def test_loss_terms_are_the_recipes_terms_with_its_weights(icnet):
    net, recipe = build(icnet, 2, smoothness_weight=0.25, inverse_weight=0.1, antifold_weight=1e4)
    shape = (40, 40)
    # the pre-tanh output replaced by a field that folds (slope < -1 along axis 0 once scaled by 7 tanh)
    torch.manual_seed(0)
    raw = 0.05 * torch.randn(1, 2, *shape)
    raw[:, 0, 10:16] = torch.linspace(1.0, -1.0, 6)[:, None]  # 7 tanh: a step of about -2 voxels
    net.out = Constant(raw)
    batch = {"fixed": torch.rand(1, 1, *shape), "moving": torch.rand(1, 1, *shape)}
    terms = icnet.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "similarity": 1.0, "smoothness": 0.25, "inverse_consistency": 0.1, "antifolding": 1e4}
    z = lambda x: (x - x.mean()) / x.std(correction=0)  # noqa: E731
    a, b = z(batch["moving"]), z(batch["fixed"])
    f_ab, f_ba = net(a, b), net(b, a)
    torch.testing.assert_close(terms["similarity"][1], mse(b, warp(a, f_ab)) + mse(a, warp(b, f_ba)))
    torch.testing.assert_close(terms["smoothness"][1], gradient_smoothness(f_ab) + gradient_smoothness(f_ba))
    torch.testing.assert_close(terms["inverse_consistency"][1], inverse_consistency_loss(f_ab, f_ba))
    torch.testing.assert_close(terms["antifolding"][1], antifolding_loss(f_ab) + antifolding_loss(f_ba))
    # every term is active here, and each one moves the gradient: dropping any of them changes training
    assert all(value > 0 for _, value in terms.values())
    gradients = {}
    for name, (weight, value) in terms.items():
        gradients[name] = torch.autograd.grad(weight * value, net.out.value, retain_graph=True)[0]
        assert gradients[name].abs().sum() > 0, name


def test_inverse_network_variant_changes_the_consistency_term(icnet):
    net, recipe = build(icnet, 2, inverse_consistency="inverse_network")
    batch = {"fixed": torch.rand(1, 1, 32, 32), "moving": torch.rand(1, 1, 32, 32)}
    terms = icnet.loss_terms(net, batch, recipe)
    z = lambda x: (x - x.mean()) / x.std(correction=0)  # noqa: E731
    f_ab, f_ba = net(z(batch["moving"]), z(batch["fixed"])), net(z(batch["fixed"]), z(batch["moving"]))
    torch.testing.assert_close(terms["inverse_consistency"][1],
                               inverse_consistency_loss(f_ab, f_ba, "inverse_network"))
    with pytest.raises(ValueError, match="inverse_consistency"):
        icnet.build(2, icnet.recipe("quick", {"inverse_consistency": "paper"}))


def test_short_training_lowers_the_loss_and_beats_identity(icnet, small_embedded2d, tmp_path):
    # 250 steps of the quick recipe (about 35 s of one CPU thread); the full quick recipe is 500 steps
    recipe = icnet.recipe("quick", {"iterations": 250, "checkpoint_every": 1000})
    run = short_training(icnet, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 250
    assert run.trained_loss < 0.8 * run.untrained_loss, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)
