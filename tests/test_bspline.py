"""Cubic B-spline fields: the kernel, the partition of unity, and the fields constant and linear controls give."""
import pytest
import torch

from regbench.blocks.bspline import bspline_basis, bspline_displacement, control_grid_shape, cubic_bspline


def test_the_cubic_bspline_has_its_textbook_values():
    t = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 2.0, -2.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([2 / 3, 23 / 48, 23 / 48, 1 / 6, 1 / 6, 1 / 48, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(cubic_bspline(t), expected)


@pytest.mark.parametrize("size, spacing", [(176, 8), (176, 16), (37, 5), (20, 2.5)])
def test_the_basis_is_a_partition_of_unity_on_a_covering_grid(size, spacing):
    (n,) = control_grid_shape((size,), spacing)
    basis = bspline_basis(size, n, spacing, torch.float64)
    assert basis.shape == (size, n)
    torch.testing.assert_close(basis.sum(1), torch.ones(size, dtype=torch.float64))
    # the cubic kernel spans 4 spacings: no voxel depends on more than four control points an axis
    assert int((basis > 0).sum(1).max()) <= 4


@pytest.mark.parametrize("shape, spacing", [((48, 40), 8), ((24, 20, 16), (4, 5, 8))])
def test_constant_controls_give_that_constant_field(shape, spacing):
    ndim = len(shape)
    n = control_grid_shape(shape, spacing)
    values = torch.tensor([1.5, -2.0, 0.25][:ndim], dtype=torch.float64)
    control = values.view(1, ndim, *([1] * ndim)).expand(1, ndim, *n)
    field = bspline_displacement(control, shape, spacing)
    assert field.shape == (1, ndim, *shape)
    torch.testing.assert_close(field, values.view(1, ndim, *([1] * ndim)).expand_as(field))


def test_a_linear_ramp_of_controls_gives_a_linear_field():
    shape, spacing = (40, 36), 6
    n = control_grid_shape(shape, spacing)
    # control point i along an axis sits at (S - 1) / 2 + (i - (n - 1) / 2) * s (centred)
    positions = [(S - 1) / 2 + (torch.arange(k, dtype=torch.float64) - (k - 1) / 2) * spacing for S, k in zip(shape, n)]
    px, py = torch.meshgrid(*positions, indexing="ij")
    control = torch.stack([0.3 * px - 0.2 * py + 1.0, 0.05 * py])[None]
    field = bspline_displacement(control, shape, spacing)
    x, y = torch.meshgrid(*[torch.arange(S, dtype=torch.float64) for S in shape], indexing="ij")
    torch.testing.assert_close(field[0, 0], 0.3 * x - 0.2 * y + 1.0)
    torch.testing.assert_close(field[0, 1], 0.05 * y)


def test_one_control_point_gives_the_tensor_product_kernel():
    shape, spacing = (33, 29), 4
    n = (9, 8)
    control = torch.zeros(1, 1, *n, dtype=torch.float64)
    control[0, 0, 4, 3] = 2.0
    field = bspline_displacement(control, shape, spacing)[0, 0]
    cx = (33 - 1) / 2 + (4 - (9 - 1) / 2) * spacing      # 16.0
    cy = (29 - 1) / 2 + (3 - (8 - 1) / 2) * spacing      # 12.0
    x, y = torch.meshgrid(*[torch.arange(S, dtype=torch.float64) for S in shape], indexing="ij")
    torch.testing.assert_close(field, 2.0 * cubic_bspline((x - cx) / spacing) * cubic_bspline((y - cy) / spacing))
    assert field[16, 12] == pytest.approx(2.0 * (2 / 3) ** 2)
    # support: the open box of half-width 2 spacings around the control point, nothing beyond
    inside = ((x - cx).abs() < 2 * spacing) & ((y - cy).abs() < 2 * spacing)
    assert (field[inside] > 0).all() and (field[~inside] == 0).all()
    assert int(inside.sum()) == (4 * spacing - 1) ** 2


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="spacing"):
        bspline_displacement(torch.zeros(1, 2, 5, 5), (20, 20), 0)
    with pytest.raises(ValueError, match="control must be"):
        bspline_displacement(torch.zeros(1, 2, 5), (20, 20), 4)
