"""Losses give the numbers a hand computation gives, in 2D and 3D, with the documented signs."""
import pytest
import torch

from regbench.blocks.losses import (GlobalNCC, LocalNCC, box_sum, global_ncc, gradient_smoothness, local_ncc,
                                    local_ncc_map, mse, one_hot, soft_dice_loss)


def textured(shape, seed=0):
    """Noise plus a smooth pattern: every 9^d window has variance, so no window is degenerate."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    pattern = sum(torch.sin(0.7 * g + k) for k, g in enumerate(grids))
    return (0.5 + 0.1 * pattern + 0.2 * torch.rand(shape, generator=generator, dtype=torch.float64))[None, None]


@pytest.mark.parametrize("shape", [(20, 23), (11, 12, 13)])
def test_box_sum_is_a_zero_padded_ones_convolution(shape):
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    ndim = len(shape)
    conv = torch.nn.functional.conv2d if ndim == 2 else torch.nn.functional.conv3d
    kernel = torch.ones(3, 1, *([5] * ndim), dtype=torch.float64)
    expected = conv(x, kernel, padding=2, groups=3)
    torch.testing.assert_close(box_sum(x, 5), expected)
    # a window wider than an axis still sums what lies inside it
    narrow = x[:, :, :4]
    wide = torch.ones(3, 1, *([9] * ndim), dtype=torch.float64)
    torch.testing.assert_close(box_sum(narrow, 9), conv(narrow, wide, padding=4, groups=3))


@pytest.mark.parametrize("shape, window", [((20, 23), (3, 7)), ((11, 12, 13), (1, 5, 3)), ((30,), (7,))])
def test_box_sum_takes_one_window_size_per_axis_and_works_in_1d(shape, window):
    """A window per axis sums over that many voxels along that axis (the 3D case leaves axis 0 alone, size 1);
    one spatial axis goes through its own branch (a grouped conv1d)."""
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    conv = [torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d][len(shape) - 1]
    kernel = torch.ones(3, 1, *window, dtype=torch.float64)
    expected = conv(x, kernel, padding=[w // 2 for w in window], groups=3)
    torch.testing.assert_close(box_sum(x, window), expected)
    if len(shape) == 2:  # the transposed window is another sum
        assert not torch.allclose(box_sum(x, window[::-1]), expected)


@pytest.mark.parametrize("shape", [(32, 30), (14, 15, 16)])
def test_local_ncc_of_an_image_with_itself_and_its_affine_copies_is_minus_one(shape):
    image = textured(shape)
    # cc = v^2 / (v^2 + eps) with window variances v of about 1: -1 up to eps
    assert local_ncc(image, image).item() == pytest.approx(-1.0, abs=1e-4)
    assert LocalNCC(window=9)(image, image).item() == pytest.approx(-1.0, abs=1e-4)
    # squared correlation: a change of contrast, rising or falling, still matches everywhere
    assert local_ncc(image, 3.0 * image).item() == pytest.approx(-1.0, abs=1e-4)
    assert local_ncc(image, -0.5 * image).item() == pytest.approx(-1.0, abs=1e-4)
    # and so does an offset, in every window that stays inside the image (the padding zeros are not offset)
    interior = (slice(None), slice(None)) + tuple(slice(4, s - 4) for s in shape)
    for affine in (3.0 * image + 0.5, -0.5 * image + 2.0):
        cc = local_ncc_map(image, affine)
        assert cc.shape == image.shape
        torch.testing.assert_close(cc[interior], torch.ones_like(cc[interior]), rtol=0, atol=1e-4)
        assert cc.min() < 0.999  # at the border the offset does count


def test_local_ncc_by_hand_on_a_window_covering_the_image():
    # 3x3 image and window 3: at the centre voxel the window is the whole image, so cc there is the
    # squared Pearson correlation of the two images; elsewhere the zeros of the padding enter the sums.
    i = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    j = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 2.0], [0.0, 3.0, 1.0]], dtype=torch.float64)

    def cc_by_hand(a, b):
        n = 9  # the window counts padded zeros too
        cross = (a * b).sum() - a.sum() * b.sum() / n
        var_a = (a * a).sum() - a.sum() ** 2 / n
        var_b = (b * b).sum() - b.sum() ** 2 / n
        return cross ** 2 / (var_a * var_b + 1e-5)

    padded_i = torch.nn.functional.pad(i, (1, 1, 1, 1))
    padded_j = torch.nn.functional.pad(j, (1, 1, 1, 1))
    values = [cc_by_hand(padded_i[r:r + 3, c:c + 3], padded_j[r:r + 3, c:c + 3]) for r in range(3) for c in range(3)]
    expected = -torch.stack(values).mean()
    torch.testing.assert_close(local_ncc(i[None, None], j[None, None], window=3), expected)
    torch.testing.assert_close(LocalNCC(window=3)(i[None, None], j[None, None]), expected)  # the module's window
    pearson = torch.corrcoef(torch.stack([i.flatten(), j.flatten()]))[0, 1]
    torch.testing.assert_close(values[4], pearson ** 2, atol=1e-5, rtol=1e-5)


def test_local_ncc_of_unrelated_noise_is_near_zero_and_its_gradient_is_finite():
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 64, 64, generator=generator)
    b = torch.rand(2, 1, 64, 64, generator=generator, requires_grad=True)
    # squared correlation of 81 independent pairs: about 1 / 80 on average inside the image
    assert local_ncc_map(a, b)[..., 4:-4, 4:-4].mean().item() == pytest.approx(1 / 80, rel=0.2)
    loss = local_ncc(a, b)
    loss.backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_local_ncc_map_compares_each_channel_of_each_image_with_its_own():
    """B = 2, C = 3: cc[b, c] is the map of fixed[b, c] against warped[b, c] alone, so channel c of image b
    matching (the identity pairs, cc = 1 inside) is not blurred by the other images or channels."""
    fixed = torch.cat([textured((24, 22), seed=s) for s in range(6)], dim=1).view(2, 3, 24, 22)
    warped = torch.rand(2, 3, 24, 22, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    warped[0, 1] = fixed[0, 1]
    warped[1, 2] = 2.0 * fixed[1, 2]
    cc = local_ncc_map(fixed, warped)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(cc[b, c], local_ncc_map(fixed[b:b + 1, c:c + 1], warped[b:b + 1, c:c + 1])[0, 0])
    interior = (slice(4, -4), slice(4, -4))
    assert cc[0, 1][interior].min() > 0.999 and cc[1, 2][interior].min() > 0.999
    assert cc[0, 0][interior].mean() < 0.1 and cc[1, 1][interior].mean() < 0.1  # noise: about 1 / 80


def test_local_ncc_rejects_bad_arguments():
    a = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        local_ncc(a, torch.rand(1, 1, 16, 15))
    with pytest.raises(ValueError, match="window"):
        local_ncc(a, a, window=4)


@pytest.mark.parametrize("shape", [(20, 17), (9, 8, 7)])
def test_global_ncc_is_pearson_correlation(shape):
    image = textured(shape)
    # exact up to eps = 1e-10 under the square root of var_I var_J (about 1e-4 here)
    assert global_ncc(image, image).item() == pytest.approx(-1.0, abs=1e-5)
    assert global_ncc(image, 4.0 * image - 1.0).item() == pytest.approx(-1.0, abs=1e-5)
    assert global_ncc(image, -2.0 * image + 1.0).item() == pytest.approx(1.0, abs=1e-5)
    other = textured(shape, seed=5)
    pearson = torch.corrcoef(torch.stack([image.flatten(), other.flatten()]))[0, 1]
    assert GlobalNCC()(image, other).item() == pytest.approx(-pearson.item(), abs=1e-5)
    assert global_ncc(image, other, eps=0.0).item() == pytest.approx(-pearson.item(), abs=1e-12)


def test_global_ncc_is_per_image_and_finite_on_a_constant_image():
    image = textured((16, 16))
    batch = torch.cat([image, image])
    partner = torch.cat([image, -image])  # CC +1 for the first image, -1 for the second
    assert global_ncc(batch, partner).item() == pytest.approx(0.0, abs=1e-9)
    assert global_ncc(batch, torch.cat([image, 2 * image])).item() == pytest.approx(-1.0, abs=1e-5)
    constant = torch.ones(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    loss = global_ncc(image, constant)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(constant.grad).all()


def test_mse_by_hand():
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    b = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert mse(a, b).item() == pytest.approx((1 + 0 + 4 + 9) / 4)
    assert mse(a, a).item() == 0.0


@pytest.mark.parametrize("shape", [(10, 12), (6, 7, 8)])
def test_gradient_smoothness_of_ramps_by_hand(shape):
    ndim, slope = len(shape), 0.3
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    # every component grows by `slope` along every axis: each axis mean is slope^2, and so is their mean
    everywhere = torch.stack([slope * sum(grids)] * ndim)[None]
    assert gradient_smoothness(everywhere).item() == pytest.approx(slope ** 2)
    assert gradient_smoothness(everywhere, penalty="l1").item() == pytest.approx(slope)
    # a ramp along axis 0 only: slope^2 on that axis, 0 on the others, averaged over ndim axes
    along_first = torch.stack([slope * grids[0]] * ndim)[None]
    assert gradient_smoothness(along_first).item() == pytest.approx(slope ** 2 / ndim)
    # and only one component of the field moving: the mean over channels halves (2D) or thirds (3D) it
    one_component = torch.zeros_like(along_first)
    one_component[:, 0] = slope * grids[0]
    assert gradient_smoothness(one_component).item() == pytest.approx(slope ** 2 / ndim / ndim)


def test_gradient_smoothness_of_a_constant_field_is_zero():
    u = torch.full((2, 3, 5, 6, 7), 4.2)
    assert gradient_smoothness(u).item() == 0.0
    assert gradient_smoothness(u, penalty="l1").item() == 0.0
    with pytest.raises(ValueError, match="penalty"):
        gradient_smoothness(u, penalty="l3")


def test_one_hot_picks_the_given_labels_in_order():
    seg = torch.tensor([[0, 3, 3], [7, 0, 5]]).view(1, 1, 2, 3)
    channels = one_hot(seg, torch.tensor([7, 3]))
    assert channels.shape == (1, 2, 2, 3) and channels.dtype == torch.float32
    assert channels[0, 0].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert channels[0, 1].tolist() == [[0, 1, 1], [0, 0, 0]]
    # label 5 and background are in no channel
    assert channels.sum().item() == 3
    with pytest.raises(ValueError, match="integer"):
        one_hot(seg.float(), [3])


def test_soft_dice_of_identical_maps_is_minus_one_and_of_disjoint_maps_zero():
    seg = torch.tensor([[1, 1, 2, 2], [1, 3, 3, 2], [3, 3, 3, 1]]).view(1, 1, 3, 4)
    labels = torch.tensor([1, 2, 3])
    onehot = one_hot(seg, labels)
    assert soft_dice_loss(onehot, onehot).item() == pytest.approx(-1.0)
    relabelled = one_hot(seg % 3 + 1, labels)  # 1 -> 2 -> 3 -> 1: no voxel keeps its label
    assert soft_dice_loss(onehot, relabelled).item() == 0.0


def test_soft_dice_by_hand_with_soft_values():
    # one label: overlap 2 * (1 * 0.5 + 1 * 1) = 3, sizes (2) + (1.5) = 3.5 -> dice 6/7; second image empty -> 0
    fixed = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    warped = torch.tensor([0.5, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert soft_dice_loss(fixed, warped).item() == pytest.approx(-6 / 7)
    batch = soft_dice_loss(torch.cat([fixed, torch.zeros_like(fixed)]), torch.cat([warped, torch.zeros_like(warped)]))
    assert batch.item() == pytest.approx(-3 / 7)
