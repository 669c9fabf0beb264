"""Spatial transforms shared by every method, 2D and 3D through the same code.

Convention (ARCHITECTURE.md, Learn2Reg): a displacement ``u`` has shape ``B x ndim x *spatial``,
lives on the fixed image's grid, is measured in voxels, and its channels follow the array axes
(channel 0 moves along axis 0). Warping is backward: ``warped(x) = moving(x + u(x))``.

``torch.nn.functional.grid_sample`` wants sampling positions normalised to [-1, 1] and ordered
(x, y, z) = (last array axis, ..., first array axis), so positions are scaled per axis and their
channel order reversed before sampling. ``align_corners=True`` throughout: voxel centre 0 maps to
-1 and voxel centre S-1 to +1, so voxel units and normalised units differ only by a scale.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "warp",
    "warp_labels",
    "integrate_velocity",
    "compose_displacements",
    "resize_displacement",
]


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every grid point: ``ndim x *shape`` (ij order, channel k = index on axis k)."""
    axes = [torch.arange(size, device=device, dtype=dtype) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@functools.lru_cache(maxsize=8)
def _normalised_identity(shape: tuple, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, base)`` for a grid: ``scale`` (``1 x ndim x 1...``) takes voxels to grid_sample units and
    ``base = id * scale - 1`` is the identity in those units (``1 x ndim x *shape``).

    Cached per (shape, device, dtype): a warp then costs one fused multiply-add more than grid_sample,
    instead of building a meshgrid every call (scaling and squaring warps 7 times per forward pass).
    Made outside inference mode, so a grid first built under ``torch.inference_mode()`` still serves
    training later. Callers must not modify the returned tensors.
    """
    with torch.inference_mode(False):
        ndim = len(shape)
        scale = torch.tensor([2.0 / max(size - 1, 1) for size in shape], device=device, dtype=dtype)
        scale = scale.view(1, ndim, *([1] * ndim))
        base = identity_grid(shape, device, dtype)[None] * scale - 1.0
    return scale, base


def _normalised_sampling_grid(displacement: torch.Tensor) -> torch.Tensor:
    """Turn ``id + u`` (voxels, ij channels) into grid_sample's ``B x *spatial x ndim`` xyz grid."""
    shape = tuple(displacement.shape[2:])
    ndim = len(shape)
    if displacement.shape[1] != ndim:
        raise ValueError(
            f"displacement has {displacement.shape[1]} channels but {ndim} spatial axes; "
            "expected shape B x ndim x *spatial"
        )
    scale, base = _normalised_identity(shape, displacement.device, displacement.dtype)
    normalised = torch.addcmul(base, displacement, scale)  # (id + u) * scale - 1
    return normalised.movedim(1, -1).flip(-1)


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Backward-warp ``image`` (``B x C x *spatial``): ``out(x) = image(x + u(x))``.

    ``mode`` is ``"bilinear"`` (linear in 2D, trilinear in 3D) or ``"nearest"``. Outside the image,
    ``padding_mode`` ``"zeros"`` (voxelmorph) or ``"border"`` (TorchIR, neuron's transformer).
    """
    if image.shape[0] != displacement.shape[0] and image.shape[0] != 1:
        raise ValueError(f"batch sizes differ: image {image.shape[0]}, displacement {displacement.shape[0]}")
    if image.shape[2:] != displacement.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} and displacement grid "
                         f"{tuple(displacement.shape[2:])} differ")
    grid = _normalised_sampling_grid(displacement)
    if image.shape[0] == 1 and displacement.shape[0] > 1:
        image = image.expand(displacement.shape[0], *image.shape[1:])
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_labels(labels: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Warp an integer label map (``B x 1 x *spatial``) by nearest neighbour; returns the same dtype.

    Labels are carried as float64 through grid_sample, which is exact for any label value below 2^53.
    """
    warped = warp(labels.to(torch.float64), displacement.to(torch.float64), mode="nearest")
    return warped.round().to(labels.dtype)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7, padding_mode: str = "border") -> torch.Tensor:
    """Scaling and squaring: displacement of exp(v) for a stationary velocity field ``v``.

    ``v`` is scaled by 2^-steps, then composed with itself ``steps`` times (u <- u + u o (id + u)).
    Where a composition samples outside the grid the field is extended from its border (voxelmorph
    pads with zeros; a displacement is better continued than set to zero). ``steps=0`` returns v.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = displacement + warp(displacement, displacement, padding_mode=padding_mode)
    return displacement


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Displacement of ``phi_outer o phi_inner``: ``u(x) = u_inner(x) + u_outer(x + u_inner(x))``.

    Warping by the result equals warping by ``outer`` first and then by ``inner``:
    ``warp(warp(m, outer), inner) ~= warp(m, compose_displacements(outer, inner))``.
    """
    return inner + warp(outer, inner, padding_mode=padding_mode)


def resize_displacement(displacement: torch.Tensor, size) -> torch.Tensor:
    """Resample a displacement to the grid ``size`` and rescale its vectors to the new voxel units.

    Grids are corner-aligned (``align_corners=True``), so a vector along axis k is multiplied by
    (S_new_k - 1) / (S_old_k - 1); for an exact factor-2 pyramid this is voxelmorph's ``ResizeTransform``
    up to the -1 terms.
    """
    old = displacement.shape[2:]
    size = tuple(int(s) for s in size)
    if len(size) != len(old):
        raise ValueError(f"size {size} has {len(size)} axes, displacement has {len(old)}")
    mode = "bilinear" if len(old) == 2 else "trilinear"
    resized = F.interpolate(displacement, size=size, mode=mode, align_corners=True)
    factors = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(size, old)],
                           device=displacement.device, dtype=displacement.dtype)
    return resized * factors.view(1, -1, *([1] * len(size)))
