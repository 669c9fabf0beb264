"""VoxelMorph: the network is the paper's, every recipe term is in the loss, and training registers."""
import numpy as np
import pytest
import torch

from regbench.blocks.losses import gradient_smoothness, local_ncc, mse, one_hot, soft_dice_loss
from regbench.method import TRAINING_KEYS, parameter_count
from regbench.blocks.networks import UNet, concat_channels, flow_head
from regbench.plugins import load_method
from regbench.blocks.spatial import resize_displacement, warp
from short_training import short_training


@pytest.fixture(scope="module")
def voxelmorph():
    return load_method("voxelmorph")


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", overrides)
    return method.build(ndim, recipe), recipe


def smooth_field(shape, amplitude, seed, coarse=6):
    generator = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    field = torch.randn(1, ndim, *([coarse] * ndim), generator=generator) * amplitude
    return torch.nn.functional.interpolate(field, size=shape, mode="bilinear" if ndim == 2 else "trilinear",
                                           align_corners=True)


class Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, features):
        return self.value


def jacobian_determinant(u: torch.Tensor) -> np.ndarray:
    """det(I + grad u) by central differences (numpy.gradient), as the papers count folds."""
    u = u[0].double().numpy()
    ndim = u.shape[0]
    jacobian = np.stack([np.stack(np.gradient(u[i]), axis=0) for i in range(ndim)], axis=0)
    jacobian = jacobian + np.eye(ndim).reshape(ndim, ndim, *([1] * ndim))
    return np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))


def test_recipes_hold_the_papers_numbers(voxelmorph):
    paper = voxelmorph.recipe("paper")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(voxelmorph.recipe("quick"))
    assert (paper["architecture"], paper["similarity"], paper["ncc_window"]) == ("vm2", "ncc", 9)
    assert (paper["smoothness_weight"], paper["smoothness_penalty"], paper["dice_weight"]) == (1.0, "l2", 0.0)
    assert (paper["lr"], paper["batch_size"], paper["iterations"]) == (1e-4, 1, 150_000)
    assert (paper["int_steps"], paper["int_downsize"], paper["diffeomorphic"], paper["bidir"]) == (7, 2, False, False)


def test_the_regulariser_weight_follows_the_similarity_unless_the_config_sets_it(voxelmorph):
    """TMI 2019 and the code's README: lambda = 1 with NCC, 0.01 with MSE (0.02 with MSE and the Dice term)."""
    assert voxelmorph.recipe("paper", {"similarity": "mse"})["smoothness_weight"] == 0.01
    assert voxelmorph.recipe("quick", {"similarity": "mse"})["smoothness_weight"] == 0.01
    assert voxelmorph.recipe("paper", {"similarity": "mse", "dice_weight": 0.01})["smoothness_weight"] == 0.02
    assert voxelmorph.recipe("paper", {"similarity": "ncc"})["smoothness_weight"] == 1.0
    assert voxelmorph.recipe("paper", {"similarity": "mse", "smoothness_weight": 0.5})["smoothness_weight"] == 0.5
    net, recipe = build(voxelmorph, 2, similarity="mse")
    batch = {"fixed": torch.rand(1, 1, 32, 32), "moving": torch.rand(1, 1, 32, 32)}
    assert voxelmorph.loss_terms(net, batch, recipe)["smoothness"][0] == 0.01   # the weight the loop applies
    with pytest.raises(ValueError, match="smoothness_weight"):
        voxelmorph.recipe("paper", {"smoothness_weight": "strong"})


def test_flow_head_starts_near_zero():
    torch.manual_seed(0)
    head = flow_head(16, 3)
    assert head.weight.shape == (3, 16, 3, 3, 3)
    assert head.weight.std().item() == pytest.approx(1e-5, rel=0.1)
    assert head.bias.abs().max().item() == 0.0


@pytest.mark.parametrize("shape", [(64, 80), (37, 50), (16, 32, 24)])
@pytest.mark.parametrize("downsampling", ["strided", "maxpool"])
@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_displacement_has_the_fixed_image_shape(voxelmorph, shape, downsampling, diffeomorphic):
    ndim = len(shape)
    net, recipe = build(voxelmorph, ndim, downsampling=downsampling, diffeomorphic=diffeomorphic)
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = voxelmorph.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape)
    assert u.abs().max() < 0.01  # an untrained network is close to the identity
    terms = voxelmorph.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert all(torch.isfinite(value) for _, value in terms.values())


def test_registering_under_inference_mode_does_not_break_later_training(voxelmorph):
    # warp caches its identity grid per shape; one first made under inference_mode must still serve autograd
    net, recipe = build(voxelmorph, 2, diffeomorphic=True)
    batch = {"fixed": torch.rand(1, 1, 40, 44), "moving": torch.rand(1, 1, 40, 44)}
    with torch.inference_mode():
        voxelmorph.register(net, batch["fixed"], batch["moving"], recipe)
    terms = voxelmorph.loss_terms(net, batch, recipe)
    sum(weight * value for weight, value in terms.values()).backward()
    assert net.flow.weight.grad is not None and torch.isfinite(net.flow.weight.grad).all()


def conv_parameters(ndim, channels_in, channels_out):
    return 3 ** ndim * channels_in * channels_out + channels_out


def test_maxpool_vm2_has_voxelmorphs_layers(voxelmorph):
    # voxelmorph's PyTorch VxmDense, layer by layer (2D, 2 input channels): encoder 2-16-32-32-32 with max
    # pools; 32 at 1/16; 32+32 -> 32 at 1/8, 1/4, 1/2; then 32+16 -> 32, 16, 16 at full size; flow 16 -> 2.
    # voxelmorph 0.2's VxmDense(nb_unet_features=[[16,32,32,32],[32,32,32,32,32,16,16]]) counts 109170.
    layers = [(2, 16), (16, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (64, 32), (48, 32), (32, 16),
              (16, 16), (16, 2)]
    expected = sum(conv_parameters(2, i, o) for i, o in layers)
    net, _ = build(voxelmorph, 2, downsampling="maxpool")
    assert parameter_count(net) == expected == 109170


def test_vm1_and_vm2_differ_in_their_last_layers_only(voxelmorph):
    # strided (Keras) decoder: the two convs at 1/2 and those at full size after concatenating the input
    vm2, _ = build(voxelmorph, 2, architecture="vm2")
    vm1, _ = build(voxelmorph, 2, architecture="vm1")
    vm2_tail = [(32, 32), (32 + 2, 16), (16, 16), (16, 2)]  # dec 5 at 1/2, dec 6-7 at full size, flow
    vm1_tail = [(32, 8), (8 + 2, 8), (8, 2)]
    difference = sum(conv_parameters(2, i, o) for i, o in vm2_tail) - sum(conv_parameters(2, i, o) for i, o in vm1_tail)
    assert parameter_count(vm2) - parameter_count(vm1) == difference == 13584
    # and VM-2 in 3D
    vm2_3d, _ = build(voxelmorph, 3, architecture="vm2")
    encoder = [(2, 16), (16, 32), (32, 32), (32, 32)]
    decoder = [(32, 32), (64, 32), (64, 32), (48, 32), (32, 32), (34, 16), (16, 16), (16, 3)]
    assert parameter_count(vm2_3d) == sum(conv_parameters(3, i, o) for i, o in encoder + decoder)


def test_unet_rejects_a_decoder_longer_than_its_resolutions():
    with pytest.raises(ValueError, match="decoder"):
        UNet(2, 2, encoder=[8, 8], decoder=[[8], [8], [8], [8]])
    with pytest.raises(ValueError, match="downsampling"):
        UNet(2, 2, downsampling="avgpool")


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_diffeomorphic_variant_does_not_fold_where_the_raw_field_does(voxelmorph, seed):
    shape = (64, 64)
    net, recipe = build(voxelmorph, 2, diffeomorphic=True)
    velocity = smooth_field(shape, amplitude=6.0, seed=seed)
    net.flow = Constant(velocity)  # the network's output, replaced by a large random field
    out = net(torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape))
    assert out.displacement.abs().max() > 10.0  # a large deformation: a sixth of the image
    assert (jacobian_determinant(velocity) <= 0).sum() > 200  # used as a displacement, it folds
    assert (jacobian_determinant(out.displacement) <= 0).sum() == 0  # integrated, it does not
    # the regulariser sees the half-resolution velocity, in half-resolution voxels
    assert out.regularised.shape == (1, 2, 32, 32)
    torch.testing.assert_close(out.regularised, resize_displacement(velocity, (32, 32)))


@pytest.mark.parametrize("similarity", ["ncc", "mse"])
def test_loss_terms_are_the_recipes_terms_with_its_weights(voxelmorph, similarity):
    torch.manual_seed(1)
    net, recipe = build(voxelmorph, 2, similarity=similarity, smoothness_weight=0.25)
    with torch.no_grad():
        net.flow.weight.normal_(0, 0.01)  # a non-trivial displacement
    batch = {"fixed": torch.rand(2, 1, 48, 48), "moving": torch.rand(2, 1, 48, 48)}
    terms = voxelmorph.loss_terms(net, batch, recipe)
    assert set(terms) == {"similarity", "smoothness"}
    u = voxelmorph.register(net, batch["fixed"], batch["moving"], recipe)
    warped = warp(batch["moving"], u)
    expected = local_ncc(batch["fixed"], warped, 9) if similarity == "ncc" else mse(batch["fixed"], warped)
    assert terms["similarity"][0] == 1.0
    torch.testing.assert_close(terms["similarity"][1], expected)
    assert terms["smoothness"][0] == 0.25
    torch.testing.assert_close(terms["smoothness"][1], gradient_smoothness(u))
    assert terms["smoothness"][1] > 0


def test_diffeomorphic_bidirectional_terms(voxelmorph):
    net, recipe = build(voxelmorph, 2, diffeomorphic=True, bidir=True)
    with torch.no_grad():
        net.flow.weight.normal_(0, 0.01)
    batch = {"fixed": torch.rand(1, 1, 48, 48), "moving": torch.rand(1, 1, 48, 48)}
    terms = voxelmorph.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "similarity": 0.5, "similarity_inverse": 0.5, "smoothness": recipe["smoothness_weight"]}
    out = net(batch["moving"], batch["fixed"], inverse=True)
    inverse_similarity = local_ncc(batch["moving"], warp(batch["fixed"], out.inverse))
    torch.testing.assert_close(terms["similarity_inverse"][1], inverse_similarity)
    # voxelmorph's loss_mult: Grad of the half-resolution velocity times int_downsize
    torch.testing.assert_close(terms["smoothness"][1], 2 * gradient_smoothness(out.regularised))


def test_dice_term_is_there_only_when_weighted_and_moves_the_gradient(voxelmorph):
    shape = (48, 48)
    seg_fixed = torch.zeros(1, 1, *shape, dtype=torch.int64)
    seg_fixed[..., 10:30, 12:34] = 4
    seg_fixed[..., 30:40, 12:34] = 9
    seg_moving = torch.roll(seg_fixed, shifts=(3, -2), dims=(2, 3))
    batch = {"fixed": seg_fixed.float() / 9, "moving": seg_moving.float() / 9, "fixed_seg": seg_fixed,
             "moving_seg": seg_moving, "labels": torch.tensor([4, 9])}

    def gradient(dice_weight):
        net, recipe = build(voxelmorph, 2, dice_weight=dice_weight)
        with torch.no_grad():
            net.flow.weight.normal_(0, 0.01)
        terms = voxelmorph.loss_terms(net, batch, recipe)
        sum(weight * value for weight, value in terms.values()).backward()
        return terms, net, recipe, net.flow.weight.grad.clone()

    terms, _, _, without = gradient(0.0)
    assert "dice" not in terms
    terms, net, recipe, with_dice = gradient(0.01)
    assert terms["dice"][0] == 0.01
    u = voxelmorph.register(net, batch["fixed"], batch["moving"], recipe)
    expected = soft_dice_loss(one_hot(seg_fixed, batch["labels"]), warp(one_hot(seg_moving, batch["labels"]), u))
    torch.testing.assert_close(terms["dice"][1], expected)
    assert not torch.allclose(with_dice, without)


def test_short_training_lowers_the_loss_and_beats_identity(voxelmorph, small_embedded2d, tmp_path):
    torch.set_num_threads(2)
    recipe = voxelmorph.recipe("quick", {"iterations": 400, "checkpoint_every": 1000})
    run = short_training(voxelmorph, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 400
    assert run.trained_loss < run.untrained_loss - 0.01, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)


def test_a_channels_last_unet_stays_channels_last_through_its_skips():
    """The strided U-Net's full-resolution skip is its two-channel input, in the default layout when it is two
    one-channel images side by side; the decoder's concatenation must still be channels-last (else every
    convolution after it copies its input, forward and backward), with torch.cat's values."""
    layout = torch.channels_last
    torch.manual_seed(0)
    net = UNet(2, 2, [4, 8, 8], [[8], [8], [8], [8, 4]], downsampling="strided").to(memory_format=layout)
    moving, fixed = (torch.rand(1, 1, 12, 12).contiguous(memory_format=layout) for _ in range(2))
    x = torch.cat([moving, fixed], dim=1)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=layout)
    wide_inputs = []
    for module in net.decoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(lambda m, args: wide_inputs.append(args[0]))
    out = net(x)
    concatenated = [t for t in wide_inputs if t.shape[1] > 8]
    assert concatenated and all(t.is_contiguous(memory_format=layout) for t in concatenated)
    reference = UNet(2, 2, [4, 8, 8], [[8], [8], [8], [8, 4]], downsampling="strided")
    reference.load_state_dict(net.state_dict())
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_concat_channels_is_torch_cat_in_the_features_layout(ndim):
    layout = torch.channels_last if ndim == 2 else torch.channels_last_3d
    features = torch.rand(1, 3, *[5] * ndim).contiguous(memory_format=layout)
    skip = torch.rand(1, 2, *[5] * ndim)
    for order in ([features, skip], [skip, features]):
        joined = concat_channels(order)
        assert joined.is_contiguous(memory_format=layout) and torch.equal(joined, torch.cat(order, dim=1))
    assert concat_channels([skip, skip]).is_contiguous()   # nothing channels-last: torch.cat's layout
