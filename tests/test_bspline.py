"""Cubic B-spline fields: the kernel, TorchIR's control-point positions, and the fields that one point, constant
controls and a linear ramp give, inside the control grid and past it."""
import pytest
import torch
import torch.nn.functional as F

from regbench.blocks.bspline import (bspline_basis, bspline_displacement, control_grid_shape, control_point_positions,
                                     cubic_bspline)


def test_the_cubic_bspline_has_its_textbook_values():
    t = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 2.0, -2.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([2 / 3, 23 / 48, 23 / 48, 1 / 6, 1 / 6, 1 / 48, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(cubic_bspline(t), expected)


@pytest.mark.parametrize("spacing, expected", [(1, [0, 1, 2, 3]), (2, [0, 2, 4, 6]), (4, [1, 5, 9, 13]),
                                               (8, [3, 11, 19, 27]), (16, [7, 23, 39, 55]), (5, [2, 7, 12, 17])])
def test_control_points_sit_where_torchir_puts_them(spacing, expected):
    # i s + floor((s - 1) / 2): the voxel at (odd s) or just before (even s) the centre of the i-th cell of s voxels
    torch.testing.assert_close(control_point_positions(4, spacing), torch.tensor(expected, dtype=torch.float64))


def test_the_control_grid_is_the_pooled_grid():
    assert control_grid_shape((176, 170), 16) == (11, 10)
    assert control_grid_shape((64, 48, 31), (8, 8, 4)) == (8, 6, 7)


def test_one_control_point_peaks_on_its_voxel_and_falls_to_zero_two_spacings_away():
    spacing, size = 8, 64
    control = torch.zeros(1, 1, 5, dtype=torch.float64)
    control[0, 0, 2] = 1.0
    field = bspline_displacement(control, (size,), spacing)[0, 0]
    x = 2 * 8 + 3  # voxel 19
    assert int(field.argmax()) == x and field[x].item() == pytest.approx(2 / 3)
    assert field[x - 8].item() == pytest.approx(1 / 6) and field[x + 8].item() == pytest.approx(1 / 6)
    assert field[x - 4].item() == pytest.approx(23 / 48) and field[x + 4].item() == pytest.approx(23 / 48)
    for k in range(1, 16):
        assert field[x - k].item() == pytest.approx(field[x + k].item())
    assert (field[: x - 15] == 0).all() and (field[x + 16:] == 0).all() and (field[x - 15: x + 16] > 0).all()


def test_constant_controls_give_the_constant_between_the_second_and_second_to_last_point_only():
    # the controls beyond the grid are zero: three points at voxels 3, 11, 19 (s = 8) on 40 voxels
    field = bspline_displacement(torch.full((1, 1, 3), 1.5, dtype=torch.float64), (40,), 8)[0, 0]
    assert field[11].item() == pytest.approx(1.5)  # 2/3 + 1/6 + 1/6 of it
    assert field[3].item() == pytest.approx(1.5 * (2 / 3 + 1 / 6))  # the point before the first is missing
    edge = cubic_bspline(torch.tensor(3 / 8)) + cubic_bspline(torch.tensor(11 / 8))  # voxel 0 sees points 3 and 11
    assert field[0].item() == pytest.approx(1.5 * edge.item())
    assert field[23].item() == pytest.approx(1.5 * (23 / 48 + 1 / 48))  # halfway past the last point: 1/2
    assert (field[35:] == 0).all() and field[34] > 0  # two spacings past voxel 19


@pytest.mark.parametrize("shape, spacing", [((48, 40), 8), ((24, 20, 32), (4, 5, 8))])
def test_constant_controls_give_that_constant_inside_the_grid(shape, spacing):
    ndim = len(shape)
    n = control_grid_shape(shape, spacing)
    values = torch.tensor([1.5, -2.0, 0.25][:ndim], dtype=torch.float64)
    control = values.view(1, ndim, *([1] * ndim)).expand(1, ndim, *n)
    field = bspline_displacement(control, shape, spacing)
    assert field.shape == (1, ndim, *shape)
    spacings = [spacing] * ndim if isinstance(spacing, int) else spacing
    inner = tuple(slice(int(control_point_positions(k, s)[1]), int(control_point_positions(k, s)[-2]) + 1)
                  for k, s in zip(n, spacings))
    torch.testing.assert_close(field[(0, slice(None)) + inner], values.view(ndim, *([1] * ndim)).expand(
        ndim, *field[(0, 0) + inner].shape))


def test_a_linear_ramp_of_controls_gives_a_linear_field_inside_the_grid():
    shape, spacing = (40, 36), 4
    n = control_grid_shape(shape, spacing)
    px, py = torch.meshgrid(*[control_point_positions(k, spacing) for k in n], indexing="ij")
    control = torch.stack([0.3 * px - 0.2 * py + 1.0, 0.05 * py])[None]
    field = bspline_displacement(control, shape, spacing)
    x, y = torch.meshgrid(*[torch.arange(S, dtype=torch.float64) for S in shape], indexing="ij")
    inner = (slice(5, 33 + 1), slice(5, 29 + 1))  # from the second control point (1 * 4 + 1) to the second-to-last
    torch.testing.assert_close(field[0, 0][inner], (0.3 * x - 0.2 * y + 1.0)[inner])
    torch.testing.assert_close(field[0, 1][inner], (0.05 * y)[inner])


@pytest.mark.parametrize("spacing", [2, 4, 8, 16])
def test_the_field_is_torchirs_transposed_convolution(spacing):
    # the sampled kernel beta((j - (2s - 1)) / s), j = 0 .. 4s - 1, stride s, cropped by floor(3s / 2) a side
    s = spacing
    kernel = cubic_bspline((torch.arange(4 * s, dtype=torch.float64) - (2 * s - 1)) / s)
    crop = 3 * s // 2
    generator = torch.Generator().manual_seed(s)
    for shape in [(3 * s, 5 * s), (4 * s + s - 1, 3 * s + 1)]:
        n = control_grid_shape(shape, s)
        control = torch.randn(2, 2, *n, generator=generator, dtype=torch.float64)
        extra = tuple(S - k * s for S, k in zip(shape, n))
        expected = F.conv_transpose2d(control.reshape(4, 1, *n), (kernel[:, None] * kernel[None, :])[None, None],
                                      stride=s, padding=crop, output_padding=extra).reshape(2, 2, *shape)
        torch.testing.assert_close(bspline_displacement(control, shape, s), expected)


def test_one_control_point_gives_the_tensor_product_kernel():
    shape, spacing = (33, 29), 4
    control = torch.zeros(1, 1, 8, 7, dtype=torch.float64)
    control[0, 0, 4, 3] = 2.0
    field = bspline_displacement(control, shape, spacing)[0, 0]
    cx, cy = 4 * 4 + 1, 3 * 4 + 1
    x, y = torch.meshgrid(*[torch.arange(S, dtype=torch.float64) for S in shape], indexing="ij")
    torch.testing.assert_close(field, 2.0 * cubic_bspline((x - cx) / spacing) * cubic_bspline((y - cy) / spacing))
    assert field[17, 13] == pytest.approx(2.0 * (2 / 3) ** 2)
    inside = ((x - cx).abs() < 2 * spacing) & ((y - cy).abs() < 2 * spacing)
    assert (field[inside] > 0).all() and (field[~inside] == 0).all()
    assert int(inside.sum()) == (4 * spacing - 1) ** 2


def test_the_basis_counts_at_most_four_points_a_voxel():
    basis = bspline_basis(176, 11, 16, torch.float64)
    assert basis.shape == (176, 11) and int((basis > 0).sum(1).max()) <= 4
    torch.testing.assert_close(basis[23:152].sum(1), torch.ones(129, dtype=torch.float64))
    assert (basis[:23].sum(1) < 1).all() and (basis[152:].sum(1) < 1).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="spacing"):
        bspline_displacement(torch.zeros(1, 2, 5, 5), (20, 20), 0)
    with pytest.raises(ValueError, match="spacing"):
        bspline_displacement(torch.zeros(1, 2, 5, 5), (20, 20), 2.5)
    with pytest.raises(ValueError, match="control must be"):
        bspline_displacement(torch.zeros(1, 2, 5), (20, 20), 4)
