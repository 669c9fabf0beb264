"""Affine transforms as network outputs: the ``I + W, b`` parameterisation, its field, its penalties.

VTN's affine subnetwork (Zhao et al., JBHI 2020) and the cascades built on it (RCN, ICCV 2019) predict
the *offset from identity* ``W`` (``B x d x d``) and a translation ``b`` (``B x d``, voxels) of the map

    x  ->  A x + b,    A = I + W,

written in coordinates centred on the grid, ``x_i - (n_i - 1) / 2`` along an axis of ``n_i`` voxels, so
that ``W`` rotates, scales and shears about the image centre and ``b`` is the displacement of the centre.
The displacement on the grid (regbench's convention: voxels, channels in array-axis order,
``warped(x) = moving(x + u(x))``) is therefore ``u(x) = W x_c + b``: row ``k`` of ``W`` makes channel
``k``. d = 2 gives 6 parameters, d = 3 gives 12; the code is the same.

The two penalties keep ``A`` near a rigid motion (both return a mean over the batch, to be minimised, and
are 0 at a rotation; both act on ``A = I + W``, never on ``W``):

- :func:`orthogonality_loss`: ``-2d + sum_i (lambda_i^2 + lambda_i^-2)`` over the singular values of ``A``;
  0 exactly when ``A`` is orthogonal, > 0 for any scaling or shear.
- :func:`determinant_loss`: ``1/2 (det A - 1)^2``; 0 when ``A`` keeps volumes, large for a reflection.
"""
from __future__ import annotations

import torch

__all__ = [
    "centred_grid",
    "affine_matrix",
    "affine_displacement",
    "compose_affine",
    "orthogonality_loss",
    "determinant_loss",
]


def centred_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates relative to the grid centre: ``ndim x *shape``, channel k = ``x_k - (n_k - 1) / 2``."""
    axes = [torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2 for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _check_affine(W: torch.Tensor, b: torch.Tensor | None = None) -> int:
    if W.ndim != 3 or W.shape[1] != W.shape[2]:
        raise ValueError(f"W must be B x d x d, got shape {tuple(W.shape)}")
    if b is not None and (b.ndim != 2 or b.shape != W.shape[:2]):
        raise ValueError(f"b must be B x d with W {tuple(W.shape)}, got shape {tuple(b.shape)}")
    return W.shape[1]


def affine_matrix(W: torch.Tensor) -> torch.Tensor:
    """``A = I + W`` (``B x d x d``) from the offset ``W`` the network predicts."""
    d = _check_affine(W)
    return W + torch.eye(d, device=W.device, dtype=W.dtype)


def affine_displacement(W: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
    """The displacement of ``x -> (I + W) x + b`` (centred coordinates) on a grid: ``B x d x *shape``, voxels.

    ``u(x) = W x_c + b``: at the grid centre ``u = b``; with ``W = 0`` a pure translation by ``b``.
    """
    d = _check_affine(W, b)
    shape = tuple(int(s) for s in shape)
    if len(shape) != d:
        raise ValueError(f"W is {d} x {d} but the grid {shape} has {len(shape)} axes")
    grid = centred_grid(shape, W.device, W.dtype).reshape(d, -1)           # d x N
    u = torch.matmul(W, grid) + b[:, :, None]                              # B x d x N
    return u.reshape(W.shape[0], d, *shape)


def compose_affine(W: torch.Tensor, affine_field: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_affine o phi_inner``, exactly: ``u_affine(x) + (I + W) u_inner(x)``.

    ``affine_field`` is :func:`affine_displacement` of ``(W, b)``. Because the affine map is linear,
    ``u_inner(x) + u_affine(x + u_inner(x)) = u_affine(x) + (I + W) u_inner(x)`` everywhere, with no
    interpolation and no border effect; :func:`regbench.blocks.spatial.compose_displacements` gives the same
    inside the grid only (it samples ``u_affine`` and continues it flat beyond the border).
    Warping by the result equals warping by the affine first, then by ``inner``.
    """
    d = _check_affine(W)
    if affine_field.shape != inner.shape or affine_field.shape[1] != d:
        raise ValueError(f"affine_field {tuple(affine_field.shape)} and inner {tuple(inner.shape)} must both be "
                         f"B x {d} x *spatial")
    flat = inner.reshape(inner.shape[0], d, -1)
    return affine_field + (flat + torch.matmul(W, flat)).reshape(inner.shape)


def _principal_minor_sum(C: torch.Tensor) -> torch.Tensor:
    """Sum of the principal (d-1) x (d-1) minors of ``C`` (``B x d x d``): ``e_{d-1}`` of its eigenvalues."""
    d = C.shape[-1]
    total = C.new_zeros(C.shape[0])
    for i in range(d):
        keep = [j for j in range(d) if j != i]
        total = total + torch.linalg.det(C[:, keep][:, :, keep])
    return total


def orthogonality_loss(A: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VTN's orthogonality loss of ``A = I + W`` (``B x d x d``): a mean over the batch, 0 for a rotation.

    The paper's penalty is ``-2d + sum_i (lambda_i^2 + lambda_i^-2)`` with ``lambda_i`` the singular values
    of ``A``: each pair ``lambda^2 + lambda^-2 >= 2`` with equality only at ``lambda = 1``, so the loss is
    >= 0 and vanishes exactly when ``A^T A = I`` (a rotation, or a reflection, which the determinant loss
    forbids). A shear or a scaling moves some ``lambda_i`` off 1 and makes it positive; e.g. a uniform
    scaling by ``s`` in 2D gives ``2 (s^2 + s^-2) - 4``.

    Computed as the official code does, without singular values or inverses that could blow up: with
    ``C = A^T A + eps I`` (eigenvalues ``k_i = lambda_i^2 + eps > 0``), ``sum_i 1/k_i = e_{d-1}(C) / det C``
    (``e_{d-1}``: the sum of the principal (d-1)-minors; in 2D the trace), and

        L = tr C + (1 + eps)^2 e_{d-1}(C) / det C - 2 d (1 + eps),

    which is ``sum_i [k_i + (1 + eps)^2 / k_i - 2 (1 + eps)]``, >= 0 with its minimum 0 at ``k_i = 1 + eps``,
    i.e. at ``lambda_i = 1`` exactly. The code sums over the batch; this is the mean.
    """
    d = _check_affine(A)
    C = torch.matmul(A.transpose(1, 2), A) + eps * torch.eye(d, device=A.device, dtype=A.dtype)
    trace = C.diagonal(dim1=1, dim2=2).sum(-1)
    loss = trace + (1 + eps) ** 2 * _principal_minor_sum(C) / torch.linalg.det(C) - 2 * d * (1 + eps)
    return loss.mean()


def determinant_loss(A: torch.Tensor) -> torch.Tensor:
    """VTN's determinant loss of ``A = I + W`` (``B x d x d``): ``mean_batch 1/2 (det A - 1)^2``.

    0 when ``A`` preserves volume (any rotation, and also any shear: that is the orthogonality loss's
    job); 2 for a reflection (det = -1), which the loss thereby forbids. The paper writes
    ``(det A - 1)^2``; the official code takes ``tf.nn.l2_loss(det - 1)``, which includes the 1/2 and
    sums over the batch. The 1/2 is kept so that the code's weight (0.1) applies as is; the paper's form
    with weight w is this loss with weight 2w.
    """
    _check_affine(A)
    return 0.5 * (torch.linalg.det(A) - 1).square().mean()
