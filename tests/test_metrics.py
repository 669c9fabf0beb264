"""regbench.evaluation.metrics: numbers computed by hand, and agreement with straightforward implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from regbench.evaluation import metrics as M
from regbench.evaluation.metrics import jacobian

# --------------------------------------------------------------------------------------------------
# helpers: straightforward per-label implementations
# --------------------------------------------------------------------------------------------------


def naive_dice(fixed, warped, labels, moving=None):
    out = []
    for lab in labels:
        a, b = fixed == lab, warped == lab
        present = moving == lab if moving is not None else b
        if not a.any() or not present.any():
            out.append(np.nan)
        else:
            out.append(2.0 * np.sum(a & b) / (a.sum() + b.sum()))
    return np.array(out)


def naive_surface_percentile(mask_gt, mask_pred, spacing, percent=95.0):
    """surface-distance's compute_surface_distances + compute_robust_hausdorff on the full volume."""
    ndim = mask_gt.ndim
    kernel = np.array([[8, 4], [2, 1]]) if ndim == 2 else np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    full = 15 if ndim == 2 else 255
    areas = M.surface_element_areas(spacing)
    codes, borders = [], []
    for m in (mask_gt, mask_pred):
        crop = np.zeros(tuple(s + 1 for s in m.shape), np.uint8)  # one zero layer on the high side
        crop[tuple(slice(0, -1) for _ in range(ndim))] = m
        code = ndi.correlate(crop, kernel, mode="constant", cval=0)
        codes.append(code)
        borders.append((code != 0) & (code != full))
    dist = [ndi.distance_transform_edt(~b, sampling=spacing) for b in borders]
    result = []
    for a, b in ((0, 1), (1, 0)):
        d = dist[b][borders[a]]
        w = areas[codes[a][borders[a]]]
        order = np.lexsort((w, d))  # sorted((distance, area)) as surface-distance does
        d, w = d[order], w[order]
        cum = np.cumsum(w) / np.sum(w)
        result.append(d[min(int(np.searchsorted(cum, percent / 100.0)), len(d) - 1)])
    return max(result)


def naive_hd95(fixed, warped, labels, spacing):
    out = []
    for lab in labels:
        a, b = fixed == lab, warped == lab
        out.append(naive_surface_percentile(a, b, spacing) if a.any() and b.any() else np.nan)
    return np.array(out)


def naive_det(u):
    ndim = u.shape[0]
    jac = np.stack([np.stack([np.gradient(u[c], axis=k) + (c == k) for k in range(ndim)]) for c in range(ndim)])
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def naive_l2r(u):
    """Learn2Reg's evaluation/utils.py jacobian_determinant + sdlogj, written out (2D: same recipe)."""
    ndim = u.shape[0]
    kern = np.array([-0.5, 0.0, 0.5])
    grads = np.stack([
        np.stack([ndi.correlate(u[c], kern.reshape([-1 if j == k else 1 for j in range(ndim)]), mode="constant",
                                cval=0.0) for c in range(ndim)])
        for k in range(ndim)])  # grads[k, c] = d u_c / d x_k
    jac = grads + np.eye(ndim).reshape((ndim, ndim) + (1,) * ndim)
    jac = jac[(slice(None), slice(None)) + (slice(2, -2),) * ndim]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    return np.log(np.clip(det + 3, 1e-9, 1e9)).std()


def naive_ndv(u):
    """Liu et al.'s non-diffeomorphic volume (digital-diffeomorphism), written out with np.linalg.det."""
    ndim = u.shape[0]
    n = u.shape[1:]
    p = np.pad(u, [(0, 0)] + [(1, 1)] * ndim, mode="edge")

    def phi(shift):
        sl = tuple(slice(1 + s, 1 + s + m) for s, m in zip(shift, n))
        grid = np.stack(np.meshgrid(*[np.arange(m) + s for m, s in zip(n, shift)], indexing="ij"))
        return p[(slice(None),) + sl] + grid

    def det_of(cols):
        mat = np.stack(cols, axis=1)  # mat[c, k]
        return np.linalg.det(np.moveaxis(mat, (0, 1), (-2, -1)))

    zero = (0,) * ndim
    unit = [tuple(int(j == k) for j in range(ndim)) for k in range(ndim)]
    fwd = [phi(unit[k]) - phi(zero) for k in range(ndim)]
    bwd = [phi(zero) - phi(tuple(-x for x in unit[k])) for k in range(ndim)]
    total = np.zeros(n)
    for choice in np.ndindex(*(2,) * ndim):
        total += np.minimum(det_of([fwd[k] if c == 0 else bwd[k] for k, c in enumerate(choice)]), 0)
    if ndim == 3:
        def tet(sign, pairs):
            cols = []
            for i, j in pairs:
                s = [0, 0, 0]
                s[i] = s[j] = sign
                cols.append(phi(tuple(s)) - phi(zero))
            return det_of(cols)
        total += np.minimum(tet(-1, ((0, 1), (0, 2), (1, 2))), 0)
        total += np.minimum(tet(1, ((0, 1), (1, 2), (0, 2))), 0)
        return float((-0.5 / 6 * total).sum() / total.size * 100)
    return float((-0.5 / 2 * total).sum() / total.size * 100)


def blocky_labels(shape, n_labels, block, rng):
    small = rng.integers(0, n_labels + 1, size=[max(2, s // block) for s in shape])
    big = ndi.zoom(small, [s / t for s, t in zip(shape, small.shape)], order=0)
    return big[tuple(slice(0, s) for s in shape)].astype(np.int32)


def smooth_field(shape, sigma, amplitude, rng):
    u = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma) for _ in shape])
    return u * (amplitude / np.abs(u).max())


def affine_field(matrix, shape):
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.tensordot(np.asarray(matrix) - np.eye(len(shape)), grid, axes=1)


# --------------------------------------------------------------------------------------------------
# translated cube: Dice and HD95 by hand
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_translated_cube(ndim, shift):
    size, side, lo = 24, 10, 6
    spacing = (1.5, 1.0, 0.8)[:ndim]
    fixed = np.zeros((size,) * ndim, np.uint8)
    fixed[(slice(lo, lo + side),) * ndim] = 3
    warped = np.roll(fixed, shift, axis=0)
    expected_dice = (side - shift) / side  # overlap (side - shift) * side^(ndim-1) of side^ndim each
    assert M.dice_per_label(fixed, warped, [3]) == pytest.approx([expected_dice], abs=1e-12)
    # every directed distance is at most shift * spacing[0], and a whole cap is at exactly that
    assert M.hd95_per_label(fixed, warped, [3], spacing) == pytest.approx([shift * spacing[0]], abs=1e-9)
    assert M.hd95_vox_per_label(fixed, warped, [3]) == pytest.approx([shift], abs=1e-9)

    # the same through pair_metrics: a constant displacement moves the moving cube by -shift
    u = np.zeros((ndim,) + fixed.shape)
    u[0] = shift
    scalars, per_label = M.pair_metrics(fixed, fixed, u, [3], spacing)
    assert scalars["dice"] == pytest.approx(expected_dice, abs=1e-12)
    assert scalars["hd95"] == pytest.approx(shift * spacing[0], abs=1e-9)
    assert scalars["hd95_vox"] == pytest.approx(shift, abs=1e-9)
    assert scalars["fold_pct"] == 0 and scalars["ndv"] == 0 and scalars["sdlogj"] == 0
    assert math.isnan(scalars["epe"])
    assert list(per_label.columns) == ["label", "dice", "hd95", "hd95_vox"]


def test_surface_element_areas_by_hand():
    s = np.array([1.3, 0.7, 2.1])
    table = M.surface_element_areas(s)
    # one voxel (the last of the 2x2x2 neighbourhood): a triangle through 3 edge midpoints
    assert table[1] == pytest.approx(0.125 * math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2))
    # two voxels along axis 2: a rectangle, s2 long, cutting the (axis 0, axis 1) square diagonally
    assert table[0b11] == pytest.approx(s[2] * 0.5 * math.hypot(s[0], s[1]))
    # four voxels with axis-0 index 0: a plane across axis 0
    assert table[0b11110000] == pytest.approx(s[1] * s[2])
    assert table[0] == 0 and table[255] == 0
    np.testing.assert_allclose(table, table[::-1])  # a code and its complement
    # three voxels in an L (surface-distance's table: 1.149519052838329 at unit spacing)
    assert M.surface_element_areas((1, 1, 1))[7] == pytest.approx(1.149519052838329, abs=1e-12)
    t2 = M.surface_element_areas((2.0, 0.5))
    assert t2[0b0011] == 0.5 and t2[0b0101] == 2.0 and t2[0b0001] == pytest.approx(0.5 * math.hypot(2, 0.5))
    assert t2[0b0110] == pytest.approx(math.hypot(2, 0.5))


def test_surface_element_areas_match_surface_distance():
    lookup = pytest.importorskip("surface_distance.lookup_tables")
    rng = np.random.default_rng(0)
    for _ in range(3):
        sp = rng.uniform(0.3, 3.0, 3)
        np.testing.assert_allclose(M.surface_element_areas(sp),
                                   lookup.create_table_neighbour_code_to_surface_area(sp), atol=1e-12)
        sp2 = rng.uniform(0.3, 3.0, 2)
        np.testing.assert_allclose(M.surface_element_areas(sp2),
                                   lookup.create_table_neighbour_code_to_contour_length(sp2), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Dice / HD95 against the straightforward per-label implementation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim,spacing", [(3, (1.0, 1.0, 1.0)), (3, (1.2, 0.7, 1.9)), (2, (1.0, 1.0)),
                                          (2, (0.6, 1.7))])
def test_dice_hd95_match_straightforward(ndim, spacing):
    rng = np.random.default_rng(ndim * 10 + int(10 * spacing[-1]))
    shape = (26, 22, 19) if ndim == 3 else (70, 57)
    labels = [1, 2, 3, 4, 5, 6, 9, 11]  # 9 is in neither map, 11 only in the fixed one
    for trial in range(3):
        fixed = blocky_labels(shape, 6, 4, rng)
        if trial == 0:  # unrelated maps: large distances
            warped = blocky_labels(shape, 6, 4, rng)
        else:  # a perturbed copy: small distances
            warped = np.roll(fixed, trial, axis=trial % ndim)
            noise = rng.random(shape) < 0.03
            warped[noise] = rng.integers(0, 7, noise.sum())
        fixed[:3][fixed[:3] == 5] = 11
        warped[warped == 11] = 0
        np.testing.assert_allclose(M.dice_per_label(fixed, warped, labels), naive_dice(fixed, warped, labels),
                                   atol=1e-12)
        np.testing.assert_allclose(M.hd95_per_label(fixed, warped, labels, spacing),
                                   naive_hd95(fixed, warped, labels, spacing), atol=1e-6)


def test_hd95_far_apart_uses_exact_fallback():
    """A label whose two surfaces are further apart than the ring search reaches."""
    fixed = np.zeros((40, 30, 30), np.uint8)
    warped = np.zeros_like(fixed)
    fixed[2:8, 3:9, 4:12] = 1
    warped[25:37, 15:27, 14:28] = 1
    fixed[10:30, 5:25, 5:25] = 2
    warped[11:31, 5:25, 6:26] = 2
    for sp in [(1.0, 1.0, 1.0), (0.9, 1.1, 2.0)]:
        np.testing.assert_allclose(M.hd95_per_label(fixed, warped, [1, 2], sp),
                                   naive_hd95(fixed, warped, [1, 2], sp), atol=1e-6)


def test_hd95_matches_surface_distance_package():
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(3)
    fixed = blocky_labels((20, 18, 16), 4, 3, rng)
    warped = np.roll(fixed, 1, axis=1)
    sp = (1.1, 0.9, 1.4)
    ref = [sd.compute_robust_hausdorff(sd.compute_surface_distances(fixed == k, warped == k, sp), 95)
           for k in (1, 2, 3, 4)]
    np.testing.assert_allclose(M.hd95_per_label(fixed, warped, [1, 2, 3, 4], sp), ref, atol=1e-6)


def test_dice_learn2reg_absence_rule():
    fixed = np.zeros((12, 12), np.int32)
    moving = np.zeros_like(fixed)
    fixed[2:6, 2:6] = 1
    moving[2:6, 2:6] = 1
    fixed[7:10, 7:10] = 2  # label 2: fixed only -> NaN
    moving[0, 0] = 3       # label 3: moving only -> NaN
    fixed[8:11, 1:4] = 4
    moving[8:11, 1:4] = 4
    warped = moving.copy()
    warped[warped == 4] = 0  # label 4: in both maps, warped away -> 0 (Learn2Reg), NaN on the warped rule
    d = M.dice_per_label(fixed, warped, [1, 2, 3, 4], moving_seg=moving)
    np.testing.assert_array_equal(np.isnan(d), [False, True, True, False])
    assert d[0] == 1 and d[3] == 0
    assert np.isnan(M.dice_per_label(fixed, warped, [1, 2, 3, 4])[3])
    assert np.isnan(M.hd95_per_label(fixed, warped, [4])[0])
    # the same rule when more than 4 labels are warped away (the moving map is then counted in one pass):
    # 2..6 in fixed and moving -> 0; 7 not in fixed (though warped), 8 not in moving -> NaN; 1 kept -> 1
    fixed = np.array([[1, 2, 3, 4, 5, 6, 8, 0]] * 2)
    moving = np.array([[1, 2, 3, 4, 5, 6, 7, 0]] * 2)
    warped = np.array([[1, 0, 0, 0, 0, 0, 7, 0]] * 2)
    d = M.dice_per_label(fixed, warped, [1, 2, 3, 4, 5, 6, 7, 8], moving_seg=moving)
    np.testing.assert_array_equal(d, [1, 0, 0, 0, 0, 0, np.nan, np.nan])


# --------------------------------------------------------------------------------------------------
# Jacobian determinant, folding, SDlogJ, NDV
# --------------------------------------------------------------------------------------------------

AFFINE = {
    2: [[1.1, 0.2], [-0.15, 0.95]],
    3: [[1.1, 0.2, -0.1], [0.05, 0.9, 0.1], [0.0, -0.15, 1.2]],
}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_affine_field(ndim, dtype):
    shape = (9, 8, 7)[:ndim]
    a = np.array(AFFINE[ndim])
    u = affine_field(a, shape).astype(dtype)
    det = M.jacobian_determinant(u)
    assert det.dtype == dtype and det.shape == shape
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(det, np.linalg.det(a), atol=tol)  # borders too: differences are exact
    assert M.sdlogj(u) == pytest.approx(0, abs=10 * tol)
    assert M.sdlogj_l2r(u) == pytest.approx(0, abs=10 * tol)
    assert M.fold_pct(u) == 0 and M.ndv(u) == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_folded_slab_exact_counts(ndim):
    """u_0 = -3 (clip(x_0, a, b) - a): rows a..b fold (central differences -1.5 or -3), no others."""
    shape = (20, 9, 8)[:ndim]
    a, b = 5, 9
    u = np.zeros((ndim,) + shape)
    x0 = np.arange(shape[0], dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))
    u[0] = -3.0 * (np.clip(x0, a, b) - a)
    assert M.fold_pct(u) == pytest.approx(100.0 * (b - a + 1) / shape[0])
    mask = np.zeros(shape, bool)
    mask[:, : shape[1] // 2] = True
    assert M.fold_pct(u, mask) == pytest.approx(100.0 * (b - a + 1) / shape[0])
    row_mask = np.zeros(shape, bool)
    row_mask[:a] = True
    assert M.fold_pct(u, row_mask) == 0
    # NDV: for a field of x_0 alone, each edge between rows with difference D adds -min(1 + D, 0)
    # per column (half from each side), so 2 per folded edge here
    assert M.ndv(u) == pytest.approx(100.0 * 2 * (b - a) / shape[0])
    assert M.ndv(u) == pytest.approx(naive_ndv(u))
    det = naive_det(u)
    assert M.sdlogj(u) == pytest.approx(np.log(det[det > 0]).std())


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_zero_determinant_is_a_fold_and_is_left_out_of_sdlogj(ndim):
    """u_0 = -(clip(x_0, 5, 9) - 5): central differences -1 on rows 6..8, so det = 1 - 1 = 0 exactly there (a fold:
    det <= 0), -0.5 on rows 5 and 9 (det 0.5), 0 elsewhere (det 1). SDlogJ over the other 17 rows: the std of
    15 zeros and 2 x log 0.5. Forward differences are -1 at worst: flat simplices, no negative volume (NDV 0)."""
    shape = (20, 9, 8)[:ndim]
    u = np.zeros((ndim,) + shape)
    x0 = np.arange(shape[0], dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))
    u[0] = -(np.clip(x0, 5, 9) - 5)
    rows = M.jacobian_determinant(u).reshape(shape[0], -1)
    assert (rows[6:9] == 0).all() and (rows[[5, 9]] == 0.5).all() and (np.delete(rows, range(5, 10), 0) == 1).all()
    assert M.fold_pct(u) == pytest.approx(100.0 * 3 / 20)
    assert M.sdlogj(u) == pytest.approx(np.std([0.0] * 15 + [math.log(0.5)] * 2), abs=1e-12)
    assert M.ndv(u) == 0
    # through pair_metrics, with a given fixed_mask (rows 0..7: 2 of its 8 rows fold) instead of fixed_seg > 0
    fixed = np.ones(shape, np.int32)
    first_rows = np.zeros(shape, bool)
    first_rows[:8] = True
    scalars, _ = M.pair_metrics(fixed, fixed, u, [1], fixed_mask=first_rows)
    assert scalars["fold_pct"] == pytest.approx(15.0)
    assert scalars["fold_pct_mask"] == pytest.approx(100.0 * 2 / 8)


@pytest.mark.parametrize("ndim", [2, 3])
def test_sdlogj_l2r_clips_a_determinant_below_minus_three(ndim):
    """u_0 = -5 (clip(x_0, 5, 7) - 5): central differences -2.5, -5, -2.5 on rows 5, 6, 7, so J + 3 is 1.5, -1, 1.5
    there and 4 elsewhere. Learn2Reg clips J + 3 to 1e-9 before the log; over rows 2..9 (the [2:-2] crop of 12):
    the std of 5 x log 4, 2 x log 1.5 and log 1e-9."""
    shape = (12, 9, 8)[:ndim]
    u = np.zeros((ndim,) + shape)
    x0 = np.arange(shape[0], dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))
    u[0] = -5.0 * (np.clip(x0, 5, 7) - 5)
    expected = np.std([math.log(4)] * 5 + [math.log(1.5)] * 2 + [math.log(1e-9)])
    assert M.sdlogj_l2r(u) == pytest.approx(expected, abs=1e-12)
    assert naive_l2r(u) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_alternating_fold_missed_by_central_differences(ndim):
    """u_0 = 0.75 (-1)^x0 on rows 2..17: central differences cancel (det >= 0.625 everywhere), but
    every other forward difference is -1.5, so half the simplices between those rows are inverted."""
    shape = (20, 6, 5)[:ndim]
    u = np.zeros((ndim,) + shape)
    x0 = np.arange(shape[0])
    profile = np.where((x0 >= 2) & (x0 <= 17), 0.75 * (-1.0) ** x0, 0.0)
    u[0] = profile.reshape((-1,) + (1,) * (ndim - 1))
    assert M.jacobian_determinant(u).min() == pytest.approx(0.625)
    assert M.fold_pct(u) == 0
    # 8 edges with difference -1.5, each adding 0.5 per column: 4 voxels' worth of 20 rows
    assert M.ndv(u) == pytest.approx(20.0)
    assert M.ndv(u) == pytest.approx(naive_ndv(u))


@pytest.mark.parametrize("shape", [(17, 15, 13), (40, 33)])
def test_field_metrics_match_straightforward(shape):
    rng = np.random.default_rng(len(shape))
    for sigma, amp in [(3.0, 2.0), (1.5, 3.0), (4.0, 0.5)]:  # smooth, folded, nearly identity
        u = smooth_field(shape, sigma, amp, rng)
        det = naive_det(u)
        np.testing.assert_allclose(M.jacobian_determinant(u), det, atol=1e-12)
        assert M.fold_pct(u) == pytest.approx(100.0 * np.mean(det <= 0))
        assert M.sdlogj(u) == pytest.approx(np.log(det[det > 0]).std(), abs=1e-12)
        assert M.sdlogj_l2r(u) == pytest.approx(naive_l2r(u), abs=1e-12)
        assert M.ndv(u) == pytest.approx(naive_ndv(u), abs=1e-10)
        u32 = u.astype(np.float32)  # float32 follows numpy.gradient in float32 bit for bit
        g = [[np.gradient(u32[c], axis=k) + np.float32(c == k) for k in range(len(shape))] for c in range(len(shape))]
        np.testing.assert_array_equal(M.jacobian_determinant(u32), jacobian._det(g))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_field_metrics_do_not_depend_on_slabs(monkeypatch, rows):
    """The field is swept in slabs of rows; force thin ones so slab edges fall everywhere."""
    rng = np.random.default_rng(11)
    shape = (13, 12, 11)
    u = smooth_field(shape, 1.5, 3.0, rng)  # rough: the NDV switches to its dense path mid-way
    u[:, :4] = smooth_field((4, 12, 11), 3, 0.3, rng)  # smooth start: its sparse path first
    mask = rng.random(shape) < 0.5
    whole = jacobian._field_pass(u, mask=mask, want_ndv=True)
    monkeypatch.setattr(jacobian, "_slab_rows", lambda n0, per_row, target=None: rows)
    det = M.jacobian_determinant(u)
    thin = jacobian._field_pass(u, mask=mask, want_ndv=True)
    np.testing.assert_allclose(det, naive_det(u), atol=1e-12)
    for key in whole:
        assert thin[key] == pytest.approx(whole[key], abs=1e-12)
    assert thin["ndv"] == pytest.approx(naive_ndv(u), abs=1e-10)
    assert thin["sdlogj_l2r"] == pytest.approx(naive_l2r(u), abs=1e-12)


def test_ndv_local_folds():
    """Mostly smooth field with a few local folds (the per-voxel path of the NDV)."""
    rng = np.random.default_rng(7)
    shape = (30, 28, 26)
    u = smooth_field(shape, 6, 1.5, rng)
    for _ in range(3):
        c = [rng.integers(4, s - 4) for s in shape]
        u[(0,) + tuple(slice(x - 2, x + 3) for x in c)] += rng.standard_normal((5, 5, 5)) * 1.5
    assert M.ndv(u) > 0
    assert M.ndv(u) == pytest.approx(naive_ndv(u), abs=1e-10)


def test_end_point_error_by_hand():
    u = np.zeros((2, 4, 5))
    u_true = np.zeros_like(u)
    u_true[0, :2] = 3.0
    u_true[1, :2] = 4.0  # |error| = 5 on the first two rows, 0 elsewhere
    assert M.end_point_error(u, u_true) == pytest.approx(5.0 * 2 / 4)
    mask = np.zeros((4, 5), bool)
    mask[1:] = True  # one row of error 5 among three: 5 / 3, not the whole image's 2.5
    assert M.end_point_error(u, u_true, mask) == pytest.approx(5.0 / 3)
    fixed = np.zeros((4, 5), np.uint8)
    fixed[1:] = 1
    scalars, _ = M.pair_metrics(fixed, fixed, u, [1], u_true=u_true)
    assert scalars["epe"] == pytest.approx(5.0 / 3)  # over the fixed foreground
    first_rows = np.zeros((4, 5), bool)
    first_rows[:2] = True
    scalars, _ = M.pair_metrics(fixed, fixed, u, [1], u_true=u_true, fixed_mask=first_rows)
    assert scalars["epe"] == pytest.approx(5.0)  # over a given mask instead


# --------------------------------------------------------------------------------------------------
# label warping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(13, 11, 9), (31, 27)])
def test_nearest_warp_is_learn2reg_map_coordinates(shape):
    rng = np.random.default_rng(1)
    moving = rng.integers(0, 7, shape)
    u = (smooth_field(shape, 2, 3, rng) + rng.uniform(-1, 1, (len(shape),) + shape)).astype(np.float32)
    flat = u.reshape(-1)
    flat[:40] = 0.5  # ties round up, like scipy
    flat[40:80] = -0.5
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ref = ndi.map_coordinates(moving, grid + u, order=0)  # Learn2Reg's call
    np.testing.assert_array_equal(M.warp_label_map(moving, u), ref)
    np.testing.assert_array_equal(M.warp_label_map(moving, u.astype(np.float64)),
                                  ndi.map_coordinates(moving, grid + u.astype(np.float64), order=0))


def test_linear_warp_is_one_hot_argmax():
    rng = np.random.default_rng(2)
    shape = (12, 10, 9)
    moving = blocky_labels(shape, 4, 3, rng) * 3  # label values 0, 3, 6, 9, 12
    u = smooth_field(shape, 2, 2.5, rng) + rng.uniform(-0.5, 0.5, (3,) + shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")) + u
    values = np.unique(moving)
    channels = np.stack([ndi.map_coordinates((moving == v).astype(float), grid, order=1, mode="grid-constant",
                                             cval=0.0) for v in values])
    ref = values[np.argmax(channels, axis=0)]
    np.testing.assert_array_equal(M.warp_label_map(moving, u, mode="linear"), ref)
    # with a whole-voxel shift it is the nearest-neighbour warp
    shift = np.zeros((3,) + shape)
    shift[1] = 2
    np.testing.assert_array_equal(M.warp_label_map(moving, shift, mode="linear"), M.warp_label_map(moving, shift))
    scalars, _ = M.pair_metrics(moving, moving, shift, [3, 6], label_warp="linear")
    assert scalars["label_warp"] == "linear"


# --------------------------------------------------------------------------------------------------
# pair_metrics end to end, and input validation
# --------------------------------------------------------------------------------------------------


def test_pair_metrics_matches_parts():
    rng = np.random.default_rng(4)
    shape = (24, 22, 20)
    fixed = blocky_labels(shape, 5, 4, rng)
    moving = np.roll(fixed, 2, axis=2)
    u = smooth_field(shape, 3, 2.5, rng)
    u_true = u + 0.1
    labels = [1, 2, 3, 4, 5, 7]
    spacing = (1.0, 1.3, 0.8)
    scalars, per_label = M.pair_metrics(fixed, moving, u, labels, spacing, u_true=u_true)
    warped = M.warp_label_map(moving, u)
    dice = naive_dice(fixed, warped, labels, moving)
    np.testing.assert_allclose(per_label["dice"], dice, atol=1e-12)
    np.testing.assert_allclose(per_label["hd95"], naive_hd95(fixed, warped, labels, spacing), atol=1e-6)
    np.testing.assert_allclose(per_label["hd95_vox"], naive_hd95(fixed, warped, labels, (1, 1, 1)), atol=1e-6)
    assert scalars["dice"] == pytest.approx(np.nanmean(dice))
    assert scalars["hd95"] == pytest.approx(np.nanmean(per_label["hd95"]))
    det = naive_det(u)
    assert scalars["fold_pct"] == pytest.approx(100 * np.mean(det <= 0))
    assert scalars["fold_pct_mask"] == pytest.approx(100 * np.mean(det[fixed > 0] <= 0))
    assert scalars["sdlogj"] == pytest.approx(np.log(det[det > 0]).std())
    assert scalars["sdlogj_l2r"] == pytest.approx(naive_l2r(u))
    assert scalars["ndv"] == pytest.approx(naive_ndv(u), abs=1e-10)
    assert scalars["epe"] == pytest.approx(0.1 * math.sqrt(3))
    assert np.isnan(per_label["dice"].iloc[-1])  # label 7 is in no map


def test_validation_errors():
    fixed = np.zeros((8, 9, 10), np.int16)
    fixed[2:5, 2:5, 2:5] = 1
    u = np.zeros((3, 8, 9, 10))
    with pytest.raises(ValueError, match="u has shape"):
        M.pair_metrics(fixed, fixed, u[None], [1])
    with pytest.raises(ValueError, match="u has shape"):
        M.pair_metrics(fixed, fixed, u[:2], [1])
    bad = u.copy()
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="u contains NaN"):
        M.pair_metrics(fixed, fixed, bad, [1])
    bad[0, 1, 1, 1] = np.inf
    with pytest.raises(ValueError, match="u contains NaN or inf"):
        M.jacobian_determinant(bad)
    with pytest.raises(ValueError, match="moving_seg is not an integer label map"):
        M.pair_metrics(fixed, fixed + 0.5, u, [1])
    with pytest.raises(ValueError, match="fixed_seg has negative labels"):
        M.dice_per_label(fixed - 1, fixed, [1])
    with pytest.raises(ValueError, match="background 0"):
        M.pair_metrics(fixed, fixed, u, [0, 1])
    with pytest.raises(ValueError, match="spacing"):
        M.pair_metrics(fixed, fixed, u, [1], spacing=(1, 1))
    with pytest.raises(ValueError, match="fixed_mask"):
        M.pair_metrics(fixed, fixed, u, [1], fixed_mask=np.ones((8, 9), bool))
    with pytest.raises(ValueError, match="u_true"):
        M.pair_metrics(fixed, fixed, u, [1], u_true=u[:, :4])
    with pytest.raises(ValueError, match="moving_seg must be a 3D label map"):
        M.pair_metrics(fixed, fixed[0], u, [1])
    with pytest.raises(ValueError, match="warped_seg has shape"):
        M.hd95_per_label(fixed, fixed[:4], [1])
    with pytest.raises(ValueError, match="label_warp"):
        M.pair_metrics(fixed, fixed, u, [1], label_warp="cubic")
    # whole-number float label maps (NIfTI) are accepted
    scalars, _ = M.pair_metrics(fixed.astype(np.float64), fixed.astype(np.float32), u, [1])
    assert scalars["dice"] == 1 and scalars["hd95"] == 0


def test_label_values_beyond_a_lookup_table_in_any_order():
    """Label values of 2^24 and more (no lookup table: a sorted search) listed out of order: Dice in the order
    given. Label B = 2^24 + 7: 3 voxels in fixed, 2 in warped, 1 shared (2 * 1 / (3 + 2) = 0.4); label 3: the same
    2 voxels (1.0); label A = 2^25: 4 voxels each, 3 shared (0.75). 2^24 + 8 is not evaluated and counts for none."""
    big_b, big_a, other = 2 ** 24 + 7, 2 ** 25, 2 ** 24 + 8
    fixed = np.array([[big_b, big_b, big_b, 3, 3, 0],
                      [big_a, big_a, big_a, big_a, 0, other]], np.int64)
    warped = np.array([[big_b, other, 0, 3, 3, 0],
                       [big_a, big_a, big_a, other, big_a, big_b]], np.int64)
    labels = [big_b, 3, big_a]
    np.testing.assert_allclose(M.dice_per_label(fixed, warped, labels), [2 * 1 / 5, 1.0, 0.75], atol=1e-12)


def test_many_labels():
    """More than 254 labels: 16-bit compact maps, the generic neighbour-code path."""
    rng = np.random.default_rng(9)
    shape = (90, 96)
    fixed = blocky_labels(shape, 400, 3, rng) * 7  # label values up to 2800
    warped = np.roll(fixed, 1, axis=0)
    labels = np.unique(fixed[fixed > 0])
    assert labels.size > 254
    np.testing.assert_allclose(M.dice_per_label(fixed, warped, labels), naive_dice(fixed, warped, labels), atol=1e-12)
    np.testing.assert_allclose(M.hd95_per_label(fixed, warped, labels, (0.8, 1.1)),
                               naive_hd95(fixed, warped, labels, (0.8, 1.1)), atol=1e-6)


@pytest.mark.parametrize("label_warp", ["nearest", "linear"])
def test_pair_dice_is_pair_metrics_dice(label_warp):
    """Model selection scores by pair_dice: the same number as pair_metrics, labels absent from one side included."""
    rng = np.random.default_rng(5)
    fixed = rng.integers(0, 4, (24, 20))
    moving = rng.integers(0, 4, (24, 20))
    moving[moving == 3] = 2                       # label 3 absent from the moving map: Learn2Reg leaves it out
    u = rng.normal(0, 1.5, (2, 24, 20))
    expected = M.pair_metrics(fixed, moving, u, [1, 2, 3, 7], label_warp=label_warp)[0]["dice"]
    assert M.pair_dice(fixed, moving, u, [1, 2, 3, 7], label_warp=label_warp) == expected
    assert 0 < expected < 1
