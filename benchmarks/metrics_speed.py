"""Time ``regbench.evaluation.metrics.pair_metrics`` on one OASIS-size pair on one CPU core.

The pair is synthetic: 160 x 192 x 224 voxels, 45 labels (400 Voronoi cells of random seeds inside an
ellipsoidal "brain", shared out among the labels, their borders made wiggly by a smooth warp, background
outside); the moving map is the fixed one deformed by a smooth random field, and u undoes most of that
deformation up to smooth errors at two scales: Dice ~0.83, HD95 ~2 mm, SDlogJ ~0.4, a few folds, the
range of a real registration result. Every metric is computed, HD95 and NDV included. Three timings:
1 mm isotropic spacing (OASIS), anisotropic spacing (HD95 in mm and again in voxels), and a rough
field (i.i.d. noise added to u: every voxel then needs the full NDV).

Then the straightforward implementation, on the first case: Learn2Reg's loop over labels with
full-volume masks and surface-distance's algorithm (bounding box, neighbour codes, two Euclidean
distance transforms and a sort per label, twice when the spacing is not 1), numpy.gradient Jacobian,
Learn2Reg's correlate Jacobian, Liu et al.'s ten Jacobians over the whole image. The script checks
that both give the same numbers. It takes a few minutes. With --readme, the figures go into the README
between its ``<!-- metrics-speed -->`` markers, with the commit that produced them.

    python benchmarks/metrics_speed.py [--repeats 5] [--skip-reference] [--readme README.md]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from regbench.evaluation import metrics  # noqa: E402
from regbench.runtime import git_commit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_figures import write_between_markers  # noqa: E402

SHAPE = (160, 192, 224)
N_LABELS = 45
N_CELLS = 400  # Voronoi cells, shared out among the labels
SPACING = (1.0, 1.2, 0.9)
ERROR = (5.0, 3.2)  # amplitude (voxels) of u's error at knot spacings 12 and 4


def _bspline_basis(n, step):
    """n x K matrix of cubic B-splines with knots ``step`` voxels apart covering 0..n-1."""
    knots = np.arange(-step, n + 2 * step, step, dtype=np.float64)
    t = np.abs(np.arange(n)[:, None] - knots[None, :]) / step
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def smooth_field(shape, step, amplitude, rng, channels=3):
    """Smooth random field: cubic B-splines, knots ``step`` voxels apart, Gaussian coefficients,
    scaled so that its largest absolute value is ``amplitude``."""
    bases = [_bspline_basis(n, step) for n in shape]
    out = np.empty((channels,) + tuple(shape), np.float32)
    for c in range(channels):
        f = rng.standard_normal([b.shape[1] for b in bases])
        for basis in bases:  # contract the first coefficient axis, append the voxel axis
            f = np.tensordot(f, basis, axes=([0], [1]))
        out[c] = f
    return out * np.float32(amplitude / np.abs(out).max())


def make_pair(seed=0, rough=0.0):
    """Fixed and moving label maps and a displacement u that registers them (see the module doc).

    ``rough`` adds i.i.d. Gaussian noise of that standard deviation (voxels) to u: a worst case for
    the NDV (every voxel then needs all ten determinants).
    """
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=np.float32)
    centre = np.array(SHAPE, np.float32)[:, None, None, None] / 2
    radii = np.array(SHAPE, np.float32)[:, None, None, None] * 0.42
    brain = (((grid - centre) / radii) ** 2).sum(0) <= 1
    del grid
    seeds = np.zeros(SHAPE, np.uint8)
    inside = np.argwhere(brain)
    picks = inside[rng.choice(len(inside), N_CELLS, replace=False)]
    seeds[tuple(picks.T)] = rng.permutation(np.arange(N_CELLS) % N_LABELS + 1)
    _, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[tuple(nearest)]
    del nearest
    cells[~brain] = 0
    fixed = metrics.warp_label_map(cells, smooth_field(SHAPE, 10, 4.0, rng))  # wiggly borders
    v = smooth_field(SHAPE, 24, 6.0, rng)  # anatomical difference
    moving = metrics.warp_label_map(fixed, v)
    # moving(y) = fixed(y + v(y)); u ~ the inverse of id + v, up to smooth errors at two scales
    u = -v + smooth_field(SHAPE, 12, ERROR[0], rng) + smooth_field(SHAPE, 4, ERROR[1], rng)
    if rough:
        u += (rng.standard_normal(u.shape) * rough).astype(np.float32)
    return fixed, moving, u.astype(np.float32)


# -- the straightforward implementation -------------------------------------------------------------

_KERNEL_3D = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


def naive_surface_hd(mask_gt, mask_pred, spacing, table, percent=95.0):
    """surface-distance's compute_surface_distances + compute_robust_hausdorff, reimplemented."""
    both = mask_gt | mask_pred
    idx = np.argwhere(both)
    lo, hi = idx.min(0), idx.max(0)
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    dists = []
    crops = []
    for m in (mask_gt, mask_pred):
        crop = np.zeros(tuple(hi - lo + 2), np.uint8)
        crop[tuple(slice(0, -1) for _ in lo)] = m[box]
        crops.append(crop)
    codes = [ndi.correlate(c, _KERNEL_3D, mode="constant", cval=0) for c in crops]
    borders = [(c != 0) & (c != 255) for c in codes]
    edts = [ndi.distance_transform_edt(~b, sampling=spacing) for b in borders]
    for a, b in ((0, 1), (1, 0)):
        d = edts[b][borders[a]]
        w = table[codes[a][borders[a]]]
        order = np.lexsort((w, d))
        d, w = d[order], w[order]
        cum = np.cumsum(w) / np.sum(w)
        dists.append(d[min(int(np.searchsorted(cum, percent / 100.0)), len(d) - 1)])
    return max(dists)


def naive_pair_metrics(fixed, moving, u, labels, spacing):
    ident = np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij")
    warped = ndi.map_coordinates(moving, ident + u, order=0)
    dice, hd, hdv = [], [], []
    tab, tab1 = metrics.surface_element_areas(spacing), metrics.surface_element_areas((1.0, 1.0, 1.0))
    for lab in labels:
        a, m, b = fixed == lab, moving == lab, warped == lab
        if not a.any() or not m.any():
            dice.append(np.nan)
        else:
            dice.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
        if not a.any() or not b.any():
            hd.append(np.nan)
            hdv.append(np.nan)
        else:
            hd.append(naive_surface_hd(a, b, spacing, tab))
            hdv.append(naive_surface_hd(a, b, (1.0, 1.0, 1.0), tab1))
    g = [[np.gradient(u[c], axis=k) + (c == k) for k in range(3)] for c in range(3)]
    det = (g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1]) - g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
           + g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0]))
    mask = fixed > 0
    kern = np.array([-0.5, 0, 0.5])
    gl = [[ndi.correlate(u[c], kern.reshape([-1 if j == k else 1 for j in range(3)]), mode="constant") + (c == k)
           for k in range(3)] for c in range(3)]
    dl = (gl[0][0] * (gl[1][1] * gl[2][2] - gl[1][2] * gl[2][1])
          - gl[0][1] * (gl[1][0] * gl[2][2] - gl[1][2] * gl[2][0])
          + gl[0][2] * (gl[1][0] * gl[2][1] - gl[1][1] * gl[2][0]))[2:-2, 2:-2, 2:-2]
    return {
        "dice": np.nanmean(dice), "hd95": np.nanmean(hd), "hd95_vox": np.nanmean(hdv),
        "fold_pct": 100 * np.mean(det <= 0), "fold_pct_mask": 100 * np.mean(det[mask] <= 0),
        "sdlogj": np.log(det[det > 0]).std(), "sdlogj_l2r": np.log(np.clip(dl + 3, 1e-9, 1e9)).std(),
        "ndv": naive_ndv(u),
    }


def naive_ndv(u):
    """Liu et al.'s NDV over the whole image: ten Jacobians of the edge-padded field."""
    p = np.pad(u, [(0, 0)] + [(1, 1)] * 3, mode="edge")
    n = u.shape[1:]

    def at(s):
        return p[(slice(None),) + tuple(slice(1 + a, 1 + a + m) for a, m in zip(s, n))]

    c = at((0, 0, 0))
    eye = np.eye(3, dtype=u.dtype)
    fwd = [at(tuple(eye[k].astype(int))) - c + eye[k][:, None, None, None] for k in range(3)]
    bwd = [c - at(tuple(-eye[k].astype(int))) + eye[k][:, None, None, None] for k in range(3)]

    def det(a, b, d):
        return (a[0] * (b[1] * d[2] - b[2] * d[1]) - a[1] * (b[0] * d[2] - b[2] * d[0])
                + a[2] * (b[0] * d[1] - b[1] * d[0]))

    total = np.zeros(n, np.float64)
    for a in (fwd[0], bwd[0]):
        for b in (fwd[1], bwd[1]):
            for d in (fwd[2], bwd[2]):
                total += np.minimum(det(a, b, d), 0)
    for s, pairs in ((-1, ((0, 1), (0, 2), (1, 2))), (1, ((0, 1), (1, 2), (0, 2)))):
        cols = []
        for i, j in pairs:
            e = np.zeros(3, int)
            e[[i, j]] = s
            cols.append(at(tuple(e)) - c + e[:, None, None, None])
        total += np.minimum(det(*cols), 0)
    return float((-0.5 / 6 * total).sum() / np.prod(n) * 100)


def _time(fn, repeats):
    fn()  # warm-up (area tables, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="do not run the straightforward version")
    parser.add_argument("--readme", type=Path, help="write the figures into this README")
    args = parser.parse_args()

    t0 = time.perf_counter()
    fixed, moving, u = make_pair()
    labels = np.arange(1, N_LABELS + 1)
    print(f"pair {SHAPE}, {N_LABELS} labels in {N_CELLS} cells, made in {time.perf_counter() - t0:.1f} s; "
          f"1 thread (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); min and median of {args.repeats} runs")

    iso = (1.0, 1.0, 1.0)
    cases = [("OASIS-like, 1 mm isotropic", iso, u), (f"anisotropic spacing {SPACING} (+ hd95_vox)", SPACING, u)]
    rough = u + (np.random.default_rng(1).standard_normal(u.shape) * 0.15).astype(np.float32)
    cases.append(("rough field (u + i.i.d. noise 0.15 voxel), 1 mm", iso, rough))
    results = {}
    for name, spacing, field in cases:
        (scalars, _), times = _time(
            lambda f=field, s=spacing: metrics.pair_metrics(fixed, moving, f, labels, s), args.repeats)
        results[name] = (scalars, min(times))
        print(f"\npair_metrics, {name}: {min(times):.3f} s (median {np.median(times):.3f})")
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items()))
        parts = {}
        for _ in range(3):
            p = time_parts(fixed, moving, field, labels, spacing)
            parts = {k: min(parts.get(k, np.inf), v) for k, v in p.items()}
        print("  parts (min of 3): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))

    import torch

    if torch.cuda.is_available():   # the voxel-wise field metrics on the GPU, the rest on this core
        name, spacing, field = cases[-1]
        (scalars, _), times = _time(lambda: metrics.pair_metrics(fixed, moving, field, labels, spacing,
                                                                 device="cuda"), args.repeats)
        print(f"\npair_metrics, {name}, field metrics on {torch.cuda.get_device_name()}: {min(times):.3f} s "
              f"(ndv={scalars['ndv']:.4g}, fold_pct={scalars['fold_pct']:.4g}; same as on the CPU: "
              f"{np.isclose(scalars['ndv'], results[name][0]['ndv'], rtol=1e-6)})")

    t0 = time.perf_counter()
    scalars, _ = metrics.pair_metrics(fixed, moving, u, labels, iso, label_warp="linear")
    print(f"\npair_metrics with label_warp='linear' (one-hot linear + argmax), 1 mm: "
          f"{time.perf_counter() - t0:.3f} s (one run), dice={scalars['dice']:.4f}")

    smooth, anisotropic, folding = (results[name] for name, _, _ in cases)
    figures = [f"{smooth[1]:.2f} s (smooth field, 1 mm)", f"{anisotropic[1]:.2f} s (anisotropic spacing, + hd95_vox)",
               f"{folding[1]:.2f} s (rough field folding {folding[0]['fold_pct']:.3f} % of voxels, NDV "
               f"{folding[0]['ndv']:.3f} %)"]
    if args.skip_reference:
        _write_readme(args.readme, figures)
        return
    name = cases[0][0]
    print(f"\nstraightforward implementation ({name}; per label: full-volume masks, surface-distance's "
          "algorithm; numpy.gradient, correlate and ten-Jacobian NDV over the whole image) ...", flush=True)
    t0 = time.perf_counter()
    ref = naive_pair_metrics(fixed, moving, u, labels, iso)
    slow = time.perf_counter() - t0
    scalars, fast = results[name]
    print(f"straightforward: {slow:.1f} s; pair_metrics {fast:.3f} s; ratio x{slow / fast:.0f}")
    worst = 0.0
    for k, v in ref.items():
        diff = abs(v - scalars[k])
        worst = max(worst, diff / max(1.0, abs(v)))
        print(f"  {k}: {v:.6g} (pair_metrics {scalars[k]:.6g}, |diff| {diff:.1e})")
    print("same numbers" if worst < 1e-5 else f"MISMATCH (worst relative difference {worst:.2e})")
    figures.append(f"straightforward implementation {slow:.1f} s on the first case (x{slow / fast:.0f})")
    _write_readme(args.readme, figures)


def _write_readme(readme, figures):
    if readme is None:
        return
    commit = git_commit(Path(__file__).resolve().parents[1])
    write_between_markers(readme, "metrics-speed", f"{N_LABELS} labels, one core: " + "; ".join(figures)
                          + f" (commit `{commit[:12]}`)", inline=True)
    print(f"wrote the figures into {readme}")


def time_parts(fixed, moving, u, labels, spacing):
    """Rough split of pair_metrics' time (the parts as pair_metrics runs them)."""
    m = metrics
    out = {}
    t = time.perf_counter()
    lab = m._as_labels(labels)
    cf = m._compact(fixed, lab)
    cm = m._compact(moving, lab)
    out["relabel"] = time.perf_counter() - t
    t = time.perf_counter()
    cw = m._warp_nearest(cm, u)
    out["warp"] = time.perf_counter() - t
    t = time.perf_counter()
    joint = m._joint_counts(cf, cw, len(lab))
    m._dice_from_joint(joint, m._absent(joint, cm))
    out["dice"] = time.perf_counter() - t
    t = time.perf_counter()
    m._hd_from_compact(cf, cw, len(lab), [np.array(spacing)] + ([] if np.all(np.array(spacing) == 1) else [np.ones(3)]))
    out["hd95" + ("" if np.all(np.array(spacing) == 1) else "+hd95_vox")] = time.perf_counter() - t
    t = time.perf_counter()
    m._field_pass(u, mask=fixed > 0, want_ndv=False)
    out["jacobian"] = time.perf_counter() - t
    t = time.perf_counter()
    m._field_pass(u, mask=fixed > 0, want_ndv=True)
    out["ndv"] = time.perf_counter() - t - out["jacobian"]
    return out


if __name__ == "__main__":
    main()
