"""Per-pair evaluation metrics (shared/spec/evaluation.md), numpy/scipy, 2D and 3D (``field_torch``: the field
metrics again with torch, for a GPU).

Conventions (ARCHITECTURE.md, Learn2Reg): a displacement ``u`` has shape ``ndim x *spatial`` (no batch
axis), lives on the fixed image's grid, is measured in voxels, channel k moves along array axis k, and
``warped(x) = moving(x + u(x))``. Label maps are integer arrays; 0 is background and never an
evaluation label. Distances are in mm when a voxel ``spacing`` (mm per voxel, per array axis) is given,
in voxels otherwise.

The modules: ``overlap`` (label warping, Dice), ``surface`` (HD95), ``jacobian`` (det J, folds, SDlogJ, NDV,
end-point error), ``inputs`` (the checks); this one combines them for a pair (:func:`pair_metrics`).
What each function computes, and where it departs from the field's reference code:

- ``warp_label_map``: nearest neighbour exactly as Learn2Reg's ``map_coordinates(order=0)`` (outside
  the moving image: 0), or TransMorph's one-hot linear interpolation + argmax.
- ``dice_per_label``: 2|A∩B| / (|A|+|B|) per label from one joint histogram of the two maps. NaN when
  the label is absent from the fixed map or the moving map (Learn2Reg; ``pair_metrics``), or, without
  a moving map, from the warped one.
- ``hd95_per_label``: the 95th percentile Hausdorff distance exactly as DeepMind's ``surface-distance``
  package defines it (``compute_surface_distances`` + ``compute_robust_hausdorff(.., 95)``): surface
  points on the voxel-corner grid, each weighted by the area of its marching-cubes surface element,
  directed distances to the other surface, area-weighted percentile, max of the two directions. The
  algorithm is different (all labels' surfaces from one pass over each map, then a search in rings
  of growing radius around the surface points that stops as soon as 95 % of the area is placed, a
  k-d tree for what is left beyond 4 voxels), the numbers are the same. A label empty in either map
  gives NaN (surface-distance: inf, which would make the mean inf).
- ``jacobian_determinant`` / ``fold_pct`` / ``sdlogj``: det(∇φ), φ = id + u, by central differences
  (``numpy.gradient``: one-sided at the borders), bit for bit.
- ``sdlogj_l2r``: Learn2Reg's ``jacobian_determinant`` + ``std(log(clip(J + 3, 1e-9, 1e9)))`` on the
  image less 2 voxels at every border. Inside that crop its kernel [-0.5, 0, 0.5] (zero padded) gives
  exactly the central differences above, so both share one Jacobian.
- ``ndv``: non-diffeomorphic volume of Liu et al. 2024 (the ``digital-diffeomorphism`` package, LUMIR),
  in percent of the image; simplices that a cheap bound proves positive are not computed.
- ``end_point_error``: mean Euclidean norm of u - u_true, voxels.

Arithmetic follows u's precision (float32 stays float32, like ``numpy.gradient`` and Learn2Reg's
``correlate``; float64 stays float64); sums and standard deviations are accumulated in float64.
Fields are swept in slabs of rows with reused work arrays, so memory stays a few tens of MB above the
inputs for an OASIS-size pair.
"""
from __future__ import annotations

import numpy as np

from regbench.evaluation.metrics.inputs import (
    _as_displacement,
    _as_label_map,
    _as_labels,
    _as_mask,
    _as_spacing,
)
from regbench.evaluation.metrics.jacobian import (
    _field_pass,
    end_point_error,
    fold_pct,
    jacobian_determinant,
    ndv,
    sdlogj,
    sdlogj_l2r,
)
from regbench.evaluation.metrics.overlap import (
    _absent,
    _compact,
    _dice_from_joint,
    _joint_counts,
    _warp_linear,
    _warp_nearest,
    dice_per_label,
    warp_label_map,
)
from regbench.evaluation.metrics.surface import (
    _hd_from_compact,
    hd95_per_label,
    hd95_vox_per_label,
    surface_element_areas,
)

__all__ = [
    "dice_per_label",
    "hd95_per_label",
    "hd95_vox_per_label",
    "surface_element_areas",
    "warp_label_map",
    "jacobian_determinant",
    "fold_pct",
    "sdlogj",
    "sdlogj_l2r",
    "ndv",
    "end_point_error",
    "pair_metrics",
    "pair_dice",
]


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float("nan")


def _label_overlap(fixed_seg, moving_seg, u, labels, label_warp):
    """(compact fixed map, compact warped map, Dice per label with Learn2Reg's absent-label rule) of checked inputs."""
    if label_warp not in ("nearest", "linear"):
        raise ValueError(f"label_warp must be 'nearest' or 'linear', got {label_warp!r}")
    cf = _compact(fixed_seg, labels)
    cm = _compact(moving_seg, labels)
    if label_warp == "nearest":
        cw = _warp_nearest(cm, u)  # warping the compact map = compacting the warped map
    else:
        cw = _compact(_warp_linear(moving_seg, u), labels)
    joint = _joint_counts(cf, cw, len(labels))
    return cf, cw, _dice_from_joint(joint, _absent(joint, cm))


def pair_dice(fixed_seg, moving_seg, u, labels, label_warp="nearest") -> float:
    """:func:`pair_metrics`'s ``dice`` alone (mean label Dice after warping ``moving_seg`` by ``u``), without the
    surface distances and the field metrics: what model selection scores a checkpoint by."""
    fixed_seg = _as_label_map("fixed_seg", fixed_seg)
    moving_seg = _as_label_map("moving_seg", moving_seg, fixed_seg.ndim)
    labels = _as_labels(labels)
    u = _as_displacement("u", u, fixed_seg.shape)
    return _nanmean(_label_overlap(fixed_seg, moving_seg, u, labels, label_warp)[2])


def pair_metrics(fixed_seg, moving_seg, u, labels, spacing=None, u_true=None, fixed_mask=None,
                 label_warp="nearest", device=None):
    """Every per-pair metric of spec/evaluation.md for one registered pair.

    Warps ``moving_seg`` by ``u`` (``warp_label_map``; ``label_warp`` "nearest" = Learn2Reg, "linear" =
    one-hot linear + argmax), then:

    - dice: mean over ``labels`` of the per-label Dice, NaN labels (absent from the fixed or the moving
      map, Learn2Reg's rule) left out;
    - hd95 (mm, ``spacing``) and hd95_vox (voxels): means of the per-label values, NaN labels (empty in
      the fixed or the warped map) left out;
    - fold_pct, fold_pct_mask (within ``fixed_mask``, default ``fixed_seg > 0``), sdlogj, sdlogj_l2r,
      ndv: from u alone;
    - epe: end-point error against ``u_true`` over the same mask (NaN without ``u_true``).

    With a torch ``device`` (scoring on a GPU passes its own), the Jacobian metrics and NDV run with torch there
    (``field_torch``); HD95 and the label warp stay on the CPU.

    Returns ``(scalars, per_label)``: a dict of floats plus ``label_warp``, and a pandas DataFrame with
    one row per label (label, dice, hd95, hd95_vox).
    """
    import pandas as pd

    fixed_seg = _as_label_map("fixed_seg", fixed_seg)
    moving_seg = _as_label_map("moving_seg", moving_seg, fixed_seg.ndim)
    labels = _as_labels(labels)
    u = _as_displacement("u", u, fixed_seg.shape)
    if min(fixed_seg.shape) < 2:
        raise ValueError(f"fixed_seg needs at least 2 voxels along every axis, got {fixed_seg.shape}")
    sp = _as_spacing(spacing, fixed_seg.ndim)
    if u_true is not None:
        u_true = _as_displacement("u_true", u_true, fixed_seg.shape)
    mask = _as_mask("fixed_mask", fixed_mask, fixed_seg.shape) if fixed_mask is not None else None

    n = len(labels)
    cf, cw, dice = _label_overlap(fixed_seg, moving_seg, u, labels, label_warp)
    if mask is None:
        mask = fixed_seg > 0

    isotropic = bool(np.all(sp == 1.0))
    spacings = [sp] if isotropic else [sp, np.ones_like(sp)]
    hd = _hd_from_compact(cf, cw, n, spacings)
    hd_mm, hd_vox = hd[0], hd[-1]

    if device is None:
        field = _field_pass(u, mask=mask, want_ndv=True)
    else:  # the voxel-wise field metrics with torch on that device (a GPU): the same fold counts, see field_torch
        import torch

        from regbench.evaluation.metrics.field_torch import field_pass

        field = field_pass(torch.from_numpy(np.ascontiguousarray(u)).to(device),
                           torch.from_numpy(np.ascontiguousarray(mask)), want_ndv=True)
    nvox = float(np.prod(fixed_seg.shape))
    scalars = {
        "dice": _nanmean(dice),
        "hd95": _nanmean(hd_mm),
        "hd95_vox": _nanmean(hd_vox),
        "fold_pct": 100.0 * field["n_fold"] / nvox,
        "fold_pct_mask": 100.0 * field["n_fold_mask"] / field["n_mask"] if field["n_mask"] else float("nan"),
        "sdlogj": field["sdlogj"],
        "sdlogj_l2r": field["sdlogj_l2r"],
        "ndv": field["ndv"],
        "epe": end_point_error(u, u_true, mask) if u_true is not None else float("nan"),
        "label_warp": label_warp,
    }
    per_label = pd.DataFrame({"label": labels, "dice": dice, "hd95": hd_mm, "hd95_vox": hd_vox})
    return scalars, per_label
