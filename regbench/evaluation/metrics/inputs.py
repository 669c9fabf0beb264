"""Checks of the metrics' inputs: label maps, label lists, displacements, spacings, masks (one error each)."""
from __future__ import annotations

import numpy as np


def _as_label_map(name, seg, ndim=None):
    """Return ``seg`` as a non-negative integer array, or raise ValueError naming ``name``."""
    seg = np.asarray(seg)
    if seg.ndim not in (2, 3) or (ndim is not None and seg.ndim != ndim):
        want = f"a {ndim}D" if ndim is not None else "a 2D or 3D"
        raise ValueError(f"{name} must be {want} label map, got an array of shape {seg.shape}")
    if min(seg.shape) < 1:
        raise ValueError(f"{name} is empty (shape {seg.shape})")
    if seg.dtype == bool:
        return seg.view(np.uint8)
    if np.issubdtype(seg.dtype, np.integer):
        if np.issubdtype(seg.dtype, np.signedinteger) and seg.min() < 0:
            raise ValueError(f"{name} has negative labels (min {seg.min()}); labels must be >= 0")
        return seg
    if np.issubdtype(seg.dtype, np.floating):
        # NIfTI label maps often load as float: accept them when every value is a whole number.
        if not np.isfinite(seg).all():
            raise ValueError(f"{name} is not an integer label map: it contains NaN or inf")
        if (seg != np.round(seg)).any():
            raise ValueError(f"{name} is not an integer label map: it has non-integer values")
        if seg.min() < 0:
            raise ValueError(f"{name} has negative labels (min {seg.min()}); labels must be >= 0")
        if seg.max() >= 2 ** 53:
            raise ValueError(f"{name} has labels too large to be exact in floating point")
        return seg.astype(np.int64)
    raise ValueError(f"{name} is not an integer label map (dtype {seg.dtype})")


def _as_labels(labels):
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1D sequence of label values, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError("labels must be whole numbers")
    arr = arr.astype(np.int64)
    if (arr <= 0).any():
        raise ValueError(f"labels must be positive: background 0 is never an evaluation label (got {arr.min()})")
    if np.unique(arr).size != arr.size:
        raise ValueError("labels contains duplicates")
    return arr


def _as_displacement(name, u, shape):
    u = np.asarray(u)
    expected = (len(shape), *shape)
    if u.shape != expected:
        raise ValueError(
            f"{name} has shape {u.shape}; expected {expected} (ndim x *fixed.shape, voxel units, no batch axis)"
        )
    if np.issubdtype(u.dtype, np.complexfloating) or not np.issubdtype(u.dtype, np.number):
        raise ValueError(f"{name} must be a real-valued displacement, got dtype {u.dtype}")
    if u.dtype == np.float16:
        u = u.astype(np.float32)
    elif not np.issubdtype(u.dtype, np.floating):
        u = u.astype(np.float64)
    lo, hi = u.min(), u.max()  # NaN propagates into min/max; inf shows up in one of them
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf")
    return u


def _as_spacing(spacing, ndim):
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.shape != (ndim,) or not np.isfinite(sp).all() or (sp <= 0).any():
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm per voxel), got {spacing!r}")
    return sp


def _as_mask(name, mask, shape):
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape}; expected the fixed grid {tuple(shape)}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1)")
        mask = mask.astype(bool)
    return mask


def _check_pair(fixed_seg, warped_seg, labels, warped_name="warped_seg"):
    fixed_seg = _as_label_map("fixed_seg", fixed_seg)
    warped_seg = _as_label_map(warped_name, warped_seg, fixed_seg.ndim)
    if warped_seg.shape != fixed_seg.shape:
        raise ValueError(f"{warped_name} has shape {warped_seg.shape}, fixed_seg {fixed_seg.shape}; they must match")
    return fixed_seg, warped_seg, _as_labels(labels)
