"""Cubic B-spline free-form deformations: a grid of control-point displacements -> a dense displacement.

A uniform cubic B-spline field along one axis is ``u(x) = sum_i c_i beta((x - x_i) / s)`` with ``s`` the
control spacing (voxels), ``x_i`` the position of control point i (voxels) and ``beta`` the cubic B-spline

    beta(t) = 2/3 - t^2 + |t|^3 / 2          for |t| < 1
              (2 - |t|)^3 / 6                for 1 <= |t| < 2
              0                              otherwise;

in d dimensions the basis is the tensor product, so the field is computed separably: one matrix
``size x n_control`` per axis (:func:`bspline_basis`), applied along that axis. This is the same sum as
TorchIR's transposed convolution with the sampled kernel (length 4s, stride s) but needs neither an integer
spacing nor a crop, and 2D and 3D go through the same code (DLIR, DIRNet).

Conventions (regbench's, ARCHITECTURE.md): control displacements are ``B x ndim x *n_control`` in voxels,
channels in array-axis order (TorchIR's are in xyz order); the dense field is ``B x ndim x *shape``.
The control grid is **centred** on the image: along an axis of ``S`` voxels with ``n`` control points,
``x_i = (S - 1) / 2 + (i - (n - 1) / 2) * s`` (TorchIR puts control point i at ``i s + s / 2 - 1``).
Control points beyond the grid count as zero, so a voxel gets the full partition of unity
(``sum_i beta = 1``, hence constant controls -> that constant, a linear ramp -> a linear field) only
where four control points surround it: :func:`control_grid_shape` gives the size for which that holds
on the whole image.

The bending energy that regularises these fields works on any dense field and lives in
:func:`regbench.blocks.losses.bending_energy`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["cubic_bspline", "control_grid_shape", "bspline_basis", "bspline_displacement"]


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The uniform cubic B-spline ``beta(t)``: support (-2, 2), ``beta(0) = 2/3``, ``beta(+-1) = 1/6``."""
    a = t.abs()
    inner = 2.0 / 3.0 - a.square() + 0.5 * a.pow(3)
    outer = (2.0 - a).clamp_min(0).pow(3) / 6.0
    return torch.where(a < 1, inner, outer)


def _per_axis(value: float | Sequence[float], ndim: int, what: str) -> list[float]:
    values = [float(value)] * ndim if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != ndim or any(not v > 0 for v in values):
        raise ValueError(f"{what} must be a positive number or one per spatial axis ({ndim}), got {value!r}")
    return values


def control_grid_shape(shape: Sequence[int], spacing: float | Sequence[float]) -> tuple[int, ...]:
    """Fewest centred control points per axis such that every voxel has 4 around it: ``ceil((S-1)/s) + 3``."""
    spacing = _per_axis(spacing, len(shape), "spacing")
    return tuple(math.ceil((int(S) - 1) / s - 1e-9) + 3 for S, s in zip(shape, spacing))


def bspline_basis(size: int, n_control: int, spacing: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """``size x n_control``: ``beta((x - x_i) / s)`` for voxel x and centred control point i."""
    x = torch.arange(size, dtype=torch.float64)
    positions = (size - 1) / 2 + (torch.arange(n_control, dtype=torch.float64) - (n_control - 1) / 2) * spacing
    return cubic_bspline((x[:, None] - positions[None, :]) / spacing).to(device=device, dtype=dtype)


def bspline_displacement(control: torch.Tensor, shape: Sequence[int],
                         spacing: float | Sequence[float]) -> torch.Tensor:
    """Dense field ``B x C x *shape`` of control values ``B x C x *n_control`` (any C; ndim of them for a field).

    ``spacing`` is the control spacing in voxels (one number, or one per axis). Linear in ``control``,
    differentiable; the per-axis bases are made on the control tensor's device and dtype.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if control.ndim != ndim + 2:
        raise ValueError(f"control must be B x C x *n_control with {ndim} spatial axes (shape {shape}), "
                         f"got shape {tuple(control.shape)}")
    spacing = _per_axis(spacing, ndim, "spacing")
    field = control
    for axis, (size, s) in enumerate(zip(shape, spacing)):
        basis = bspline_basis(size, control.shape[2 + axis], s, control.dtype, control.device)
        # contract the control axis with the basis: ... x n -> ... x size, then put the axis back
        field = torch.matmul(field.movedim(2 + axis, -1), basis.T).movedim(-1, 2 + axis)
    return field
