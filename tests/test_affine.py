"""regbench.blocks.affine: the I + W, b parameterisation about the centre, its field, and VTN's two penalties."""
import math

import pytest
import torch

from regbench.blocks.affine import (affine_displacement, affine_matrix, centred_grid, compose_affine, determinant_loss,
                                    orthogonality_loss)
from regbench.blocks.spatial import compose_displacements, warp


def rotation_2d(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[[c, -s], [s, c]]], dtype=torch.float64)


def rotation_3d(seed):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q[None]


def test_centred_grid_is_zero_at_the_centre():
    grid = centred_grid((5, 4))
    assert grid.shape == (2, 5, 4)
    assert grid[:, 2, 0].tolist() == [0.0, -1.5] and grid[:, 0, 3].tolist() == [-2.0, 1.5]
    assert centred_grid((3, 3, 3))[:, 1, 1, 1].abs().sum() == 0


def test_affine_displacement_is_W_x_centred_plus_b():
    W = torch.tensor([[[0.1, 0.2], [-0.3, 0.05]]])
    b = torch.tensor([[1.0, -2.0]])
    u = affine_displacement(W, b, (5, 7))          # centre (2, 3)
    assert u.shape == (1, 2, 5, 7)
    torch.testing.assert_close(u[0, :, 2, 3], b[0])  # the centre moves by b
    # voxel (4, 0): x_c = (2, -3); u = (0.1*2 + 0.2*-3 + 1, -0.3*2 + 0.05*-3 - 2) = (0.6, -2.75)
    torch.testing.assert_close(u[0, :, 4, 0], torch.tensor([0.6, -2.75]))
    # 3D: 12 parameters, row k of W makes channel k
    W3 = torch.zeros(2, 3, 3)
    W3[1, 2, 0] = 0.5
    b3 = torch.zeros(2, 3)
    u3 = affine_displacement(W3, b3, (4, 3, 5))
    assert u3.shape == (2, 3, 4, 3, 5) and u3[0].abs().max() == 0
    torch.testing.assert_close(u3[1, 2], 0.5 * (torch.arange(4.0) - 1.5).view(4, 1, 1).expand(4, 3, 5))
    assert u3[1, :2].abs().max() == 0


def test_a_translation_shifts_and_a_rotation_turns_about_the_centre():
    image = torch.zeros(1, 1, 9, 9)
    image[..., 2, 6] = 1.0
    shifted = warp(image, affine_displacement(torch.zeros(1, 2, 2), torch.tensor([[-1.0, 2.0]]), (9, 9)))
    assert shifted[0, 0, 3, 4] == 1.0 and shifted.sum() == 1.0   # out(x) = image(x + b)
    # a quarter turn about the centre (4, 4): out(x) = image(R x_c + c)
    W = rotation_2d(math.pi / 2).float() - torch.eye(2)
    turned = warp(image, affine_displacement(W, torch.zeros(1, 2), (9, 9)))
    # R (a, b) = (-b, a): at (i, j) = (6, 6), R (2, 2) + (4, 4) = (2, 6), where the bright voxel is
    assert turned[0, 0, 6, 6] == pytest.approx(1.0, abs=1e-5) and turned.sum() == pytest.approx(1.0, abs=1e-5)


def test_compose_affine_is_the_exact_composition():
    torch.manual_seed(0)
    shape = (20, 24)
    W, b = 0.05 * torch.randn(1, 2, 2), torch.randn(1, 2)
    outer = affine_displacement(W, b, shape)
    inner = torch.nn.functional.interpolate(torch.randn(1, 2, 4, 4), size=shape, mode="bilinear", align_corners=True)
    exact = compose_affine(W, outer, inner)
    # u_inner(x) + u_affine(x + u_inner(x)), evaluated in closed form
    positions = centred_grid(shape)[None] + inner
    expected = inner + torch.einsum("bij,bj...->bi...", W, positions) + b.view(1, 2, 1, 1)
    torch.testing.assert_close(exact, expected)
    # the sampled composition agrees where x + u_inner(x) stays inside the grid
    sampled = compose_displacements(outer, inner)
    grid = centred_grid(shape)[None] + torch.tensor([9.5, 11.5]).view(1, 2, 1, 1) + inner
    inside = ((grid[:, 0] >= 0) & (grid[:, 0] <= 19) & (grid[:, 1] >= 0) & (grid[:, 1] <= 23))[:, None]
    torch.testing.assert_close(sampled * inside, exact * inside, atol=1e-4, rtol=0)


@pytest.mark.parametrize("matrix", [rotation_2d(0.0), rotation_2d(0.3), rotation_2d(-2.0), rotation_3d(1), rotation_3d(2),
                                    torch.eye(3, dtype=torch.float64)[None]])
def test_both_penalties_vanish_for_a_rotation(matrix):
    assert orthogonality_loss(matrix).item() == pytest.approx(0.0, abs=1e-9)
    assert determinant_loss(matrix).item() == pytest.approx(0.0, abs=1e-12)


def test_a_shear_is_penalised_by_orthogonality_only():
    shear = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    # singular values of [[1, k], [0, 1]]: lambda1^2 + lambda2^2 = tr(A^T A) = 2 + k^2 and lambda1 lambda2 = 1,
    # so sum(lambda^2 + lambda^-2) = 2 (2 + k^2) and the loss is 2 k^2 = 0.5
    assert orthogonality_loss(shear).item() == pytest.approx(0.5, rel=1e-4)
    assert determinant_loss(shear).item() == pytest.approx(0.0, abs=1e-12)   # det 1: volume kept
    shear3 = torch.eye(3, dtype=torch.float64)[None].clone()
    shear3[0, 0, 2] = 0.5
    assert orthogonality_loss(shear3).item() == pytest.approx(0.5, rel=1e-4)
    assert determinant_loss(shear3).item() == pytest.approx(0.0, abs=1e-12)


def test_scalings_and_reflections_by_hand():
    # uniform scaling by s in 2D: 2 (s^2 + s^-2) - 4; det s^2
    for s in (0.5, 1.1, 2.0):
        A = s * torch.eye(2, dtype=torch.float64)[None]
        assert orthogonality_loss(A).item() == pytest.approx(2 * (s ** 2 + s ** -2) - 4, rel=1e-4, abs=1e-6)
        assert determinant_loss(A).item() == pytest.approx(0.5 * (s ** 2 - 1) ** 2)
    # 3D, one axis doubled: ortho 4 + 1/4 - 2 = 2.25, det loss 1/2 (2 - 1)^2 = 0.5
    A = torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))[None]
    assert orthogonality_loss(A).item() == pytest.approx(2.25, rel=1e-4)
    assert determinant_loss(A).item() == pytest.approx(0.5)
    # a reflection is orthogonal (ortho 0), but det -1: the determinant loss forbids it with 1/2 * 4 = 2
    reflection = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))[None]
    assert orthogonality_loss(reflection).item() == pytest.approx(0.0, abs=1e-9)
    assert determinant_loss(reflection).item() == pytest.approx(2.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_orthogonality_loss_is_the_singular_value_formula(ndim):
    A = torch.eye(ndim, dtype=torch.float64) + 0.3 * torch.randn(5, ndim, ndim, dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(ndim))
    sigma = torch.linalg.svdvals(A)
    expected = (sigma ** 2 + sigma ** -2).sum(-1) - 2 * ndim
    assert orthogonality_loss(A, eps=0.0).item() == pytest.approx(expected.mean().item(), rel=1e-9)
    assert orthogonality_loss(A).item() == pytest.approx(expected.mean().item(), rel=1e-3)   # eps = 1e-5
    # the batch reduction is a mean, for both
    assert determinant_loss(A).item() == pytest.approx((0.5 * (torch.linalg.det(A) - 1) ** 2).mean().item())


def test_penalties_are_minimal_and_finite_at_the_identity():
    W = torch.zeros(2, 3, 3, requires_grad=True)
    (orthogonality_loss(affine_matrix(W)) + determinant_loss(affine_matrix(W))).backward()
    assert torch.isfinite(W.grad).all() and W.grad.abs().max() < 1e-4
    # a singular matrix gives a large but finite orthogonality loss (C = A^T A + eps I stays invertible)
    assert 1e4 < orthogonality_loss(torch.zeros(1, 2, 2)).item() < 1e6


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="W must be B x d x d"):
        affine_displacement(torch.zeros(2, 2), torch.zeros(1, 2), (4, 4))
    with pytest.raises(ValueError, match="b must be B x d"):
        affine_displacement(torch.zeros(1, 2, 2), torch.zeros(1, 3), (4, 4))
    with pytest.raises(ValueError, match="axes"):
        affine_displacement(torch.zeros(1, 2, 2), torch.zeros(1, 2), (4, 4, 4))
    with pytest.raises(ValueError, match="W must be"):
        orthogonality_loss(torch.zeros(1, 2, 3))
