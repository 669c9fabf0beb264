"""The field metrics with torch (regbench.evaluation.metrics.field_torch) give numpy's numbers: the same fold counts
(the same determinant bits), SDlogJ and NDV to float rounding. On CPU here; tests/test_gpu.py repeats it on CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from regbench.evaluation import metrics
from regbench.evaluation.metrics.field_torch import field_pass
from regbench.evaluation.metrics.jacobian import _field_pass


def smooth_and_rough(shape, seed):
    """A smooth displacement of a few voxels (folds where it is steep) and the same plus voxel-wise noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((len(shape),) + tuple(max(2, s // 6) for s in shape))
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=shape,
                                             mode="bilinear" if len(shape) == 2 else "trilinear",
                                             align_corners=True)[0].numpy() * 4.0
    return smooth, smooth + rng.standard_normal(smooth.shape) * 0.4


CASES = [((40, 36), np.float64), ((40, 36), np.float32), ((20, 18, 16), np.float64), ((20, 18, 16), np.float32)]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_torch_field_pass_gives_numpy_s_fold_counts_sdlogj_and_ndv(shape, dtype):
    for u in smooth_and_rough(shape, seed=len(shape)):
        u = u.astype(dtype)
        mask = np.zeros(shape, bool)
        mask[(slice(2, -3),) * len(shape)] = True
        expected = _field_pass(u, mask=mask, want_ndv=True)
        got = field_pass(torch.from_numpy(u), torch.from_numpy(mask))
        assert expected["n_fold"] > 0 and expected["ndv"] > 0          # the case folds
        for key in ("n_fold", "n_fold_mask", "n_mask"):
            assert got[key] == expected[key], key
        tolerance = 1e-10 if dtype == np.float64 else 1e-5
        for key in ("sdlogj", "sdlogj_l2r", "ndv"):
            assert got[key] == pytest.approx(expected[key], rel=tolerance, abs=1e-12), key


@pytest.mark.parametrize("ndim", [2, 3])
def test_torch_field_pass_counts_a_zero_determinant_as_a_fold(ndim):
    """u_0 = -(clip(x_0, 5, 9) - 5): det exactly 0 on rows 6..8 (central difference -1), 0.5 on rows 5 and 9, 1
    elsewhere. Folds are det <= 0: 3 of 20 rows; SDlogJ leaves them out (the std of 15 zeros and 2 x log 0.5);
    flat simplices have no negative volume (NDV 0). Hand numbers, not only numpy's, which never meets det = 0
    in the random fields above."""
    shape = (20, 9, 8)[:ndim]
    u = np.zeros((ndim,) + shape)
    x0 = np.arange(shape[0], dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))
    u[0] = -(np.clip(x0, 5, 9) - 5)
    mask = np.zeros(shape, bool)
    mask[:8] = True   # rows 6 and 7 fold
    got = field_pass(torch.from_numpy(u), torch.from_numpy(mask))
    per_row = int(np.prod(shape[1:]))
    assert got["n_fold"] == 3 * per_row and got["n_fold_mask"] == 2 * per_row and got["n_mask"] == 8 * per_row
    assert got["sdlogj"] == pytest.approx(np.std([0.0] * 15 + [np.log(0.5)] * 2), abs=1e-12)
    assert got["ndv"] == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_torch_sdlogj_l2r_clips_a_determinant_below_minus_three(ndim):
    """u_0 = -5 (clip(x_0, 5, 7) - 5): J + 3 is 1.5, -1, 1.5 on rows 5, 6, 7 and 4 elsewhere; -1 is clipped to 1e-9
    before the log, so over rows 2..9 (the [2:-2] crop of 12) Learn2Reg's SDlogJ is the std of 5 x log 4,
    2 x log 1.5 and log 1e-9."""
    shape = (12, 9, 8)[:ndim]
    u = np.zeros((ndim,) + shape)
    x0 = np.arange(shape[0], dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))
    u[0] = -5.0 * (np.clip(x0, 5, 7) - 5)
    expected = np.std([np.log(4)] * 5 + [np.log(1.5)] * 2 + [np.log(1e-9)])
    assert field_pass(torch.from_numpy(u))["sdlogj_l2r"] == pytest.approx(expected, abs=1e-12)


def test_pair_metrics_on_a_torch_device_gives_the_same_scores():
    rng = np.random.default_rng(3)
    fixed = rng.integers(0, 4, (30, 28))
    moving = np.roll(fixed, 1, axis=0)
    _, u = smooth_and_rough((30, 28), seed=5)
    labels = [1, 2, 3]
    on_numpy, per_label = metrics.pair_metrics(fixed, moving, u, labels)
    on_torch, per_label_torch = metrics.pair_metrics(fixed, moving, u, labels, device="cpu")
    assert on_numpy["fold_pct"] > 0
    for key, value in on_numpy.items():
        if isinstance(value, float) and not np.isnan(value):
            assert on_torch[key] == pytest.approx(value, rel=1e-10), key
    assert per_label.equals(per_label_torch)
