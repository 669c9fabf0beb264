"""Label maps: compact relabelling, warping by a displacement (nearest as Learn2Reg, or one-hot linear), Dice."""
from __future__ import annotations

import itertools

import numpy as np

from regbench.evaluation.metrics.inputs import _as_displacement, _as_label_map, _check_pair


def _compact(seg, labels):
    """Map label ``labels[i]`` to i + 1 and everything else to 0 (uint8 when there are < 255 labels)."""
    n = len(labels)
    dtype = np.uint8 if n < 255 else (np.uint16 if n < 65535 else np.uint32)
    top = int(seg.max()) if seg.size else 0
    if seg.dtype == dtype and top <= n and np.array_equal(labels, np.arange(1, n + 1)):
        return seg  # already compact (labels 1..n, nothing else)
    if top < 1 << 24:
        lut = np.zeros(max(top, int(labels.max())) + 1, dtype)
        lut[labels] = np.arange(1, n + 1, dtype=dtype)
        return lut[seg]
    order = np.argsort(labels)
    sorted_labels = labels[order]
    pos = np.clip(np.searchsorted(sorted_labels, seg), 0, n - 1)
    return np.where(sorted_labels[pos] == seg, order[pos] + 1, 0).astype(dtype)


def _slab_rows(n0, voxels_per_row, target=1 << 17):
    return max(1, min(n0, target // max(voxels_per_row, 1)))


def warp_label_map(moving_seg, u, mode="nearest"):
    """Warp a label map onto the fixed grid: ``out(x) = moving_seg(x + u(x))``.

    ``mode="nearest"`` is Learn2Reg's ``scipy.ndimage.map_coordinates(moving, id + u, order=0)`` to the
    bit (default ``mode='constant'``): a position outside [0, n-1] on any axis gives label 0, otherwise
    the nearest voxel, halves rounded up. ``mode="linear"`` is TransMorph's / LKU-Net's: one-hot maps of
    every label value present, (bi/tri)linear interpolation with zero padding, argmax (ties to the
    smaller label value; 0 where no in-image neighbour has weight). ``u`` lives on the fixed grid,
    which may differ from the moving one.
    """
    moving_seg = _as_label_map("moving_seg", moving_seg)
    u = np.asarray(u)
    ndim = moving_seg.ndim
    if u.ndim != ndim + 1 or u.shape[0] != ndim:
        raise ValueError(f"u has shape {u.shape}; expected ({ndim}, *fixed.shape)")
    u = _as_displacement("u", u, u.shape[1:])
    if mode == "nearest":
        return _warp_nearest(moving_seg, u)
    if mode == "linear":
        return _warp_linear(moving_seg, u)
    raise ValueError(f"label_warp/mode must be 'nearest' or 'linear', got {mode!r}")


def _warp_nearest(moving, u):
    shape = u.shape[1:]
    ndim = len(shape)
    mshape = moving.shape
    strides = [int(np.prod(mshape[k + 1:])) for k in range(ndim)]
    flat = moving.ravel()
    out = np.empty(shape, moving.dtype)
    itype = np.int32 if moving.size < 2 ** 31 else np.int64
    rows = _slab_rows(shape[0], int(np.prod(shape[1:])))
    grids = [np.arange(n, dtype=np.float64) for n in shape]
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        valid = None
        index = None
        for k in range(ndim):
            g = grids[k][a:b] if k == 0 else grids[k]
            c = u[k, a:b] + g.reshape([-1 if j == k else 1 for j in range(ndim)])  # float64, as Learn2Reg
            ok = (c >= 0) & (c <= mshape[k] - 1)  # scipy's mode='constant': outside [0, n-1] -> 0
            valid = ok if valid is None else (valid & ok)
            c += 0.5
            ik = c.astype(itype)  # floor(c + 0.5) where valid (c + 0.5 > 0)
            if strides[k] != 1:
                ik *= strides[k]
            index = ik if index is None else (index + ik)
        vals = np.take(flat, index, mode="clip")
        vals[~valid] = 0
        out[a:b] = vals
    return out


def _warp_linear(moving, u):
    shape = u.shape[1:]
    ndim = len(shape)
    mshape = moving.shape
    strides = [int(np.prod(mshape[k + 1:])) for k in range(ndim)]
    flat = moving.ravel()
    out = np.empty(shape, moving.dtype)
    rows = _slab_rows(shape[0], int(np.prod(shape[1:])), target=1 << 15)
    grids = [np.arange(n, dtype=np.float64) for n in shape]
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        lows, fracs = [], []
        for k in range(ndim):
            g = grids[k][a:b] if k == 0 else grids[k]
            g = g.reshape([-1 if j == k else 1 for j in range(ndim)])
            t = u[k, a:b] + g
            f = np.floor(t)
            lows.append(f.astype(np.int64))
            fracs.append(t - f)
        labs, weights = [], []
        for corner in itertools.product((0, 1), repeat=ndim):
            w = None
            idx = None
            ok = None
            for k, c in enumerate(corner):
                ik = lows[k] + c
                wk = fracs[k] if c else 1.0 - fracs[k]
                okk = (ik >= 0) & (ik <= mshape[k] - 1)
                w = wk if w is None else w * wk
                ok = okk if ok is None else ok & okk
                idx = ik * strides[k] if idx is None else idx + ik * strides[k]
            weights.append(np.where(ok, w, 0.0))
            labs.append(np.take(flat, idx, mode="clip"))
        best_score = np.zeros(labs[0].shape)
        best_label = np.zeros(labs[0].shape, moving.dtype)
        for i in range(len(labs)):
            score = np.zeros(labs[0].shape)
            for j in range(len(labs)):
                score += np.where(labs[j] == labs[i], weights[j], 0.0)
            better = (score > best_score) | ((score == best_score) & (score > 0) & (labs[i] < best_label))
            best_score = np.where(better, score, best_score)
            best_label = np.where(better, labs[i], best_label)
        out[a:b] = best_label
    return out


def _joint_counts(cf, cw, n_labels):
    """(L+1) x (L+1) joint histogram of two compact label maps (row: first map, column: second)."""
    size = n_labels + 1
    if size * size <= 1 << 16:
        joint = cf.astype(np.uint16)
        joint *= size
        joint += cw
    else:
        joint = cf.astype(np.int64) * size + cw
    return np.bincount(joint.ravel(), minlength=size * size).reshape(size, size)


def _dice_from_joint(joint, absent):
    inter = np.diag(joint)[1:].astype(np.float64)
    total = joint.sum(1)[1:] + joint.sum(0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * inter / total
    dice[absent] = np.nan
    return dice


def _absent(joint, moving_compact=None):
    """Labels absent from the fixed map, or from the moving map (when given) else the warped map."""
    absent = joint.sum(1)[1:] == 0
    gone = np.flatnonzero(joint.sum(0)[1:] == 0)  # absent after warping: absent from moving too?
    if moving_compact is None:
        absent[gone] = True
    elif gone.size > 4:
        absent |= np.bincount(moving_compact.ravel(), minlength=joint.shape[0])[1:] == 0
    else:
        for i in gone:
            absent[i] |= not np.any(moving_compact == i + 1)
    return absent


def dice_per_label(fixed_seg, warped_seg, labels, moving_seg=None):
    """Dice 2|A∩B|/(|A|+|B|) of each label (A in ``fixed_seg``, B in ``warped_seg``), in ``labels`` order.

    NaN where the label is absent from ``fixed_seg``, or absent from ``moving_seg`` when it is given
    (Learn2Reg's rule, used by ``pair_metrics``; a label warped out of existence then scores 0),
    or else absent from ``warped_seg``. One pass: a joint histogram of the two maps.
    """
    fixed_seg, warped_seg, labels = _check_pair(fixed_seg, warped_seg, labels)
    cf = _compact(fixed_seg, labels)
    cw = _compact(warped_seg, labels)
    cm = None
    if moving_seg is not None:
        cm = _compact(_as_label_map("moving_seg", moving_seg, fixed_seg.ndim), labels)
    joint = _joint_counts(cf, cw, len(labels))
    return _dice_from_joint(joint, _absent(joint, cm))
