"""Spatial transforms: warps move images by the right amount, integration and composition are exact."""
import math

import pytest
import torch

from regbench.blocks.spatial import (compose_displacements, identity_grid, integrate_velocity, resize_displacement,
                                     warp, warp_labels)


def smooth_field(shape, amplitude, seed):
    """A smooth random displacement (B=1): coarse noise upsampled linearly."""
    generator = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    coarse = torch.randn(1, ndim, *([4] * ndim), generator=generator) * amplitude
    mode = "bilinear" if ndim == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(12, 15), (8, 10, 9)])
def test_constant_displacement_shifts_by_that_many_voxels(shape):
    ndim = len(shape)
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    shift = [2, -1, 3][:ndim]
    u = torch.zeros(1, ndim, *shape, dtype=torch.float64)
    for axis, s in enumerate(shift):
        u[:, axis] = s
    warped = warp(image, u)
    # warped(x) = image(x + shift): compare where x + shift stays inside the grid
    dst = tuple(slice(max(0, -s), size - max(0, s)) for s, size in zip(shift, shape))
    src = tuple(slice(d.start + s, d.stop + s) for d, s in zip(dst, shift))
    torch.testing.assert_close(warped[(0, 0) + dst], image[(0, 0) + src], rtol=0, atol=1e-12)
    # outside the grid: zeros
    outside = torch.ones(shape, dtype=torch.bool)
    outside[dst] = False
    assert warped[0, 0][outside].abs().max() < 1e-12


def test_half_voxel_shift_interpolates_linearly():
    image = torch.arange(10.0, dtype=torch.float64).view(1, 1, 10, 1).expand(1, 1, 10, 3).contiguous()
    u = torch.zeros(1, 2, 10, 3, dtype=torch.float64)
    u[:, 0] = 0.5
    warped = warp(image, u)
    torch.testing.assert_close(warped[0, 0, :9, 1], torch.arange(9.0, dtype=torch.float64) + 0.5)


def test_warp_labels_keeps_integer_values():
    labels = torch.tensor([[0, 3, 3, 7], [0, 3, 7, 7], [1000, 1000, 7, 0]]).view(1, 1, 3, 4)
    u = torch.zeros(1, 2, 3, 4)
    u[:, 1] = 1.0  # sample one column to the right
    warped = warp_labels(labels, u)
    assert warped.dtype == labels.dtype
    assert torch.equal(warped[0, 0, :, :3], labels[0, 0, :, 1:])
    # 0.6 of a column: nearest takes the next column (linear interpolation would give 0.4 * 3 + 0.6 * 7 = 5.4 -> 5,
    # a label that is not there); the last column samples 3.6 -> 4, outside the image: 0
    u[:, 1] = 0.6
    warped = warp_labels(labels, u)
    assert torch.equal(warped[0, 0, :, :3], labels[0, 0, :, 1:])
    assert torch.equal(warped[0, 0, :, 3], torch.zeros(3, dtype=labels.dtype))


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_integrating_zero_gives_zero_and_constant_gives_translation(shape):
    ndim = len(shape)
    zero = torch.zeros(1, ndim, *shape, dtype=torch.float64)
    assert integrate_velocity(zero).abs().max() == 0
    constant = torch.zeros(1, ndim, *shape, dtype=torch.float64)
    constant[:, 0] = 1.5
    constant[:, -1] = -0.75
    # a constant velocity is a translation: exp(v) = id + v, exactly (border padding keeps it constant)
    torch.testing.assert_close(integrate_velocity(constant, steps=7), constant, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(17, 13), (9, 11, 7)])
def test_integrating_a_linear_contraction_by_hand(shape):
    """v_k = a_k (x_k - c_k): each squaring maps u = b (x - c) to u + u(x + u) = ((1 + b)^2 - 1)(x - c), so after
    n steps from b = a / 2^n the displacement is ((1 + a / 2^n)^(2^n) - 1)(x - c), near e^a - 1. A contraction
    (a < 0) samples inside the grid only, where linear interpolation of a linear field is exact."""
    ndim, steps = len(shape), 7
    grid = identity_grid(shape, dtype=torch.float64)
    rates = [-0.5, -1.0, -0.25][:ndim]
    centres = [(s - 1) / 2 for s in shape]
    velocity = torch.stack([a * (grid[k] - c) for k, (a, c) in enumerate(zip(rates, centres))])[None]
    expected = torch.stack([((1 + a / 2 ** steps) ** 2 ** steps - 1) * (grid[k] - c)
                            for k, (a, c) in enumerate(zip(rates, centres))])[None]
    torch.testing.assert_close(integrate_velocity(velocity, steps=steps), expected, rtol=0, atol=1e-12)
    # the exponential, not the velocity: e^-0.5 - 1 = -0.393 per voxel from the centre along axis 0, not -0.5
    assert expected[0, 0][(0,) * ndim].item() == pytest.approx((math.exp(-0.5) - 1) * -centres[0], rel=0.01)
    torch.testing.assert_close(integrate_velocity(velocity, steps=0), velocity, rtol=0, atol=0)


@pytest.mark.parametrize("shape, amplitude", [((48, 40), 2.0), ((32, 32, 32), 1.0)])
def test_deformation_composed_with_its_inverse_is_identity(shape, amplitude):
    velocity = smooth_field(shape, amplitude, seed=0).double()
    forward = integrate_velocity(velocity)
    inverse = integrate_velocity(-velocity)
    residual = compose_displacements(outer=inverse, inner=forward)
    interior = (slice(None), slice(None)) + tuple(slice(4, s - 4) for s in shape)
    largest = forward.abs().max()
    assert largest > 3.0  # a real deformation of several voxels, not a trivial one
    # what is left is linear-interpolation error: a few hundredths of a voxel
    assert residual[interior].abs().mean() < 0.01 * largest
    assert residual[interior].abs().max() < 0.05 * largest


def test_composition_order_matches_successive_warps():
    shape = (40, 36)
    outer = smooth_field(shape, 1.0, seed=1).double()
    inner = smooth_field(shape, 1.0, seed=2).double()
    grid = identity_grid(shape, dtype=torch.float64)
    image = (torch.sin(grid[0] / 5) * torch.cos(grid[1] / 7))[None, None]
    twice = warp(warp(image, outer), inner)
    once = warp(image, compose_displacements(outer, inner))
    interior = (0, 0, slice(8, -8), slice(8, -8))
    assert (twice - once)[interior].abs().max() < 0.01


def test_resize_displacement_rescales_vectors():
    """Corner-aligned factors (S_new - 1) / (S_old - 1) per axis: 16/8 = 2 along axis 0, 24/16 = 1.5 along axis 1
    (different, so a factor applied to the wrong axis, or S_new / S_old = 1.89 and 1.47, fails)."""
    shape, size = (9, 17), (17, 25)
    # a linear field u(x) = 0.1 * x along axis 0 stays the same linear map in physical terms
    grid = identity_grid(shape, dtype=torch.float64)
    u = torch.zeros(1, 2, *shape, dtype=torch.float64)
    u[0, 0] = 0.1 * grid[0]
    u[0, 1] = 2.0
    big = resize_displacement(u, size)
    big_grid = identity_grid(size, dtype=torch.float64)
    torch.testing.assert_close(big[0, 0], 0.1 * big_grid[0])
    torch.testing.assert_close(big[0, 1], torch.full(size, 2.0 * 1.5, dtype=torch.float64))


def test_one_image_is_warped_by_each_displacement_of_a_batch():
    """A moving image of batch 1 against a batch of 2 fields: item b is the image moved by field b."""
    image = torch.rand(1, 1, 10, 8, dtype=torch.float64)
    u = torch.zeros(2, 2, 10, 8, dtype=torch.float64)
    u[0, 0] = 2.0   # item 0: image(x + 2 e_0)
    u[1, 1] = -1.0  # item 1: image(x - e_1)
    warped = warp(image, u)
    assert warped.shape == (2, 1, 10, 8)
    torch.testing.assert_close(warped[0, 0, :8], image[0, 0, 2:], rtol=0, atol=1e-12)
    torch.testing.assert_close(warped[1, 0, :, 1:], image[0, 0, :, :-1], rtol=0, atol=1e-12)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="channels"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="grid"):
        warp(torch.rand(1, 1, 8, 9), torch.zeros(1, 2, 8, 8))
