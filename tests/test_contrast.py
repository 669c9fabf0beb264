"""The label-wise remapping that gives the embedded data its second, T2-like contrast."""
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
