"""MI(i; s), the mutual information between a voxel's intensity and its label (regbench.evaluation.information)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from regbench.data.prepared import PreparedDataset
from regbench.evaluation.information import intensity_label_mi
from regbench.io import read_json
from regbench.workflow import cli


def test_labels_read_off_the_intensities_give_the_label_entropy():
    seg = np.repeat([0, 1], 50).reshape(10, 10)
    image = np.where(seg == 1, 0.9, 0.1)
    assert intensity_label_mi(image, seg) == pytest.approx(1.0)          # H(s) = 1 bit
    four = np.repeat([1, 2, 3, 4], 25).reshape(10, 10)                   # labels 1, 2 dark; 3, 4 bright
    assert intensity_label_mi(np.where(four > 2, 1.0, 0.0), four) == pytest.approx(1.0)   # H(i) = 1 bit


def test_intensities_independent_of_the_labels_give_zero():
    seg = np.tile([0, 1], 50).reshape(10, 10)                  # columns alternate labels
    image = np.repeat([0.0, 1.0], 50).reshape(10, 10)          # top half dark, bottom bright
    assert intensity_label_mi(image, seg) == pytest.approx(0.0, abs=1e-12)
    assert intensity_label_mi(np.full((4, 4), 0.3), np.arange(16).reshape(4, 4)) == 0.0   # a constant image


def test_a_noisy_intensity_gives_one_bit_less_the_binary_entropy_of_the_error():
    # label 0 or 1 (50 voxels each); the intensity matches its label in 3 voxels of 4
    seg = np.repeat([0, 1], 400)
    image = seg.astype(float).copy()
    image[:100], image[400:500] = 1.0, 0.0
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert intensity_label_mi(image, seg) == pytest.approx(1 - h)   # 0.1887 bits


def test_intensities_fall_in_equal_width_bins_over_the_image_s_range():
    """Bins are [low, high) of width range / bins, the maximum in the last. Intensities 0, 0.4, 0.6, 1 with labels
    0, 0, 1, 1: two bins split them at 0.5 (MI = H(s) = 1 bit), one bin holds all (MI 0). With the default 32 bins,
    0 and 0.02 share bin 0 (0.02 * 32 = 0.64) while 1 is in bin 31: for labels 0, 1, 2 the MI is
    H(i) = H(2/3, 1/3) = 0.9183 bits, not log2(3) as with finer bins."""
    image, seg = np.array([0.0, 0.4, 0.6, 1.0]), np.array([0, 0, 1, 1])
    assert intensity_label_mi(image, seg, bins=2) == pytest.approx(1.0)
    assert intensity_label_mi(image, seg, bins=1) == 0.0
    assert intensity_label_mi(image + 5.0, seg, bins=2) == pytest.approx(1.0)   # the image's own range, not [0, 1]
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert intensity_label_mi(np.repeat([0.0, 0.02, 1.0], 10), np.repeat([0, 1, 2], 10)) == pytest.approx(h)
    assert intensity_label_mi(np.repeat([0.0, 0.04, 1.0], 10), np.repeat([0, 1, 2], 10)) == pytest.approx(math.log2(3))
    with pytest.raises(ValueError, match="bins"):
        intensity_label_mi(image, seg, bins=0)


def test_mismatched_shapes_and_negative_labels_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        intensity_label_mi(np.zeros((4, 4)), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="non-negative"):
        intensity_label_mi(np.zeros((2, 2)), -np.ones((2, 2), int))


def test_the_prepare_step_records_every_subject_and_each_split_s_mean_in_dataset_json(tmp_path):
    settings = {"dataset": "embedded2d", "dataset_options": {"n_train": 3, "n_val": 2, "n_test": 2},
                "torch_threads": 1, "seed": 0}
    prepared = tmp_path / "prepared"
    assert cli.main(["prepare", "--raw", str(tmp_path / "raw"), "--prepared", str(prepared),
                     "--settings", json.dumps(settings)]) == 0
    info = read_json(prepared / "dataset.json")
    record = info["intensity_label_mi"]
    dataset = PreparedDataset(prepared)
    test_subjects = dataset.split_subjects("test")
    assert set(record["subjects"]) == set(dataset.subjects.index) and record["unit"] == "bits"
    assert record["bins"] == 32 and set(record["splits"]) == {"train", "val", "test"}
    expected = intensity_label_mi(dataset.image(test_subjects[0]), dataset.seg(test_subjects[0]), record["bins"])
    assert record["subjects"][test_subjects[0]] == pytest.approx(expected)
    for split in ("train", "val", "test"):
        values = [record["subjects"][s] for s in dataset.split_subjects(split)]
        assert record["splits"][split] == pytest.approx(np.mean(values))
    # brain slices: the intensities say much, not all, about the labels
    assert 0.3 < record["splits"]["test"] < 3.0


def test_the_prepare_step_gives_each_pair_the_mean_of_its_two_subjects_mi(tmp_path):
    settings = {"dataset": "embedded2d_shift", "dataset_options": {"n_train": 0, "n_val": 1, "n_test": 2},
                "torch_threads": 1, "seed": 0}
    prepared = tmp_path / "prepared"
    assert cli.main(["prepare", "--raw", str(tmp_path / "raw"), "--prepared", str(prepared),
                     "--settings", json.dumps(settings)]) == 0
    record = read_json(prepared / "dataset.json")["intensity_label_mi"]
    dataset = PreparedDataset(prepared)
    pairs = dataset.pairs
    assert list(pairs.columns) == ["split", "fixed", "moving", "intensity_label_mi"] and len(pairs) == 5
    for pair in pairs.itertuples():
        mi = {s: intensity_label_mi(dataset.image(s), dataset.seg(s), record["bins"]) for s in (pair.fixed, pair.moving)}
        assert pair.intensity_label_mi == pytest.approx((mi[pair.fixed] + mi[pair.moving]) / 2)
    assert record["pairs"]["test"] == pytest.approx(pairs.loc[pairs["split"] == "test", "intensity_label_mi"].mean())
    assert set(record["pairs"]) == {"val", "test"} and "train" not in record["splits"]   # no train subjects here
