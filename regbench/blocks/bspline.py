"""Cubic B-spline free-form deformations: a grid of control-point displacements -> a dense displacement.

A uniform cubic B-spline field along one axis is ``u(x) = sum_i c_i beta((x - x_i) / s)`` with ``s`` the
control spacing (voxels, an integer), ``x_i`` the position of control point i (voxels) and ``beta`` the cubic
B-spline

    beta(t) = 2/3 - t^2 + |t|^3 / 2          for |t| < 1
              (2 - |t|)^3 / 6                for 1 <= |t| < 2
              0                              otherwise;

in d dimensions the basis is the tensor product, so the field is computed separably: one matrix
``size x n_control`` per axis (:func:`bspline_basis`), applied along that axis. The sum is that of TorchIR's
``BsplineTransformer`` (de Vos et al.: DIRNet, DLIR), a transposed convolution of the controls with the
sampled kernel (length 4s, stride s, cropped by ``floor(3s / 2)``), and 2D and 3D go through the same code.

Control points sit where TorchIR's transposed convolution puts them (:func:`control_point_positions`):
``x_i = i s + floor((s - 1) / 2)``, on the voxel at or just before the centre ``i s + (s - 1) / 2`` of the
i-th cell of ``s`` voxels, which a ConvNet's ``log2(s)`` average pools reduce to its i-th output
(``floor(S / s)`` of them per axis, :func:`control_grid_shape`). Beyond the grid the controls are zero, as in
TorchIR: a voxel gets the full partition of unity (``sum_i beta = 1``, hence constant controls -> that
constant, a linear ramp -> a linear field) only between the second and the second-to-last control point,
and the field falls to zero ``2 s`` voxels past the first and the last.

Conventions (regbench's, ARCHITECTURE.md): control displacements are ``B x ndim x *n_control`` in voxels,
channels in array-axis order (TorchIR's are in xyz order); the dense field is ``B x ndim x *shape``.
The bending energy that regularises these fields works on any dense field and lives in
:mod:`regbench.blocks.losses`.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["cubic_bspline", "control_point_positions", "control_grid_shape", "bspline_basis",
           "bspline_displacement"]


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The uniform cubic B-spline ``beta(t)``: support (-2, 2), ``beta(0) = 2/3``, ``beta(+-1) = 1/6``."""
    a = t.abs()
    inner = 2.0 / 3.0 - a.square() + 0.5 * a.pow(3)
    outer = (2.0 - a).clamp_min(0).pow(3) / 6.0
    return torch.where(a < 1, inner, outer)


def _spacings(value: int | Sequence[int], ndim: int) -> list[int]:
    values = [value] * ndim if not isinstance(value, Sequence) else list(value)
    if len(values) != ndim or any(isinstance(v, bool) or not float(v) >= 1 or float(v) != int(v) for v in values):
        raise ValueError(f"spacing must be a positive integer or one per spatial axis ({ndim}), got {value!r}")
    return [int(v) for v in values]


def control_point_positions(n_control: int, spacing: int) -> torch.Tensor:
    """Voxel positions ``x_i = i s + floor((s - 1) / 2)`` of ``n_control`` control points (float64), TorchIR's."""
    (s,) = _spacings(spacing, 1)
    return torch.arange(n_control, dtype=torch.float64) * s + (s - 1) // 2


def control_grid_shape(shape: Sequence[int], spacing: int | Sequence[int]) -> tuple[int, ...]:
    """Control points per axis, ``floor(S / s)``: a ConvNet's output after ``log2(s)`` pools of 2, the grid that
    TorchIR's transposed convolution turns into a field of ``S`` voxels."""
    return tuple(int(S) // s for S, s in zip(shape, _spacings(spacing, len(shape))))


def bspline_basis(size: int, n_control: int, spacing: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``size x n_control``: ``beta((x - x_i) / s)``, voxel x, control point i at :func:`control_point_positions`."""
    (s,) = _spacings(spacing, 1)
    x = torch.arange(size, dtype=torch.float64)
    return cubic_bspline((x[:, None] - control_point_positions(n_control, s)[None, :]) / s).to(device=device,
                                                                                              dtype=dtype)


def bspline_displacement(control: torch.Tensor, shape: Sequence[int], spacing: int | Sequence[int]) -> torch.Tensor:
    """Dense field ``B x C x *shape`` of control values ``B x C x *n_control`` (any C; ndim of them for a field).

    ``spacing`` is the control spacing in voxels (a positive integer, or one per axis). Linear in ``control``,
    differentiable; the per-axis bases are made on the control tensor's device and dtype.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if control.ndim != ndim + 2:
        raise ValueError(f"control must be B x C x *n_control with {ndim} spatial axes (shape {shape}), "
                         f"got shape {tuple(control.shape)}")
    field = control
    for axis, (size, s) in enumerate(zip(shape, _spacings(spacing, ndim))):
        basis = bspline_basis(size, control.shape[2 + axis], s, control.dtype, control.device)
        # contract the control axis with the basis: ... x n -> ... x size, then put the axis back
        field = torch.matmul(field.movedim(2 + axis, -1), basis.T).movedim(-1, 2 + axis)
    return field
