"""Regularity of a displacement: det(Jacobian), folding, SDlogJ (also Learn2Reg's), NDV; end-point error."""
from __future__ import annotations

import math

import numpy as np

from regbench.evaluation.metrics.inputs import _as_displacement, _as_mask
from regbench.evaluation.metrics.overlap import _slab_rows


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
