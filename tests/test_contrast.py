"""The label-wise remapping that gives the embedded data its second, T2-like contrast."""
import math

import pytest
import torch

from regbench.data.contrast import T2_LIKE, label_contrast


def test_label_contrast_is_t2_like_deterministic_and_seeded():
    seg = torch.tensor([[0, 2, 3, 24], [4, 13, 999, 1000]]).reshape(1, 1, 2, 4)
    image = label_contrast(seg, blur_sigma=0)
    values = dict(zip(seg.flatten().tolist(), image.flatten().tolist()))
    assert values[0] == 0.0
    assert values[24] > values[3] > values[2]                      # CSF > grey matter > white matter
    assert values[13] < values[3] and values[4] == pytest.approx(T2_LIKE[4])
    # labels outside the table: a draw fixed by (seed, label), whatever else the map holds
    assert 0.2 <= values[999] < 1.0 and values[999] != values[1000]
    alone = label_contrast(torch.full((1, 1, 3, 3), 999), blur_sigma=0)
    assert alone.unique().tolist() == [pytest.approx(values[999])]
    other_seed = label_contrast(seg, seed=1, blur_sigma=0).flatten().tolist()
    assert other_seed[6] != values[999] and other_seed[:6] == image.flatten().tolist()[:6]
    torch.testing.assert_close(label_contrast(seg, noise_std=0.05, seed=3), label_contrast(seg, noise_std=0.05, seed=3),
                               rtol=0, atol=0)
    noisy = label_contrast(seg, blur_sigma=0, noise_std=0.05)
    assert noisy[0, 0, 0, 0] == 0.0 and not torch.equal(noisy, image)   # noise inside the labels only
    # tissue without a label takes tissue_intensity; the background stays 0
    tissue = torch.ones_like(seg, dtype=torch.bool)
    tissue[..., 0, 0] = False
    filled = label_contrast(torch.zeros_like(seg), blur_sigma=0, tissue=tissue, tissue_intensity=0.6)
    assert filled[0, 0, 0, 0] == 0.0 and (filled.flatten()[1:] == 0.6).all()
    with pytest.raises(ValueError, match="tissue"):
        label_contrast(seg, tissue=tissue[..., :2])
    with pytest.raises(ValueError, match="integer"):
        label_contrast(seg.float())
    with pytest.raises(ValueError, match="B x 1"):
        label_contrast(seg[0])


def test_blur_keeps_the_mean_and_works_in_3d():
    seg = torch.zeros(1, 1, 12, 12, 12, dtype=torch.int64)
    seg[..., 3:9, 3:9, 3:9] = 24
    sharp, blurred = label_contrast(seg, blur_sigma=0), label_contrast(seg, blur_sigma=1.0)
    assert blurred.sum().item() == pytest.approx(sharp.sum().item(), rel=1e-5)
    assert 0 < blurred[0, 0, 2, 6, 6] < 1 and blurred.max() < 1


def test_blur_of_one_voxel_is_the_normalised_gaussian_kernel_separable_with_zero_padding():
    """sigma 0.5: radius ceil(1.5) = 2, weights exp(-x^2 / (2 sigma^2)) = 1, e^-2, e^-8 at |x| = 0, 1, 2, divided by
    their sum 1 + 2 e^-2 + 2 e^-8: 0.786571, 0.106451, 0.000264; in 2D the outer product of the 1D kernel; at the
    edge the weights that fall outside are lost (zero padding), not folded back."""
    s = 1 + 2 * math.exp(-2) + 2 * math.exp(-8)
    kernel = torch.tensor([math.exp(-8), math.exp(-2), 1.0, math.exp(-2), math.exp(-8)]) / s
    line = torch.zeros(1, 1, 9, dtype=torch.int64)
    line[..., 4] = 1
    expected = torch.zeros(9)
    expected[2:7] = kernel
    torch.testing.assert_close(label_contrast(line, {1: 1.0}, blur_sigma=0.5)[0, 0], expected, rtol=0, atol=1e-6)
    plane = torch.zeros(1, 1, 7, 7, dtype=torch.int64)
    plane[..., 3, 3] = 1
    square = torch.zeros(7, 7)
    square[1:6, 1:6] = kernel[:, None] * kernel[None, :]
    torch.testing.assert_close(label_contrast(plane, {1: 1.0}, blur_sigma=0.5)[0, 0], square, rtol=0, atol=1e-6)
    edge = torch.zeros(1, 1, 5, dtype=torch.int64)
    edge[..., 0] = 1
    torch.testing.assert_close(label_contrast(edge, {1: 1.0}, blur_sigma=0.5)[0, 0],
                               torch.cat([kernel[2:], torch.zeros(2)]), rtol=0, atol=1e-6)


def test_labels_win_over_the_tissue_mask_and_intensities_are_clipped():
    """A labelled voxel inside ``tissue`` keeps its label's value (24: 1.0); unlabelled tissue takes the default
    0.7; table values outside [0, 1] are clipped to it."""
    seg = torch.tensor([[0, 24, 0, 1, 2]]).reshape(1, 1, 5)
    tissue = torch.tensor([[False, True, True, False, False]]).reshape(1, 1, 5)
    image = label_contrast(seg, {24: 1.0, 1: 1.4, 2: -0.3}, blur_sigma=0, tissue=tissue)
    assert image.flatten().tolist() == [0.0, 1.0, pytest.approx(0.7), 1.0, 0.0]


def test_noise_has_the_asked_standard_deviation_on_labels_and_unlabelled_tissue_only():
    """noise_std 0.05 on a 0.5 label (5000 voxels) and on 0.7 tissue (2500 voxels): no clipping within 4 std, so the
    difference to the clean image has std 0.05 (sampling error about 1 %) there and is exactly 0 on the background;
    another seed, other noise."""
    seg = torch.zeros(1, 1, 100, 100, dtype=torch.int64)
    seg[..., :50] = 1
    tissue = torch.zeros_like(seg, dtype=torch.bool)
    tissue[..., 50:75] = True
    clean = label_contrast(seg, {1: 0.5}, blur_sigma=0, tissue=tissue)
    noisy = label_contrast(seg, {1: 0.5}, blur_sigma=0, tissue=tissue, noise_std=0.05)
    noise = (noisy - clean)[0, 0]
    assert noise[:, :50].std().item() == pytest.approx(0.05, rel=0.05)
    assert noise[:, 50:75].std().item() == pytest.approx(0.05, rel=0.05)
    assert noise[:, :50].mean().abs() < 0.003 and (noise[:, 75:] == 0).all()
    other = label_contrast(seg, {1: 0.5}, blur_sigma=0, tissue=tissue, noise_std=0.05, seed=1)
    assert not torch.equal(other, noisy)
