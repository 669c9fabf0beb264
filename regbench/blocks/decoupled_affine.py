"""Decoupled affine transforms: translation, rotation, scaling and shear as separate, bounded parameters.

C2FViT (Mok and Chung, CVPR 2022) predicts ``theta`` in [-1, 1] (a tanh) and decodes it into
geometric parameters of known range, instead of the matrix entries themselves:

==============  =====================  ====================================  ====================
parameter       3D (12 in all)         2D (6 in all, the natural analogue)   mapping (default)
==============  =====================  ====================================  ====================
translation     t_x, t_y, t_z          t_x, t_y                              ``1.0 * theta``
rotation        r_x, r_y, r_z          r (in the x-y plane)                  ``pi * theta``
shear           sh_xy, sh_xz, sh_yz    sh_xy                                 ``pi * theta``
scaling         s_x, s_y, s_z          s_x, s_y                              ``1 + 0.5 * theta``
==============  =====================  ====================================  ====================

``theta`` is ordered (translation, rotation, shear, scaling), as in the official code. The matrix is

    A = C+ . Sh . S . R . C- . T        (homogeneous, (d+1) x (d+1))

with ``T`` the translation, ``C-`` / ``C+`` translations by minus / plus ``c``, the intensity centre of
mass of the image being warped, ``R = Rz Ry Rx`` (2D: the one rotation), ``S`` diagonal and ``Sh`` the
identity with the shears above the diagonal (row-major: (0, 1), (0, 2), (1, 2)). ``A`` is a backward
map, fixed coordinates -> moving coordinates: ``warped(p) = moving(A p)``.

Coordinates are grid_sample's: normalised to [-1, 1] with ``align_corners=True`` (voxel centre 0 at -1,
voxel centre S-1 at +1; so a translation of 1 is half the field of view) and ordered (x, y, z) = the
array axes reversed. The matrices are therefore resolution-independent: the one predicted at low
resolution warps the full-resolution image. They are physical coordinates (up to one scale) only on a
square or cube of isotropic voxels: elsewhere a "rotation" rotates the normalised square, which is not
rigid in mm, and a translation of 1 is a different length along each axis. The official code only sees
128^3 cubes; methods/c2fvit.py runs its network on such a cube (its working grid) for that reason.
:func:`matrix_to_displacement` turns a matrix into regbench's displacement (voxels, array-axis channels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from regbench.blocks.affine import affine_displacement

__all__ = [
    "parameter_count",
    "decode_parameters",
    "rotation_matrix",
    "shear_matrix",
    "translation_matrix",
    "decoupled_affine_matrix",
    "center_of_mass",
    "center_of_mass_translation",
    "affine_warp",
    "voxel_affine",
    "matrix_to_displacement",
]


def _rotations(ndim: int) -> int:
    return ndim * (ndim - 1) // 2


def parameter_count(ndim: int) -> int:
    """Number of decoupled parameters: 6 in 2D, 12 in 3D (translations, rotations, shears, scales)."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return 2 * ndim + 2 * _rotations(ndim)


def decode_parameters(theta: torch.Tensor, translation_range: float = 1.0, rotation_range: float = math.pi,
                      shear_range: float = math.pi, scaling_range: float = 0.5) -> dict[str, torch.Tensor]:
    """Split ``theta`` (``B x P``, P = 6 or 12, values in [-1, 1]) into its geometric parameters.

    Returns ``translation`` (``B x d``, normalised units, in [-translation_range, translation_range]),
    ``rotation`` and ``shear`` (``B x d(d-1)/2``, radians and matrix entries, in +-their range) and
    ``scaling`` (``B x d``, in [1 - scaling_range, 1 + scaling_range]). Each range is the image of
    [-1, 1] under a linear map; theta outside [-1, 1] is not clipped (the network's tanh bounds it).
    """
    if theta.ndim != 2 or theta.shape[1] not in (6, 12):
        raise ValueError(f"theta must be B x 6 (2D) or B x 12 (3D), got shape {tuple(theta.shape)}")
    ndim = 2 if theta.shape[1] == 6 else 3
    r = _rotations(ndim)
    translation, rotation, shear, scaling = torch.split(theta, [ndim, r, r, ndim], dim=1)
    return {
        "translation": translation_range * translation,
        "rotation": rotation_range * rotation,
        "shear": shear_range * shear,
        "scaling": 1.0 + scaling_range * scaling,
    }


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """``B x 1`` angle (2D) or ``B x 3`` angles about x, y, z (3D) -> ``B x d x d`` rotation, ``Rz Ry Rx`` in 3D.

    2D: ``[[cos r, -sin r], [sin r, cos r]]``. 3D, each a right-handed rotation about its axis:
    ``Rx`` turns y towards z, ``Ry`` z towards x, ``Rz`` x towards y (the official code's matrices).
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(angles[:, 0]), torch.zeros_like(angles[:, 0])
    if angles.shape[1] == 1:
        c, s = cos[:, 0], sin[:, 0]
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    if angles.shape[1] != 3:
        raise ValueError(f"angles must be B x 1 (2D) or B x 3 (3D), got shape {tuple(angles.shape)}")

    def matrix(rows):
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    cx, cy, cz = cos.unbind(1)
    sx, sy, sz = sin.unbind(1)
    rx = matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return rz @ ry @ rx


def shear_matrix(shear: torch.Tensor, ndim: int) -> torch.Tensor:
    """``B x d(d-1)/2`` shears -> ``B x d x d``: the identity with them above the diagonal, row-major."""
    rows, cols = torch.triu_indices(ndim, ndim, offset=1, device=shear.device)
    if shear.ndim != 2 or shear.shape[1] != rows.numel():
        raise ValueError(f"{ndim}D needs B x {rows.numel()} shear parameters, got shape {tuple(shear.shape)}")
    matrix = torch.eye(ndim, dtype=shear.dtype, device=shear.device).repeat(shear.shape[0], 1, 1)
    matrix[:, rows, cols] = shear
    return matrix


def _homogeneous(linear: torch.Tensor | None = None, translation: torch.Tensor | None = None) -> torch.Tensor:
    reference = linear if linear is not None else translation
    batch, ndim = reference.shape[0], reference.shape[-1]
    if linear is None:
        linear = torch.eye(ndim, dtype=reference.dtype, device=reference.device).expand(batch, ndim, ndim)
    column = translation if translation is not None else reference.new_zeros(batch, ndim)
    bottom = reference.new_zeros(batch, 1, ndim + 1)
    bottom[..., -1] = 1.0
    return torch.cat([torch.cat([linear, column[..., None]], dim=2), bottom], dim=1)


def translation_matrix(translation: torch.Tensor) -> torch.Tensor:
    """``B x d`` translation -> ``B x (d+1) x (d+1)`` homogeneous matrix ``x -> x + t``."""
    return _homogeneous(translation=translation)


def decoupled_affine_matrix(theta: torch.Tensor, center: torch.Tensor | None = None, **ranges: float) -> torch.Tensor:
    """``A = C+ Sh S R C- T`` (``B x (d+1) x (d+1)``) from ``theta`` (``B x 6`` or ``B x 12``).

    ``center`` (``B x d``, normalised xyz; see :func:`center_of_mass`) is the point the linear part acts
    about; None is the grid centre (0). ``ranges`` go to :func:`decode_parameters`. ``theta = 0`` gives
    the identity whatever the centre.
    """
    params = decode_parameters(theta, **ranges)
    ndim = params["scaling"].shape[1]
    if center is None:
        center = theta.new_zeros(theta.shape[0], ndim)
    linear = (shear_matrix(params["shear"], ndim) @ torch.diag_embed(params["scaling"])
              @ rotation_matrix(params["rotation"]))
    return (translation_matrix(center) @ _homogeneous(linear=linear) @ translation_matrix(-center)
            @ translation_matrix(params["translation"]))


def _normalised_grid(shape, device, dtype) -> torch.Tensor:
    """``*shape x d`` grid_sample coordinates (xyz, align_corners=True) of every voxel."""
    ndim = len(shape)
    eye = torch.eye(ndim, ndim + 1, device=device, dtype=dtype)[None]
    return F.affine_grid(eye, (1, 1, *shape), align_corners=True)[0]


def center_of_mass(image: torch.Tensor) -> torch.Tensor:
    """Intensity centre of mass of each image (``B x 1 x *spatial``) -> ``B x d``, normalised xyz coordinates.

    An all-zero image has its centre at the grid centre (0) instead of 0/0.
    """
    if image.ndim not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"image must be B x 1 x *spatial (2D or 3D), got shape {tuple(image.shape)}")
    grid = _normalised_grid(image.shape[2:], image.device, image.dtype)  # *spatial x d
    weights = image.flatten(1)                                           # B x N
    mass = weights.sum(dim=1, keepdim=True)
    return weights @ grid.reshape(-1, grid.shape[-1]) / torch.where(mass == 0, torch.ones_like(mass), mass)


def center_of_mass_translation(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """C2FViT's initialisation: the translation ``x -> x + com(moving) - com(fixed)`` (``B x (d+1) x (d+1)``).

    Warping ``moving`` by it moves the moving image's centre of mass onto the fixed one's.
    """
    return translation_matrix(center_of_mass(moving) - center_of_mass(fixed))


def affine_warp(image: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros") -> torch.Tensor:
    """``out(p) = image(A p)`` for ``B x C x *spatial`` images and ``B x (d+1) x (d+1)`` (or ``B x d x (d+1)``)
    normalised-coordinate matrices (affine_grid + grid_sample, ``align_corners=True``)."""
    ndim = image.ndim - 2
    if matrix.shape[-1] != ndim + 1:
        raise ValueError(f"a {ndim}D image needs {ndim + 1}-column matrices, got shape {tuple(matrix.shape)}")
    grid = F.affine_grid(matrix[:, :ndim], (matrix.shape[0], image.shape[1], *image.shape[2:]), align_corners=True)
    if image.shape[0] == 1 and matrix.shape[0] > 1:
        image = image.expand(matrix.shape[0], *image.shape[1:])
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def voxel_affine(matrix: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised-coordinate matrix as regbench.blocks.affine's ``(W, b)`` on a grid of ``shape``.

    regbench.blocks.affine writes a map as ``x_c -> (I + W) x_c + b`` in voxel coordinates centred on the grid
    (array-axis order). With ``D = diag((S_k - 1) / 2)`` and ``P`` the axis reversal, ``x_c = D P n``, so
    ``n -> L n + t`` becomes ``I + W = D P L P D^-1`` and ``b = D P t``. An axis of one voxel has
    ``D_k = 0``: its row of ``W`` and its ``b_k`` come out 0 (nothing moves along it).
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if matrix.ndim != 3 or matrix.shape[-1] != ndim + 1 or matrix.shape[1] not in (ndim, ndim + 1):
        raise ValueError(f"a {ndim}D grid needs B x {ndim + 1} x {ndim + 1} (or B x {ndim} x {ndim + 1}) "
                         f"matrices, got shape {tuple(matrix.shape)}")
    half = torch.tensor([(s - 1) / 2 for s in shape], device=matrix.device, dtype=matrix.dtype)
    inverse_half = torch.where(half > 0, 1 / half.clamp_min(1e-12), torch.zeros_like(half))
    linear = matrix[:, :ndim, :ndim].flip(1, 2)               # P L P: xyz -> array-axis order
    translation = matrix[:, :ndim, ndim].flip(1)
    A = half[:, None] * linear * inverse_half[None, :]
    eye = torch.diag((half > 0).to(matrix.dtype))
    return A - eye, half * translation


def matrix_to_displacement(matrix: torch.Tensor, shape) -> torch.Tensor:
    """The displacement ``u`` (``B x d x *shape``, voxels, array-axis channels) of a normalised-coordinate
    matrix on a grid of ``shape``: ``warp(image, u)`` equals :func:`affine_warp` ``(image, matrix)``.

    Through :func:`voxel_affine` and :func:`regbench.blocks.affine.affine_displacement` (``u = W x_c + b``).
    """
    W, b = voxel_affine(matrix, shape)
    return affine_displacement(W, b, shape)
