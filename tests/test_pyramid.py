"""Registration pyramid: the cost volume, every loss term with its weight and phase, and training registers."""

import pytest
import torch

from regbench.blocks.cost_volume import correlation_offsets, cost_volume
from regbench.blocks.losses import gradient_smoothness, local_ncc, one_hot, present_label_dice_loss
from regbench.method import TRAINING_KEYS
from regbench.plugins import load_method
from regbench.blocks.spatial import warp
from regbench.training.loop import _set_learning_rate
from short_training import short_training

torch.set_num_threads(1)

#: a small network for the unit tests (the terms and the control flow are the recipe's)
SMALL = {"pyramid_channels": [4, 4, 4, 4], "dense_growth": [4, 4, 4, 4, 4], "upsampled_features": 4,
         "context_channels": [4, 4, 4, 4, 4, 4], "grid_size": 0}


@pytest.fixture(scope="module")
def pyramid():
    return load_method("pyramid")


@pytest.fixture(scope="module")
def module(pyramid):
    import sys
    return sys.modules[type(pyramid).__module__]


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", {**SMALL, **overrides})
    return method.build(ndim, recipe), recipe


def labelled_batch(shape, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fixed_seg = torch.zeros(batch, 1, *shape, dtype=torch.int64)
    fixed_seg[(..., slice(8, 24)) + (slice(6, 20),) * (len(shape) - 1)] = 3
    fixed_seg[(..., slice(24, 30)) + (slice(6, 20),) * (len(shape) - 1)] = 5
    moving_seg = torch.roll(fixed_seg, shifts=(2,) * len(shape), dims=tuple(range(2, 2 + len(shape))))
    noise = lambda: 0.1 * torch.rand(batch, 1, *shape, generator=generator)  # noqa: E731
    return {"fixed": fixed_seg.float() / 5 + noise(), "moving": moving_seg.float() / 5 + noise(),
            "fixed_seg": fixed_seg, "moving_seg": moving_seg, "labels": torch.tensor([3, 5])}


# ------------------------------------------------------------------------------------------- cost volume

@pytest.mark.parametrize("ndim, shift", [(2, (1, -2)), (2, (0, 0)), (3, (-1, 2, 1))])
def test_correlation_with_a_shifted_copy_peaks_at_the_shift(ndim, shift):
    generator = torch.Generator().manual_seed(ndim)
    shape = (12,) * ndim
    features = torch.randn(1, 8, *shape, generator=generator)
    features = features / features.norm(dim=1, keepdim=True)  # unit vectors: by Cauchy-Schwarz, only x matches x
    # moving(x) = features(x - s): the fixed feature at x sits at x + s in the moving map
    moving = torch.roll(features, shifts=shift, dims=tuple(range(2, 2 + ndim)))
    volume = cost_volume(features, moving, 2)
    offsets = correlation_offsets(2, ndim)
    assert volume.shape == (1, 5 ** ndim, *shape)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * ndim    # where neither roll nor padding reaches
    peak = volume[inner].argmax(dim=1)
    assert (peak == offsets.index(tuple(shift))).all()
    # at the peak the value is the channel mean of the squared features, by hand
    torch.testing.assert_close(volume[inner][:, offsets.index(tuple(shift))], features[inner].square().mean(1))


def test_cost_volume_by_hand_with_zero_padding():
    # one channel, 1 x 3 image [1, 2, 3] against [4, 5, 6], d = 1: offsets (dy, dx) in product order
    fixed = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    moving = torch.tensor([[[[4.0, 5.0, 6.0]]]])
    volume = cost_volume(fixed, moving, 1)
    assert correlation_offsets(1, 2)[3:6] == [(0, -1), (0, 0), (0, 1)]
    expected = torch.zeros(1, 9, 1, 3)
    expected[0, 3, 0] = torch.tensor([0.0, 2 * 4, 3 * 5])     # moving(x - 1), zero left of the image
    expected[0, 4, 0] = torch.tensor([1 * 4, 2 * 5, 3 * 6])
    expected[0, 5, 0] = torch.tensor([1 * 5, 2 * 6, 0.0])     # moving(x + 1), zero right of the image
    torch.testing.assert_close(volume, expected)              # rows above and below are padding: 0
    two_channels = cost_volume(torch.cat([fixed, 3 * fixed], 1), torch.cat([moving, moving], 1), 1)
    torch.testing.assert_close(two_channels, 2 * expected)    # (1 * m + 3 * m) / 2 channels


def test_cost_volume_makes_no_shifted_copies_forward_or_backward():
    # 3D, 16 channels, d = 2: an unfold or a stack of shifted copies would make 125 x 16 x 20^3 floats (64 MB);
    # the loop makes nothing larger than the volume itself, and keeps only the inputs for backward
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LargestStorage(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.untyped_storage().nbytes())
            return out

    fixed = torch.randn(1, 16, 20, 20, 20, requires_grad=True)
    moving = torch.randn(1, 16, 20, 20, 20, requires_grad=True)
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with LargestStorage() as largest, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        volume = cost_volume(fixed, moving, 2)
        volume.sum().backward()
    assert volume.shape == (1, 125, 20, 20, 20) and fixed.grad is not None and moving.grad is not None
    assert largest.largest <= volume.nbytes                  # 4 MB, the volume
    padded = 16 * 24 ** 3 * 4
    assert sum(storages.values()) <= fixed.nbytes + padded  # the fixed features and the padded moving, once each


def test_cost_volume_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        cost_volume(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="search_range"):
        cost_volume(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), -1)


# ------------------------------------------------------------------------------------- 'same' padding

def test_tf_same_padding_by_hand(module):
    # total = max((ceil(n / s) - 1) s + (k - 1) dilation + 1 - n, 0), the smaller half before
    assert module.tf_same_padding(8, 3, 2) == (0, 1)       # out 4: 3 * 2 + 3 - 8 = 1
    assert module.tf_same_padding(7, 3, 2) == (1, 1)       # out 4: 3 * 2 + 3 - 7 = 2
    assert module.tf_same_padding(6, 5, 2) == (1, 2)       # out 3: 2 * 2 + 5 - 6 = 3
    assert module.tf_same_padding(1, 3, 2) == (1, 1)
    assert module.tf_same_padding(9, 3, 1) == (1, 1)       # stride 1: symmetric, as padding=1
    assert module.tf_same_padding(9, 3, 1, dilation=4) == (4, 4)


@pytest.mark.parametrize("shape", [(6, 7), (8, 5, 6)])
def test_strided_convolution_pads_as_tensorflow_same(module, shape):
    ndim = len(shape)
    x = torch.arange(float(torch.Size(shape).numel())).reshape(1, 1, *shape)
    layer = module._conv_layer(ndim, 1, 1, stride=2)
    conv = next(m for m in layer.modules() if isinstance(m, getattr(torch.nn, f"Conv{ndim}d")))
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[(0, 0) + (1,) * ndim] = 1.0                # the centre tap: out[i] = padded input[2i + 1]
    out = layer(x)
    assert out.shape[2:] == tuple((n + 1) // 2 for n in shape)
    # output voxel i sits on input 2i + 1 along an even axis (TF pads after), on 2i along an odd one
    centres = [torch.arange(m) * 2 + (1 if n % 2 == 0 else 0) for m, n in zip(out.shape[2:], shape)]
    torch.testing.assert_close(out[0, 0], x[0, 0][torch.meshgrid(*centres, indexing="ij")])
    # any kernel: an explicit F.pad with TF's (before, after) per axis, then a valid convolution
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    x = torch.rand(2, 1, *shape)
    pads = {6: (0, 1), 7: (1, 1), 8: (0, 1), 5: (1, 1)}
    padded = torch.nn.functional.pad(x, [p for n in reversed(shape) for p in pads[n]])
    expected = getattr(torch.nn.functional, f"conv{ndim}d")(padded, conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(layer(x), expected)


def test_feature_pyramid_downsamples_with_tensorflow_padding(pyramid, module):
    net, _ = build(pyramid, 2)
    first = net.pyramid.levels[0][0]                          # CBlock(stride 2) of level 1
    pad, conv = first[0]
    assert isinstance(pad, module.TFSamePad) and conv.stride == (2, 2) and conv.padding == (0, 0)
    assert all(block[0].padding == (1, 1) for level in net.pyramid.levels for block in list(level)[1:])


# ---------------------------------------------------------------------------------------- loss terms

def test_affine_penalties_and_activity_by_hand(module):
    a = torch.zeros(2, 12)
    assert float(module.affine_penalty(a, "intended")) == 0.0
    assert float(module.affine_penalty(a, "coded")) == pytest.approx(3 / 12)   # (0 - 1)^2 on the 3 diagonal entries
    a = torch.tensor([[1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], [0.5, 0, 0, 2.0, 0, 0, 0, 0, 0, 0, 0, -1.0]])
    assert float(module.affine_penalty(a, "coded")) == pytest.approx((0 + (0.25 + 1 + 1 + 4 + 1)) / 24)
    assert float(module.affine_penalty(a, "intended")) == pytest.approx((3 + 0.25 + 4 + 1) / 24)
    assert float(module.affine_activity(a)) == pytest.approx((3 + 3.5) / 2)       # mean over the batch of sum |a|
    assert float(module.affine_penalty(torch.ones(1, 6), "coded")) == pytest.approx(4 / 6)  # 2D: vec[I|0] of 2 x 3
    with pytest.raises(ValueError, match="affine_penalty"):
        module.affine_penalty(a, "code")


def test_affine_acts_on_the_displacement_vectors(module):
    flow = torch.zeros(1, 2, 4, 5)
    flow[:, 0], flow[:, 1] = 1.0, 2.0
    a = torch.tensor([[0.5, 1.0, 3.0, 0.0, -1.0, -4.0]])       # T = [[1.5, 1], [0, 0]], t = (3, -4)
    out = module.apply_affine_to_flow(a, flow)
    torch.testing.assert_close(out[:, 0], torch.full((1, 4, 5), 1.5 * 1 + 1 * 2 + 3.0))
    torch.testing.assert_close(out[:, 1], torch.full((1, 4, 5), -4.0))


def test_present_label_dice_by_hand():
    fixed = torch.zeros(1, 3, 4, 4)
    warped = torch.zeros(1, 3, 4, 4)
    fixed[0, 0, :2] = 1          # 8 voxels
    warped[0, 0, 1:3] = 1        # 8 voxels, 4 shared: dice 0.5
    fixed[0, 1, 0, 0] = 1        # 1 voxel, missing from warped: dice 0
    warped[0, 2] = 0.5           # absent from fixed: not counted
    eps = 1e-5
    expected = 1 - ((8 + eps) / (16 + eps) + eps / (1 + eps)) / 2
    assert float(present_label_dice_loss(fixed, warped)) == pytest.approx(expected)
    assert float(present_label_dice_loss(fixed, fixed)) == pytest.approx(0.0, abs=1e-6)
    assert float(present_label_dice_loss(torch.zeros(1, 2, 4, 4), warped[:, :2])) == 0.0


def test_recipes_hold_the_papers_numbers(pyramid):
    paper, quick = pyramid.recipe("paper"), pyramid.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    halving = [1, 0.5, 0.25, 0.125, 0.0625]
    assert paper["similarity_weights"] == [5 * w for w in halving]
    assert paper["smoothness_weights"] == [[2 * w for w in halving], [10 * w for w in halving], list(halving)]
    assert paper["affine_weights"] == [[0] * 5, [1, 2, 4, 8, 16], [0] * 5]
    assert (paper["dice_weight"], paper["weight_decay"], paper["affine_activity_weight"]) == (5.0, 1e-3, 0.1)
    assert (paper["pyramid_channels"], paper["dense_growth"]) == ([16, 32, 32, 32], [64, 64, 32, 16, 8])
    assert (paper["search_range"], paper["ncc_window"], paper["grid_size"], paper["context"]) == (2, 9, 64, "coarsest")
    assert paper["affine_penalty"] == "intended"
    assert [stage_lr * paper["lr"] for stage_lr in paper["phase_lr_factors"]] == [1e-4, 5e-5, 5e-5]
    # steps of the scripts at batch 1: 500 epochs x 3 x 50 pairs, 100 x 3 x 300, 100 x 300
    assert paper["phase_iterations"] == [75_000, 90_000, 30_000] and paper["iterations"] == 195_000
    assert paper["phase_lr_schedules"] == ["constant", "constant", "halving"]
    # the quick recipe keeps every weighted term (and all three phases)
    for key in ("similarity_weights", "smoothness_weights", "affine_weights", "dice_weight", "weight_decay",
                "affine_activity_weight", "phases", "phase_iterations", "phase_lr_factors", "phase_lr_schedules",
                "affine_penalty", "search_range"):
        assert quick[key] == paper[key], key


def test_phases_scale_to_the_iterations_and_switch_the_weights(pyramid):
    net, recipe = build(pyramid, 2, iterations=195)
    stages = pyramid.training_stages(net, recipe)
    # the scripts' 75k : 90k : 30k steps; the fine-tuning's rate rises at mid-phase, so it is two stages
    assert [(s.name, s.iterations) for s in stages] == [("pretrain", 75), ("multitask", 90), ("finetune", 15),
                                                        ("finetune-restart", 15)]
    assert [s.lr for s in stages] == [recipe["lr"], recipe["lr"] / 2, recipe["lr"] / 2, recipe["lr"] / 4]
    batch = labelled_batch((32, 32))
    for index, phase in enumerate([0, 1, 2, 2]):
        pyramid.start_stage(net, index, recipe)
        terms = pyramid.loss_terms(net, batch, recipe)
        assert [terms[f"smoothness_{level}"][0] for level in range(5)] == recipe["smoothness_weights"][phase]
        assert [terms[f"affine_{level}"][0] for level in range(5)] == recipe["affine_weights"][phase]


def test_smoothness_scale_multiplies_every_phase_and_level(pyramid):
    """The one knob tuning turns: 1 is the code's weights, 2 doubles each of them."""
    net, recipe = build(pyramid, 2, iterations=195, smoothness_scale=2.0)
    batch = labelled_batch((32, 32))
    for index, phase in enumerate([0, 1]):
        pyramid.start_stage(net, index, recipe)
        terms = pyramid.loss_terms(net, batch, recipe)
        assert [terms[f"smoothness_{level}"][0] for level in range(5)] == \
            [2.0 * w for w in recipe["smoothness_weights"][phase]]


def test_fine_tuning_rate_follows_the_scripts_schedule(pyramid):
    # LR_scheduler of train_tf_task2.py: per tenth of the phase 1, 1/2, 1/4, 1/8, 1/16, 1/2, 1/4, 1/8, 1/16, 1/16
    net, recipe = build(pyramid, 2, iterations=200, phase_iterations=[0, 0, 1])
    optimiser = torch.optim.Adam(net.parameters(), lr=1.0)
    rates = []
    for stage in pyramid.training_stages(net, recipe):
        for step in range(stage.iterations):
            _set_learning_rate(optimiser, stage, recipe, step)
            rates.append(optimiser.param_groups[0]["lr"])
    tenths = [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16]
    assert rates == pytest.approx([recipe["lr"] / 2 * tenths[step // 20] for step in range(200)])
    constant = build(pyramid, 2, iterations=200, phase_iterations=[0, 0, 1],
                     phase_lr_schedules=["constant"] * 3)
    assert [(s.name, s.iterations, s.lr_decay) for s in pyramid.training_stages(*constant)] == [("finetune", 200, None)]


def test_a_phase_without_steps_is_skipped(pyramid):
    net, recipe = build(pyramid, 2, iterations=10, phase_iterations=[0, 1, 1], phase_lr_schedules=["constant"] * 3)
    assert [(s.name, s.iterations) for s in pyramid.training_stages(net, recipe)] == [("multitask", 5), ("finetune", 5)]
    pyramid.start_stage(net, 0, recipe)
    assert net.phase == 1


def test_normalisation_and_flips_by_hand(module):
    fixed = torch.tensor([[[[2.0, 4.0], [3.0, 3.0]]]])
    moving = torch.tensor([[[[1.0, 5.0], [3.0, 3.0]]]])
    joint = module._normalise(fixed, moving, "joint")
    torch.testing.assert_close(joint[1], torch.tensor([[[[-0.5, 1.5], [0.5, 0.5]]]]))   # the fixed image's range
    separate = module._normalise(fixed, moving, "separate")
    torch.testing.assert_close(separate[0], torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]]))
    torch.testing.assert_close(separate[1], torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]]))
    images = [torch.rand(1, 1, 4, 5) for _ in range(4)]
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = module._flip_and_swap(images)
        swap = any(torch.equal(out[0], x) for x in (images[1], images[1].flip(2), images[1].flip(3)))
        source = [images[1], images[0], images[3], images[2]] if swap else images
        axes = [a for a in (None, 2, 3) if torch.equal(out[0], source[0] if a is None else source[0].flip(a))]
        assert len(axes) == 1
        flip = (lambda x: x) if axes[0] is None else (lambda x: x.flip(axes[0]))  # noqa: E731
        assert all(torch.equal(o, flip(x)) for o, x in zip(out, source))           # labels follow their images
        seen.add((swap, axes[0]))
    assert len(seen) == 6                                                           # no flip / either axis, both ways


def test_loss_terms_are_every_recipe_term_with_its_value(pyramid):
    net, recipe = build(pyramid, 2, phases=["pretrain", "multitask", "finetune"])
    pyramid.start_stage(net, 1, recipe)
    batch = labelled_batch((32, 32), batch=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for affine in net.affine:      # non-trivial affine outputs, so that every affine term is non-zero
            affine.dense.bias.normal_(0, 0.05)
    net.eval()                         # the same forward pass twice
    terms = pyramid.loss_terms(net, batch, recipe)
    levels = range(5)
    expected_names = {f"{term}_{level}" for term in ("similarity", "smoothness", "affine", "affine_activity")
                      for level in levels} | {"dice", "weight_decay"}
    assert set(terms) == expected_names          # a dropped term fails here
    out = net(batch["fixed"], batch["moving"])
    for level in levels:
        flow = out.flows[level]
        size = flow.shape[2:]
        assert size == (32 // 2 ** level,) * 2
        def resize(x, size=size):
            return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=True)

        warped = warp(resize(batch["moving"]), flow, padding_mode="border")
        assert terms[f"similarity_{level}"][0] == 5 * 0.5 ** level
        torch.testing.assert_close(terms[f"similarity_{level}"][1], local_ncc(resize(batch["fixed"]), warped, 9))
        assert terms[f"smoothness_{level}"][0] == 10 * 0.5 ** level
        torch.testing.assert_close(terms[f"smoothness_{level}"][1], gradient_smoothness(flow))
        a = out.affines[level]
        assert terms[f"affine_{level}"][0] == 2.0 ** level
        torch.testing.assert_close(terms[f"affine_{level}"][1], a.square().mean())
        assert terms[f"affine_activity_{level}"][0] == 0.1
        torch.testing.assert_close(terms[f"affine_activity_{level}"][1], a.abs().sum(1).mean())
        for term in ("similarity", "smoothness", "affine", "affine_activity"):
            assert float(terms[f"{term}_{level}"][1].detach()) != 0
    labels = batch["labels"]
    warped_onehot = warp(one_hot(batch["moving_seg"], labels), out.displacement, padding_mode="border")
    assert terms["dice"][0] == 5.0
    expected_dice = present_label_dice_loss(one_hot(batch["fixed_seg"], labels), warped_onehot)
    torch.testing.assert_close(terms["dice"][1], expected_dice)
    kernels = sum(p.square().sum() for name, p in net.named_parameters() if name.endswith("weight") and p.ndim == 4)
    context_bias = net.context["4"].layers[-1].bias.square().sum()
    assert terms["weight_decay"][0] == 1e-3
    torch.testing.assert_close(terms["weight_decay"][1], kernels + context_bias)
    coded = pyramid.loss_terms(net, batch, {**recipe, "affine_penalty": "coded"})
    torch.testing.assert_close(coded["affine_2"][1], (out.affines[2] - torch.eye(2, 3).reshape(1, 6)).square().mean())


@pytest.mark.parametrize("term", ["similarity_0", "smoothness_3", "affine_2", "affine_activity_4", "dice",
                                  "weight_decay"])
def test_every_term_moves_the_gradient(pyramid, term):
    # dropping any one weighted term (weight 0) changes the gradient of the network
    batch = labelled_batch((32, 32))

    def gradient(drop):
        net, recipe = build(pyramid, 2)
        pyramid.start_stage(net, 1, recipe)
        with torch.no_grad():
            for affine in net.affine:
                affine.dense.bias.normal_(0, 0.05)
        terms = pyramid.loss_terms(net, batch, recipe)
        total = sum(weight * value for name, (weight, value) in terms.items() if name != drop)
        total.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    assert not torch.allclose(gradient(None), gradient(term), atol=1e-7)


# ------------------------------------------------------------------------------------------ network

@pytest.mark.parametrize("shape", [(32, 32), (37, 50), (17, 20, 24)])
def test_displacement_has_the_fixed_image_shape(pyramid, shape):
    ndim = len(shape)
    net, recipe = build(pyramid, ndim)
    batch = {"fixed": torch.rand(2, 1, *shape), "moving": torch.rand(2, 1, *shape)}
    u = pyramid.register(net, batch["fixed"], batch["moving"], recipe)
    assert u.shape == (2, ndim, *shape) and torch.isfinite(u).all()
    terms = pyramid.loss_terms(net, batch, {**recipe, "dice_weight": 0.0})
    assert "dice" not in terms and all(torch.isfinite(value) for _, value in terms.values())
    assert len(correlation_offsets(recipe["search_range"], ndim)) == 5 ** ndim


def test_working_grid_resizes_the_flow_back(pyramid):
    net, recipe = build(pyramid, 2, grid_size=32)
    net.eval()
    fixed, moving = torch.rand(1, 1, 63, 63), torch.rand(1, 1, 63, 63)
    u = pyramid.register(net, fixed, moving, recipe)
    def shrink(x):
        return torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=True)

    small = net(shrink(fixed), shrink(moving)).displacement
    assert u.shape == (1, 2, 63, 63)
    torch.testing.assert_close(u[..., ::2, ::2], 2 * small)    # grid point 2k is working voxel k, vectors x 62/31


def test_coarsest_level_affine_is_a_translation(pyramid):
    net, recipe = build(pyramid, 2)
    net.eval()
    with torch.no_grad():
        net.affine[4].dense.bias.copy_(torch.tensor([0.3, 0.1, 1.5, 0.2, -0.4, -2.0]))
    seen = {}
    net.estimator[4].register_forward_pre_hook(lambda module, args: seen.update(z=args[0]))
    net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    affine_flow = seen["z"][:, 25 + 4:25 + 4 + 2]   # [cost volume (25), features (4), affine flow (2)]
    torch.testing.assert_close(affine_flow[:, 0], torch.full((1, 2, 2), 1.5))   # the translation t = (1.5, -2)
    torch.testing.assert_close(affine_flow[:, 1], torch.full((1, 2, 2), -2.0))


@pytest.mark.parametrize("context, levels", [("coarsest", ["4"]), ("finest", ["0"]), ("every", list("01234")),
                                             ("none", [])])
def test_context_network_where_asked(pyramid, context, levels):
    net, _ = build(pyramid, 2, context=context)
    assert sorted(net.context) == levels


def test_affine_blocks_start_at_zero(pyramid):
    net, _ = build(pyramid, 3)
    assert all(not block.dense.weight.any() and not block.dense.bias.any() for block in net.affine)
    assert [block.dense.out_features for block in net.affine] == [12] * 5


def test_bad_recipes_and_batches_are_named(pyramid):
    with pytest.raises(ValueError, match="similarity_weights"):
        build(pyramid, 2, similarity_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="phase_iterations"):
        build(pyramid, 2, phase_iterations=[1, 1])
    with pytest.raises(ValueError, match="context"):
        build(pyramid, 2, context="last")
    net, recipe = build(pyramid, 2)
    with pytest.raises(ValueError, match="segmentations"):
        pyramid.loss_terms(net, {"fixed": torch.rand(1, 1, 32, 32), "moving": torch.rand(1, 1, 32, 32)}, recipe)
    with pytest.raises(ValueError, match="too small"):
        pyramid.register(net, torch.rand(1, 1, 16, 32), torch.rand(1, 1, 16, 32), recipe)


# ----------------------------------------------------------------------------------------- training


def test_short_training_lowers_the_loss_and_beats_identity(pyramid, small_embedded2d, tmp_path):
    recipe = pyramid.recipe("quick", {"iterations": 400, "checkpoint_every": 1000})
    run = short_training(pyramid, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 400
    assert run.trained_loss < run.untrained_loss - 0.5, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)
