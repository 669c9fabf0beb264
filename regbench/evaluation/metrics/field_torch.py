"""The voxel-wise regularity metrics of a displacement with torch, on any device (a GPU when scoring runs on one).

The same numbers as :func:`regbench.evaluation.metrics.jacobian._field_pass` (numpy, slab by slab): the
central-difference Jacobian (2 x numpy.gradient, one-sided at the borders) and its determinant with the same
operations in the same order, so the determinants and the fold counts are the same bits; SDlogJ, Learn2Reg's
SDlogJ and the non-diffeomorphic volume (Liu et al. 2024) accumulate in float64, in another order than numpy's
chunks (a difference of the order of float rounding). The whole field is processed at once: about 30 arrays
of the field's size in its precision (an OASIS-size field in float64: some 1.6 GB of GPU memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from regbench.evaluation.metrics.jacobian import _det   # plain operators: numpy's order, on tensors too


def _diff2(f: torch.Tensor, axis: int) -> torch.Tensor:
    """2 x numpy.gradient(f, axis): f[i+1] - f[i-1] inside, 2 (f[1] - f[0]) and 2 (f[-1] - f[-2]) at the ends."""
    n = f.shape[axis]
    inner = f.narrow(axis, 2, n - 2) - f.narrow(axis, 0, n - 2)
    first = (f.narrow(axis, 1, 1) - f.narrow(axis, 0, 1)) * 2
    last = (f.narrow(axis, n - 1, 1) - f.narrow(axis, n - 2, 1)) * 2
    return torch.cat([first, inner, last], dim=axis)


def _std(values: torch.Tensor) -> float:
    """Population standard deviation in float64 (NaN for no values)."""
    if values.numel() == 0:
        return float("nan")
    values = values.double()
    return float(torch.sqrt(torch.mean((values - values.mean()) ** 2)))


def _negative_sum(det: torch.Tensor) -> torch.Tensor:
    return torch.clamp(det, max=0).double().sum()


def _det_columns(a, b, c) -> torch.Tensor:
    """det of the 3x3 matrices with columns a, b, c: a . (b x c), in the order of jacobian._det_columns."""
    out = a[0] * (b[1] * c[2] - b[2] * c[1])
    out = out + a[1] * (b[2] * c[0] - b[0] * c[2])
    return out + a[2] * (b[0] * c[1] - b[1] * c[0])


def ndv_volume(u: torch.Tensor) -> float:
    """Non-diffeomorphic volume in voxel units (the sum of the negative simplex volumes), every voxel computed."""
    ndim, n = u.shape[0], u.shape[1:]
    pad = F.pad(u[None], (1, 1) * ndim, mode="replicate")[0]   # u edge-padded by one voxel
    grid = pad.shape[1:]

    def at(array, shift):
        """``array`` (component axis first) at voxel x + shift: padded position x + 1 + shift."""
        return array[(slice(None),) + tuple(slice(1 + s, 1 + s + m) for s, m in zip(shift, n))]

    forward = []
    for k in range(ndim):
        d = pad.narrow(k + 1, 1, grid[k] - 1) - pad.narrow(k + 1, 0, grid[k] - 1)
        d[k] += 1   # D_k(y) = phi(y + e_k) - phi(y)
        forward.append(d)
    zero = (0,) * ndim
    fwd = [at(forward[k], zero) for k in range(ndim)]
    bwd = [at(forward[k], tuple(-1 if j == k else 0 for j in range(ndim))) for k in range(ndim)]
    total = torch.zeros((), dtype=torch.float64, device=u.device)
    if ndim == 2:
        for a in (fwd[0], bwd[0]):
            for b in (fwd[1], bwd[1]):
                total += _negative_sum(a[0] * b[1] - a[1] * b[0])
        return float(total) * (-0.5 / 2)
    for b in (fwd[1], bwd[1]):
        for c in (fwd[2], bwd[2]):
            cross = [b[i] * c[j] - b[j] * c[i] for i, j in ((1, 2), (2, 0), (0, 1))]
            for a in (fwd[0], bwd[0]):
                total += _negative_sum(a[0] * cross[0] + a[1] * cross[1] + a[2] * cross[2])
    diag = {}
    for i, j in ((0, 1), (1, 2), (0, 2)):
        # diag_ij(y) = D_i(y) + D_j(y + e_i), where both exist
        di = forward[i].narrow(j + 1, 0, forward[i].shape[j + 1] - 1)
        dj = forward[j].narrow(i + 1, 1, forward[j].shape[i + 1] - 1)
        diag[i, j] = di + dj
    total += _negative_sum(_det_columns(at(diag[0, 1], zero), at(diag[1, 2], zero), at(diag[0, 2], zero)))
    total += _negative_sum(-_det_columns(at(diag[0, 1], (-1, -1, 0)), at(diag[0, 2], (-1, 0, -1)),
                                         at(diag[1, 2], (0, -1, -1))))
    return float(total) * (-0.5 / 6)


def field_pass(u: torch.Tensor, mask: torch.Tensor | None = None, want_ndv: bool = True) -> dict:
    """``jacobian._field_pass``'s record (fold counts, SDlogJ, Learn2Reg's SDlogJ, NDV in percent) for ``u``
    (``ndim x *spatial``, voxels; float32 or float64, on any device) and an optional boolean ``mask``."""
    if not u.is_floating_point():
        u = u.double()
    ndim, shape = u.shape[0], u.shape[1:]
    g = [[_diff2(u[c], k) for k in range(ndim)] for c in range(ndim)]
    for k in range(ndim):
        g[k][k] = g[k][k] + 2
    det = _det(g) * (0.5 ** ndim)
    positive = det > 0
    record = {"n_fold": int((~positive).sum()), "n_fold_mask": 0, "n_mask": 0,
              "sdlogj": _std(torch.log(det[positive]))}
    if mask is not None:
        mask = mask.to(device=u.device, dtype=torch.bool)
        record["n_mask"] = int(mask.sum())
        record["n_fold_mask"] = int((mask & ~positive).sum())
    crop = det[tuple(slice(2, s - 2) for s in shape)]
    record["sdlogj_l2r"] = _std(torch.log(torch.clamp(crop + 3, 1e-9, 1e9)))
    record["ndv"] = ndv_volume(u) / float(det.numel()) * 100.0 if want_ndv else 0.0
    return record
