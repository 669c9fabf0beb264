"""The 95th percentile Hausdorff distance with DeepMind's surface-distance semantics, all labels in one pass."""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from scipy.spatial import cKDTree

from regbench.evaluation.metrics.inputs import _as_spacing, _check_pair
from regbench.evaluation.metrics.overlap import _compact


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
