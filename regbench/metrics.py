"""Per-pair evaluation metrics (shared/spec/evaluation.md), numpy/scipy only, 2D and 3D.

Conventions (ARCHITECTURE.md, Learn2Reg): a displacement ``u`` has shape ``ndim x *spatial`` (no batch
axis), lives on the fixed image's grid, is measured in voxels, channel k moves along array axis k, and
``warped(x) = moving(x + u(x))``. Label maps are integer arrays; 0 is background and never an
evaluation label. Distances are in mm when a voxel ``spacing`` (mm per voxel, per array axis) is given,
in voxels otherwise.

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

import functools
import itertools
import math

import numpy as np
from scipy.spatial import cKDTree

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
]

# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# label maps: compact relabelling, warping, Dice
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# surface distances (DeepMind surface-distance semantics)
# --------------------------------------------------------------------------------------------------

# Bit weight of the voxel at offset delta in a 2^ndim neighbourhood of a corner: the first voxel
# (all offsets 0) is the most significant bit, as surface-distance's ENCODE_NEIGHBOURHOOD kernels.
def _corner_offsets(ndim):
    return list(itertools.product((0, 1), repeat=ndim))


@functools.lru_cache(maxsize=None)
def _surfel_normals_3d():
    """Area vectors of the marching-cubes triangles of each of the 256 2x2x2 codes (unit spacing).

    Reconstructed rule, checked against surface-distance's table (all 256 codes, random spacings):
    edge midpoints as vertices; a code with more than 4 voxels inside is handled as its complement
    (the table is complement-symmetric); on a face with two diagonal voxels inside, the inside voxels
    are cut off separately; every polygon is split into the triangles of largest total area.
    """
    corners = _corner_offsets(3)
    weight = {c: 128 >> i for i, c in enumerate(corners)}
    table = []
    for code in range(256):
        if bin(code).count("1") > 4:
            code = 255 - code
        inside = {c: bool(code & weight[c]) for c in corners}
        segments = []
        for axis in range(3):
            other = [k for k in range(3) if k != axis]
            for value in (0, 1):
                ring = []  # the face's four voxels in cyclic order
                for p, q in ((0, 0), (1, 0), (1, 1), (0, 1)):
                    c = [0, 0, 0]
                    c[axis], c[other[0]], c[other[1]] = value, p, q
                    ring.append(tuple(c))
                crossings = {}
                for i in range(4):
                    p, q = ring[i], ring[(i + 1) % 4]
                    if inside[p] != inside[q]:
                        crossings[i] = tuple((a + b) / 2 for a, b in zip(p, q))
                if len(crossings) == 2:
                    segments.append(tuple(crossings.values()))
                elif len(crossings) == 4:
                    for i in range(4):
                        if inside[ring[i]]:
                            segments.append((crossings[(i - 1) % 4], crossings[i]))
        polygons = []
        while segments:
            a, b = segments.pop()
            poly = [a, b]
            while poly[-1] != poly[0]:
                for i, (p, q) in enumerate(segments):
                    if p == poly[-1] or q == poly[-1]:
                        poly.append(q if p == poly[-1] else p)
                        segments.pop(i)
                        break
            polygons.append(np.array(poly[:-1], dtype=np.float64))
        normals = []
        for poly in polygons:
            best, best_area = None, -1.0
            for tris in _triangulations(tuple(range(len(poly)))):
                vecs = [0.5 * np.cross(poly[j] - poly[i], poly[k] - poly[i]) for i, j, k in tris]
                area = sum(np.linalg.norm(v) for v in vecs)
                if area > best_area + 1e-12:
                    best, best_area = vecs, area
            normals.extend(best)
        table.append(np.array(normals, dtype=np.float64).reshape(-1, 3))
    return table


@functools.lru_cache(maxsize=None)
def _triangulations(idx):
    if len(idx) < 3:
        return [[]]
    out = []
    for k in range(1, len(idx) - 1):
        for left in _triangulations(idx[: k + 1]):
            for right in _triangulations(idx[k:]):
                out.append(left + right + [(idx[0], idx[k], idx[-1])])
    return out


def surface_element_areas(spacing):
    """Area (3D, mm^2) or length (2D, mm) of the surface element of every corner-neighbourhood code.

    Index = the code of a corner's 2^ndim voxel neighbourhood (first voxel = most significant bit);
    the values are surface-distance's ``create_table_neighbour_code_to_surface_area`` /
    ``..._contour_length``.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape == (2,):
        out = np.zeros(16)
        diag = 0.5 * math.sqrt(sp[0] ** 2 + sp[1] ** 2)
        for code in range(16):
            n = bin(code).count("1")
            if n in (1, 3):
                out[code] = diag
            elif code in (0b0011, 0b1100):  # a row of two: the contour runs along axis 1
                out[code] = sp[1]
            elif code in (0b0101, 0b1010):  # a column of two: along axis 0
                out[code] = sp[0]
            elif code in (0b0110, 0b1001):
                out[code] = 2 * diag
        return out
    if sp.shape != (3,):
        raise ValueError(f"spacing must have 2 or 3 entries, got {spacing!r}")
    scale = np.array([sp[1] * sp[2], sp[0] * sp[2], sp[0] * sp[1]])
    return np.array([np.linalg.norm(n * scale, axis=1).sum() for n in _surfel_normals_3d()])


def _equal_bits(packed, value, nbytes):
    """Bit (nbytes-1-j) set where byte j of ``packed`` equals ``value`` (both unsigned, one per row)."""
    if nbytes == 8:
        utype, low7, ones, magic, shift = np.uint64, 0x7F7F7F7F7F7F7F7F, 0x0101010101010101, 0x8040201008040201, 56
    else:
        utype, low7, ones, magic, shift = np.uint32, 0x7F7F7F7F, 0x01010101, 0x80402010, 28
    low7, ones, magic = utype(low7), utype(ones), utype(magic)
    x = packed.astype(utype) ^ (value.astype(utype) * ones)  # native byte order from here on
    # exact zero-byte test: the high bit of a byte of y is set iff that byte of x is 0
    y = (x & low7) + low7
    y |= x
    y |= low7
    np.invert(y, out=y)
    y >>= utype(7)
    y *= magic  # gathers the byte flags into the top byte, first byte most significant
    y >>= utype(shift)
    return y.astype(np.uint8)


class _Surfaces:
    """Surface points of every label of one compact label map, on the corner grid of a padded box.

    A corner at position q (flat index into the padded array, margin ``pad``) is a surface point of
    label l when its 2^ndim neighbouring voxels contain l and something else. Its code for l has one
    bit per neighbour that is l (surface-distance's neighbour code).
    """

    def __init__(self, compact, n_labels, pad, chunk=1 << 18):
        ndim = compact.ndim
        n = compact.shape
        self.shape = tuple(s + 2 * pad + 2 for s in n)
        box = np.zeros(self.shape, compact.dtype)
        box[tuple(slice(pad + 1, pad + 1 + s) for s in n)] = compact
        # A corner's cube of 2^ndim voxels is mixed unless the edges of a spanning tree agree: every
        # edge along the last axis, the edges along the axis before it on the face at offset 0 of
        # the last axis, and so on down to one edge along axis 0.
        region = box[tuple(slice(pad, pad + s + 2) for s in n)]  # the voxels around corners pad..pad+n
        mixed = None
        for axis in range(ndim - 1, -1, -1):
            hi = [slice(None)] * ndim
            lo = [slice(None)] * ndim
            hi[axis], lo[axis] = slice(1, None), slice(None, -1)
            diff = region[tuple(hi)] != region[tuple(lo)]
            for other in range(axis):  # either offset along the axes before ``axis``
                a = [slice(None)] * ndim
                b = [slice(None)] * ndim
                a[other], b[other] = slice(None, -1), slice(1, None)
                diff = diff[tuple(a)] | diff[tuple(b)]
            diff = diff[tuple(slice(0, s + 1) for s in n)]  # offset 0 along the axes after it
            mixed = diff if mixed is None else (mixed | diff)
        full = np.zeros(self.shape, bool)
        full[tuple(slice(pad, pad + s + 1) for s in n)] = mixed
        where = np.flatnonzero(full)
        del full, mixed
        strides = np.array([int(np.prod(self.shape[k + 1:])) for k in range(ndim)])
        offsets = _corner_offsets(ndim)
        k = len(offsets)
        delta_flat = np.array([int(np.dot(d, strides)) for d in offsets])
        flat = box.ravel()
        points, labs, codes = [], [], []
        for s in range(0, where.size, chunk):
            q = where[s:s + chunk]
            cols = np.empty((k, q.size), box.dtype)  # the labels of the 2^ndim voxels around each corner
            for j in range(k):
                np.take(flat, q + delta_flat[j], out=cols[j])
            first = cols != 0  # the first voxel of its label around the corner, and not background
            for j in range(1, k):
                for i in range(j):
                    first[j] &= cols[i] != cols[j]
            r = [np.flatnonzero(first[j]) for j in range(k)]
            lab = np.concatenate([cols[j][r[j]] for j in range(k)])
            r = np.concatenate(r)
            if box.dtype == np.uint8:  # all k labels of a corner in one little-endian word
                packed = np.ascontiguousarray(cols.T).view("<u8" if k == 8 else "<u4")[:, 0]
                code = _equal_bits(packed[r], lab, k)
            else:
                code = np.zeros(lab.size, np.uint8)
                for i in range(k):
                    code |= (cols[i, r] == lab).astype(np.uint8) << np.uint8(k - 1 - i)
            points.append(q[r])
            labs.append(lab)
            codes.append(code)
        itype = np.int32 if int(np.prod(self.shape)) < 2 ** 31 else np.int64
        points = (np.concatenate(points) if points else np.zeros(0, np.intp)).astype(itype)
        labs = np.concatenate(labs) if labs else np.zeros(0, box.dtype)
        codes = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
        order = np.argsort(labs, kind="stable")
        self.points = points[order]
        self.codes = codes[order]
        counts = np.bincount(labs, minlength=n_labels + 1)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.strides = strides

    def label(self, i):
        """Points (flat indices) and codes of compact label i."""
        a, b = self.starts[i], self.starts[i + 1]
        return self.points[a:b], self.codes[a:b]

    def coords(self, points):
        return np.stack(np.unravel_index(points, self.shape), axis=1).astype(np.float64)


@functools.lru_cache(maxsize=64)
def _shells(spacing, radius, strides):
    """Integer offsets with physical length <= radius * min(spacing), grouped by length, ascending.

    Returns a list of (length, tuple of flat offsets into an array with the given element strides).
    """
    ndim = len(spacing)
    sp = np.array(spacing)
    grid = np.stack(np.meshgrid(*[np.arange(-radius, radius + 1)] * ndim, indexing="ij"), -1).reshape(-1, ndim)
    dist = np.sqrt(((grid * sp) ** 2).sum(1))
    keep = dist <= radius * sp.min()
    grid, dist = grid[keep], dist[keep]
    flat = grid @ np.array(strides)
    values, inverse = np.unique(dist, return_inverse=True)
    return [(float(d), tuple(int(x) for x in flat[inverse == i])) for i, d in enumerate(values)]


def _directed_percentile(points, areas, member, shells, target_points, surfaces, spacing, percent):
    """Area-weighted ``percent`` percentile of the distances from ``points`` to the surface in ``member``.

    Same value as surface-distance: sort the distances, cumulate the areas, take the first distance at
    which the cumulated fraction reaches percent/100. Rings of increasing radius (all offsets of one
    length at a time) are searched around the pending points until that fraction is placed; what is
    still pending beyond the largest ring is measured exactly with a k-d tree.
    """
    total = float(areas.sum())
    goal = percent / 100.0
    placed = 0.0
    pending, pending_areas = points, areas
    idx = np.empty(points.size, points.dtype)
    got = np.empty(points.size, bool)
    hit = np.empty(points.size, bool)
    for dist, offsets in shells:
        p = pending.size
        h = hit[:p]
        for j, off in enumerate(offsets):
            np.add(pending, off, out=idx[:p])
            np.take(member, idx[:p], out=h if j == 0 else got[:p])
            if j:
                h |= got[:p]
        placed += float(np.sum(pending_areas, where=h))
        if placed >= goal * total and placed / total >= goal:
            return dist
        np.logical_not(h, out=h)
        pending, pending_areas = pending[h], pending_areas[h]
        if pending.size == 0:
            return dist
    tree = cKDTree(surfaces.coords(target_points) * spacing)
    d, _ = tree.query(surfaces.coords(pending) * spacing)
    order = np.lexsort((pending_areas, d))
    d, a = d[order], pending_areas[order]
    cum = (placed + np.cumsum(a)) / total
    i = min(int(np.searchsorted(cum, goal)), d.size - 1)
    return float(d[i])


def _hd_from_compact(cf, cw, n_labels, spacings, percent=95.0, radius=4):
    """Per-label robust Hausdorff distance for each spacing in ``spacings``: array (len(spacings), L)."""
    out = np.full((len(spacings), n_labels), np.nan)
    s1 = _Surfaces(cf, n_labels, radius)
    s2 = _Surfaces(cw, n_labels, radius)
    size = int(np.prod(s1.shape))
    m1 = np.zeros(size, bool)
    m2 = np.zeros(size, bool)
    tables = [surface_element_areas(sp) for sp in spacings]
    shells = [_shells(tuple(float(x) for x in sp), radius, tuple(int(x) for x in s1.strides)) for sp in spacings]
    for i in range(1, n_labels + 1):
        p1, c1 = s1.label(i)
        p2, c2 = s2.label(i)
        if p1.size == 0 or p2.size == 0:
            continue
        m1[p1] = True
        m2[p2] = True
        for j, sp in enumerate(spacings):
            a1, a2 = tables[j][c1], tables[j][c2]
            d12 = _directed_percentile(p1, a1, m2, shells[j], p2, s1, sp, percent)
            d21 = _directed_percentile(p2, a2, m1, shells[j], p1, s1, sp, percent)
            out[j, i - 1] = max(d12, d21)
        m1[p1] = False
        m2[p2] = False
    return out


def hd95_per_label(fixed_seg, warped_seg, labels, spacing=None, percent=95.0):
    """95th percentile Hausdorff distance per label, as surface-distance computes it, in mm.

    ``compute_robust_hausdorff(compute_surface_distances(fixed == l, warped == l, spacing), percent)``:
    surface elements on the voxel-corner grid weighted by their area, the area-weighted percentile of
    each directed set of distances, the larger of the two. ``spacing`` None means 1 (voxel units,
    what Learn2Reg reports). NaN where the label is empty in either map (surface-distance gives inf).
    """
    fixed_seg, warped_seg, labels = _check_pair(fixed_seg, warped_seg, labels)
    sp = _as_spacing(spacing, fixed_seg.ndim)
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    cf = _compact(fixed_seg, labels)
    cw = _compact(warped_seg, labels)
    return _hd_from_compact(cf, cw, len(labels), [sp], percent)[0]


def hd95_vox_per_label(fixed_seg, warped_seg, labels):
    """``hd95_per_label`` with spacing 1: Learn2Reg's HD95, in voxels."""
    return hd95_per_label(fixed_seg, warped_seg, labels, None)


# --------------------------------------------------------------------------------------------------
# Jacobian determinant, folding, SDlogJ, NDV
# --------------------------------------------------------------------------------------------------


def _work_dtype(u):
    return u.dtype if u.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _diff2(f, axis, out):
    """2 x numpy.gradient(f, axis=axis): f[i+1] - f[i-1] inside, 2 (f[1] - f[0]) and 2 (f[-1] - f[-2]) at the ends."""
    n = f.shape[axis]

    def sl(a, b):
        idx = [slice(None)] * f.ndim
        idx[axis] = slice(a, b)
        return tuple(idx)

    np.subtract(f[sl(2, None)], f[sl(None, -2)], out=out[sl(1, -1)])
    np.subtract(f[sl(1, 2)], f[sl(0, 1)], out=out[sl(0, 1)])
    np.subtract(f[sl(n - 1, n)], f[sl(n - 2, n - 1)], out=out[sl(n - 1, n)])
    out[sl(0, 1)] *= 2
    out[sl(n - 1, n)] *= 2


def _diff2_rows(ext, lo, a, b, n0, out):
    """``_diff2`` along spatial axis 0 for rows a..b-1, from ``ext`` = rows lo.. of the field."""
    r0, r1 = max(a, 1), min(b, n0 - 1)
    if r1 > r0:
        np.subtract(ext[r0 + 1 - lo:r1 + 1 - lo], ext[r0 - 1 - lo:r1 - 1 - lo], out=out[r0 - a:r1 - a])
    if a == 0:
        np.subtract(ext[1 - lo], ext[0 - lo], out=out[0])
        out[0] *= 2
    if b == n0:
        np.subtract(ext[n0 - 1 - lo], ext[n0 - 2 - lo], out=out[b - 1 - a])
        out[b - 1 - a] *= 2


def _det(m):
    """Determinant of the matrix of arrays m[row][col] (2x2 or 3x3)."""
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def _det_into(m, out, t1, t2):
    """``_det(m)`` written into ``out`` with two scratch arrays: same operations, same bits."""
    if len(m) == 2:
        np.multiply(m[0][0], m[1][1], out=out)
        np.multiply(m[0][1], m[1][0], out=t1)
        return np.subtract(out, t1, out=out)
    np.multiply(m[1][1], m[2][2], out=t1)
    np.multiply(m[1][2], m[2][1], out=t2)
    np.subtract(t1, t2, out=t1)
    np.multiply(m[0][0], t1, out=out)
    np.multiply(m[1][0], m[2][2], out=t1)
    np.multiply(m[1][2], m[2][0], out=t2)
    np.subtract(t1, t2, out=t1)
    np.multiply(m[0][1], t1, out=t1)
    np.subtract(out, t1, out=out)
    np.multiply(m[1][0], m[2][1], out=t1)
    np.multiply(m[1][1], m[2][0], out=t2)
    np.subtract(t1, t2, out=t1)
    np.multiply(m[0][2], t1, out=t1)
    return np.add(out, t1, out=out)


class _Scratch:
    """Reusable work arrays by name and shape: the slab loops allocate nothing per slab (fresh
    multi-megabyte temporaries cost page faults that can outweigh the arithmetic)."""

    def __init__(self):
        self._arrays = {}

    def __call__(self, name, shape, dtype):
        key = (name, tuple(int(x) for x in shape), np.dtype(dtype))
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = np.empty(key[1], key[2])
        return arr


class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.), float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values, scratch, where=None, count=None):
        """Add ``values`` (or those where ``where``); ``scratch``: a work array of the same shape."""
        k = values.size if where is None else count
        if k == 0:
            return
        mean = float(np.sum(values, dtype=np.float64, where=True if where is None else where)) / k
        dev = np.subtract(values, values.dtype.type(mean), out=scratch, where=True if where is None else where)
        np.square(dev, out=dev, where=True if where is None else where)
        m2 = float(np.sum(dev, dtype=np.float64, where=True if where is None else where))
        n = self.n + k
        delta = mean - self.mean
        self.mean += delta * k / n
        self.m2 += m2 + delta * delta * self.n * k / n
        self.n = n

    def std(self):
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")


def _field_pass(u, mask=None, det_out=None, want_ndv=False):
    """One sweep over the field in slabs of rows.

    Central-difference Jacobian: fold counts (whole image, within ``mask``), SDlogJ, Learn2Reg's SDlogJ,
    optionally the determinant itself (``det_out``); with ``want_ndv`` the non-diffeomorphic volume.
    The Jacobian is built from undivided differences (2 x numpy.gradient) and 2 I; its determinant
    divided by 2^ndim is bit for bit the numpy.gradient one (scaling by 2 is exact).
    """
    ndim = u.ndim - 1
    shape = u.shape[1:]
    n0 = shape[0]
    wt = _work_dtype(u)
    rest = tuple(shape[1:])
    rows = _slab_rows(n0, int(np.prod(rest)), target=1 << 18)
    scale = wt.type(0.5 ** ndim)
    n_fold = n_fold_mask = n_mask = 0
    logs, logs_l2r = _Moments(), _Moments()
    crop = tuple(slice(2, s - 2) for s in rest)
    ndv_sum = 0.0
    ndv_state = _NdvState()
    scratch = _Scratch()
    for a in range(0, n0, rows):
        b = min(a + rows, n0)
        slab = (b - a,) + rest
        lo, hi = max(a - 1, 0), min(b + 1, n0)
        ext = u[:, lo:hi].astype(wt, copy=False)
        g = scratch("grad", (ndim, ndim) + slab, wt)
        for c in range(ndim):
            _diff2_rows(ext[c], lo, a, b, n0, g[c, 0])
            body = ext[c, a - lo:b - lo]
            for k in range(1, ndim):
                _diff2(body, k, g[c, k])
        for k in range(ndim):
            g[k, k] += 2
        det = _det_into(g, scratch("det", slab, wt), scratch("t1", slab, wt), scratch("t2", slab, wt))
        det *= scale
        if det_out is not None:
            det_out[a:b] = det
        if mask is not None:
            msl = mask[a:b]
            n_mask += int(np.count_nonzero(msl))
        work = scratch("t1", slab, wt)
        if det.min() > 0:
            logs.add(np.log(det, out=work), scratch("t2", slab, wt))
        else:
            positive = np.greater(det, 0, out=scratch("positive", slab, bool))
            count = int(np.count_nonzero(positive))
            n_fold += positive.size - count
            if mask is not None:
                n_fold_mask += int(np.count_nonzero(msl & ~positive))
            logs.add(np.log(det, out=work, where=positive), scratch("t2", slab, wt), positive, count)
        r0, r1 = max(a, 2), min(b, n0 - 2)
        if r1 > r0:
            view = det[(slice(r0 - a, r1 - a),) + crop]
            inner = np.add(view, wt.type(3), out=scratch("l2r", view.shape, wt))
            if inner.size and not (inner.min() >= 1e-9 and inner.max() <= 1e9):
                np.clip(inner, 1e-9, 1e9, out=inner)
            logs_l2r.add(np.log(inner, out=inner), scratch("l2r_dev", view.shape, wt))
        if want_ndv:
            ndv_sum += _ndv_slab(u, a, b, wt, ndv_state, scratch)
    return {
        "n_fold": n_fold, "n_fold_mask": n_fold_mask, "n_mask": n_mask,
        "sdlogj": logs.std(), "sdlogj_l2r": logs_l2r.std(),
        "ndv": ndv_sum / float(np.prod(shape)) * 100.0,
    }


def _at(arr, shift, n):
    """View of ``arr`` (component axis first) at padded positions 1 + shift .. 1 + shift + n per axis."""
    return arr[(slice(None),) + tuple(slice(1 + s, 1 + s + m) for s, m in zip(shift, n))]


def _negative_sum(det):
    """Sum of the negative entries of ``det`` (float64)."""
    if det.size == 0 or det.min() >= 0:
        return 0.0
    return float(np.sum(det, dtype=np.float64, where=det < 0))


def _det_columns(a, b, c, out=None, t1=None, t2=None):
    """det of the 3x3 matrices with columns a, b, c (each 3 x ...): a . (b x c)."""
    if out is None:
        out = np.empty(a.shape[1:], a.dtype)
        t1 = np.empty_like(out)
        t2 = np.empty_like(out)
    np.multiply(b[1], c[2], out=t1)
    np.multiply(b[2], c[1], out=t2)
    np.subtract(t1, t2, out=t1)
    np.multiply(a[0], t1, out=out)
    np.multiply(b[2], c[0], out=t1)
    np.multiply(b[0], c[2], out=t2)
    np.subtract(t1, t2, out=t1)
    np.multiply(a[1], t1, out=t1)
    np.add(out, t1, out=out)
    np.multiply(b[0], c[1], out=t1)
    np.multiply(b[1], c[0], out=t2)
    np.subtract(t1, t2, out=t1)
    np.multiply(a[2], t1, out=t1)
    return np.add(out, t1, out=out)


def _corner_simplices(get, ndim, buffers):
    """Sum of the negative determinants of the 2^ndim corner simplices at the selected voxels.

    Columns: the forward (shift 0) or backward (shift -e_k) difference D_k along each axis k.
    ``buffers(name)`` gives work arrays shaped like one component of ``get``'s results.
    """
    zero = (0,) * ndim
    fwd = [get(k, zero) for k in range(ndim)]
    bwd = [get(k, tuple(-1 if j == k else 0 for j in range(ndim))) for k in range(ndim)]
    det, t1 = buffers("det"), buffers("t1")
    total = 0.0
    if ndim == 2:
        for a in (fwd[0], bwd[0]):
            for b in (fwd[1], bwd[1]):
                np.multiply(a[0], b[1], out=det)
                np.multiply(a[1], b[0], out=t1)
                total += _negative_sum(np.subtract(det, t1, out=det))
        return total
    cross = [buffers("c0"), buffers("c1"), buffers("c2")]
    for b in (fwd[1], bwd[1]):
        for c in (fwd[2], bwd[2]):
            for r, (i, j) in enumerate(((1, 2), (2, 0), (0, 1))):
                np.multiply(b[i], c[j], out=cross[r])
                np.multiply(b[j], c[i], out=t1)
                np.subtract(cross[r], t1, out=cross[r])
            for a in (fwd[0], bwd[0]):
                np.multiply(a[0], cross[0], out=det)
                np.multiply(a[1], cross[1], out=t1)
                np.add(det, t1, out=det)
                np.multiply(a[2], cross[2], out=t1)
                total += _negative_sum(np.add(det, t1, out=det))
    return total


def _central_tetrahedra(get, buffers):
    """Sum of the negative determinants of the two central tetrahedra at the selected voxels (3D).

    ``get(("diag", i, j), shift)`` is the diagonal difference phi(y + e_i + e_j) - phi(y) at x + shift.
    """
    det, t1, t2 = buffers("det"), buffers("t1"), buffers("t2")
    # cube above x: columns phi(x + e_i + e_j) - phi(x), pairs (01, 12, 02)
    total = _negative_sum(_det_columns(get(("diag", 0, 1), (0, 0, 0)), get(("diag", 1, 2), (0, 0, 0)),
                                       get(("diag", 0, 2), (0, 0, 0)), det, t1, t2))
    # cube below x: columns phi(x - e_i - e_j) - phi(x) = -diag_ij(x - e_i - e_j), pairs (01, 02, 12)
    _det_columns(get(("diag", 0, 1), (-1, -1, 0)), get(("diag", 0, 2), (-1, 0, -1)),
                 get(("diag", 1, 2), (0, -1, -1)), det, t1, t2)
    return total + _negative_sum(np.negative(det, out=det))


def _selected(arrays, hot, n, scratch, tag, dense_fraction=0.2):
    """(accessor, buffers) for the voxels x where ``hot`` (None: all), or None when there are none.

    accessor(key, shift) -> arrays[key] at x + shift: views of the slab when the voxels are many,
    gathered vectors otherwise. The arrays live on the padded grid (component axis first); voxel x
    is at padded position x + 1. buffers(name) -> a work array shaped like one component.
    """
    wt = arrays[0].dtype
    if hot is not None:
        count = int(np.count_nonzero(hot))
        if count == 0:
            return None
        if count <= dense_fraction * hot.size:
            pos = np.nonzero(hot)
            ndim = len(n)

            def get(key, shift):
                arr = arrays[key]
                strides = [st // arr.itemsize for st in arr.strides[1:]]
                flat = arr.reshape(ndim, -1)
                return flat[:, sum((p + 1 + s) * st for p, s, st in zip(pos, shift, strides))]

            return get, lambda name: np.empty(count, wt)
    return (lambda key, shift: _at(arrays[key], shift, n)), (lambda name: scratch(tag + name, n, wt))


class _NdvState:
    """Carries, from slab to slab, whether the central tetrahedra were mostly needed everywhere."""

    def __init__(self):
        self.dense_central = False


def _ndv_slab(u, a, b, wt, state, scratch):
    """Non-diffeomorphic volume of rows a..b-1 (voxel units: sum of the per-voxel volumes).

    Liu et al. 2024 / the digital-diffeomorphism package: u edge-padded by one voxel; per voxel, the
    simplices spanned by forward (D+) or backward (D-) differences along each axis (2D: 4 triangles,
    det/2; 3D: 8 corner tetrahedra, det/6) and in 3D the 2 central tetrahedra of the cubes below and
    above (columns phi(x -+ e_i -+ e_j) - phi(x), det/6); the negative volumes are summed and halved
    (each cube is counted by its two 5-tetrahedra splits, each square by its two diagonals).

    Each simplex matrix is B + E, B its value for u = 0 (det B > 0, ||B^-1||_2 = 1) and E's columns
    forward differences F_k = u(y + e_k) - u(y) (one each for a corner simplex, a sum of two for a
    central tetrahedron), so det > 0 whenever ||E||_F^2 < 0.9, which a sum of |F|^2 bounds. Only the
    voxels where the bound fails are computed, densely when they are many.
    """
    ndim = u.shape[0]
    n0 = u.shape[1]
    rest = u.shape[2:]
    n = (b - a,) + tuple(rest)
    grid = (b - a + 2,) + tuple(s + 2 for s in rest)
    # u on rows a-1..b (clamped) and one voxel beyond every other border, edge-padded
    w = scratch("w", (ndim,) + grid, wt)
    inner = (slice(None), slice(None)) + tuple(slice(1, -1) for _ in rest)
    w[inner][:, 1:-1] = u[:, a:b]
    w[inner][:, 0] = u[:, max(a - 1, 0)]
    w[inner][:, -1] = u[:, min(b, n0 - 1)]
    for k in range(1, ndim):
        first = [slice(None)] * (ndim + 1)
        last = [slice(None)] * (ndim + 1)
        first[k + 1], last[k + 1] = 0, -1
        src_first, src_last = list(first), list(last)
        src_first[k + 1], src_last[k + 1] = 1, -2
        w[tuple(first)] = w[tuple(src_first)]
        w[tuple(last)] = w[tuple(src_last)]
    arrays, sq = {}, []
    for k in range(ndim):
        hi = [slice(None)] * (ndim + 1)
        lo = [slice(None)] * (ndim + 1)
        hi[k + 1], lo[k + 1] = slice(1, None), slice(None, -1)
        size = tuple(m - (j == k) for j, m in enumerate(grid))
        f = np.subtract(w[tuple(hi)], w[tuple(lo)], out=scratch(("D", k), (ndim,) + size, wt))
        s = np.einsum("c...,c...->...", f, f, out=scratch(("s", k), size, wt))
        f[k] += 1  # D_k = phi(y + e_k) - phi(y)
        arrays[k] = f
        sq.append(s[None])

    def s_at(k, shift):
        return _at(sq[k], shift, n)[0]

    total = 0.0
    if ndim == 3:
        for i, j in ((0, 1), (1, 2), (0, 2)):
            # diag_ij(y) = D_i(y) + D_j(y + e_i), where both exist
            di = [slice(None)] * 4
            dj = [slice(None)] * 4
            di[j + 1] = slice(None, -1)
            dj[i + 1] = slice(1, None)
            size = tuple(m - (k in (i, j)) for k, m in enumerate(grid))
            arrays[("diag", i, j)] = np.add(arrays[i][tuple(di)], arrays[j][tuple(dj)],
                                            out=scratch(("diag", i, j), (3,) + size, wt))
        hot = None
        if not state.dense_central:
            # ||E||_F^2 <= 2 x (the six |F|^2 of the three diagonal differences)
            below = scratch("below", n, wt)
            np.add(s_at(0, (-1, -1, 0)), s_at(1, (0, -1, 0)), out=below)
            below += s_at(0, (-1, 0, -1))
            below += s_at(1, (0, -1, -1))
            below += s_at(2, (0, 0, -1))
            below += s_at(2, (0, 0, -1))
            above = scratch("above", n, wt)
            np.add(s_at(0, (0, 0, 0)), s_at(0, (0, 0, 0)), out=above)
            above += s_at(1, (0, 0, 0))
            above += s_at(1, (1, 0, 0))
            above += s_at(2, (0, 1, 0))
            above += s_at(2, (1, 0, 0))
            np.maximum(below, above, out=below)
            hot = np.greater_equal(below, wt.type(0.45), out=scratch("hot", n, bool))
            state.dense_central = np.count_nonzero(hot) > 0.5 * hot.size
        sel = _selected(arrays, hot, n, scratch, "central")
        if sel is not None:
            total += _central_tetrahedra(*sel)
    bound = scratch("bound", n, wt)
    tmp = scratch("above", n, wt)
    for k in range(ndim):
        target = bound if k == 0 else tmp
        np.maximum(s_at(k, (0,) * ndim), s_at(k, tuple(-1 if j == k else 0 for j in range(ndim))), out=target)
        if k:
            bound += tmp
    hot = np.greater_equal(bound, wt.type(0.9), out=scratch("hot", n, bool))
    sel = _selected(arrays, hot, n, scratch, "corner")
    if sel is not None:
        total += _corner_simplices(sel[0], ndim, sel[1])
    return total * (-0.5 / (6 if ndim == 3 else 2))


def jacobian_determinant(u):
    """det(∇φ), φ = id + u, per voxel, central differences (numpy.gradient: one-sided at the borders).

    ``u``: ``ndim x *spatial`` (2D or 3D), voxels. Returns an array of shape ``spatial`` in u's float
    precision (float32 stays float32).
    """
    u = _field(u)
    det = np.empty(u.shape[1:], _work_dtype(u))
    _field_pass(u, det_out=det, want_ndv=False)
    return det


def _field(u):
    u = np.asarray(u)
    if u.ndim not in (3, 4) or u.shape[0] != u.ndim - 1:
        raise ValueError(f"u has shape {u.shape}; expected ndim x *spatial with ndim 2 or 3 (no batch axis)")
    u = _as_displacement("u", u, u.shape[1:])
    if min(u.shape[1:]) < 2:
        raise ValueError(f"u needs at least 2 voxels along every axis for finite differences, got {u.shape}")
    return u


def fold_pct(u, mask=None):
    """Percentage of voxels with det(∇φ) <= 0 (central differences) over the image, or within ``mask``."""
    u = _field(u)
    if mask is not None:
        mask = _as_mask("mask", mask, u.shape[1:])
    r = _field_pass(u, mask=mask, want_ndv=False)
    if mask is None:
        return 100.0 * r["n_fold"] / float(np.prod(u.shape[1:]))
    return 100.0 * r["n_fold_mask"] / r["n_mask"] if r["n_mask"] else float("nan")


def sdlogj(u):
    """Standard deviation (ddof 0) of log det(∇φ) over the voxels where det > 0 (central differences)."""
    return _field_pass(_field(u), want_ndv=False)["sdlogj"]


def sdlogj_l2r(u):
    """Learn2Reg's SDlogJ: std(log(clip(J + 3, 1e-9, 1e9))) over the image less 2 voxels per border.

    J as Learn2Reg's ``jacobian_determinant``: u correlated with [-0.5, 0, 0.5] (zero padded) along each
    axis, plus identity, cropped [2:-2] on every axis. Learn2Reg's code is 3D only; 2D is the same
    recipe on two axes. NaN when an axis has fewer than 5 voxels.
    """
    return _field_pass(_field(u), want_ndv=False)["sdlogj_l2r"]


def ndv(u):
    """Non-diffeomorphic volume (Liu et al. 2024, LUMIR), in percent of the image volume.

    Total negative volume of the finite-difference simplices (3D: per voxel the 8 corner tetrahedra of
    forward/backward differences and the 2 central tetrahedra, each det/6, halved as the cube is counted
    by two 5-tetrahedra splits; 2D: 4 triangles, det/2, halved), u edge-padded by one voxel like the
    ``digital-diffeomorphism`` package, divided by the number of voxels, times 100. It catches folds
    that central differences miss (a field alternating from voxel to voxel).
    """
    u = _field(u)
    return _field_pass(u, want_ndv=True)["ndv"]


def end_point_error(u, u_true, mask=None):
    """Mean over ``mask`` voxels (all when None) of |u - u_true| (Euclidean norm), in voxels."""
    u = _field(u)
    u_true = _as_displacement("u_true", u_true, u.shape[1:])
    diff = np.sqrt(np.sum(np.square(u.astype(np.float64) - u_true), axis=0))
    if mask is None:
        return float(diff.mean())
    mask = _as_mask("mask", mask, u.shape[1:])
    return float(diff[mask].mean()) if mask.any() else float("nan")


# --------------------------------------------------------------------------------------------------
# everything for one pair
# --------------------------------------------------------------------------------------------------


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float("nan")


def pair_metrics(fixed_seg, moving_seg, u, labels, spacing=None, u_true=None, fixed_mask=None,
                 label_warp="nearest"):
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
    if label_warp not in ("nearest", "linear"):
        raise ValueError(f"label_warp must be 'nearest' or 'linear', got {label_warp!r}")

    n = len(labels)
    cf = _compact(fixed_seg, labels)
    if label_warp == "nearest":
        cm = _compact(moving_seg, labels)
        cw = _warp_nearest(cm, u)  # warping the compact map = compacting the warped map
    else:
        cm = _compact(moving_seg, labels)
        cw = _compact(_warp_linear(moving_seg, u), labels)
    if mask is None:
        mask = fixed_seg > 0

    joint = _joint_counts(cf, cw, n)
    dice = _dice_from_joint(joint, _absent(joint, cm))

    isotropic = bool(np.all(sp == 1.0))
    spacings = [sp] if isotropic else [sp, np.ones_like(sp)]
    hd = _hd_from_compact(cf, cw, n, spacings)
    hd_mm, hd_vox = hd[0], hd[-1]

    field = _field_pass(u, mask=mask, want_ndv=True)
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
