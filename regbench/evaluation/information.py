"""How much an image's intensities say about its labels: MI(i; s), the mutual information between the intensity
and the label of a voxel (Jena et al., "Deep learning in medical image registration: magic or mirage?",
NeurIPS 2024, found that classical methods' Dice tracks it across datasets).

Convention: every voxel of the image counts, background (label 0) included, each label value its own class;
intensities fall in ``bins`` equal-width bins over the image's own range (a constant image: one bin). The value is
in bits, and at most min(H(i), H(s)): 0 when the labels cannot be told from the intensities, H(s) when they can be
read off them. A dataset records every subject's value and the mean over each split's subjects in ``dataset.json``
(``intensity_label_mi``).

A pair's value is the mean of its two subjects' (primary images): how much the intensities of the two images that
a registration matches say about the labels it is scored on. The prepared ``pairs.csv`` carries it per pair
(column ``intensity_label_mi``), and ``dataset.json`` the mean over each split's pairs (``pairs``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regbench.data.prepared import PreparedDataset
from regbench.io import read_json, write_csv, write_json

DEFAULT_BINS = 32


def intensity_label_mi(image: np.ndarray, seg: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """MI(i; s) in bits between ``image``'s binned intensities and the label map ``seg`` (same shape)."""
    image, seg = np.asarray(image), np.asarray(seg)
    if image.shape != seg.shape:
        raise ValueError(f"image {image.shape} and label map {seg.shape} differ in shape")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = image.astype(np.float64, copy=False).ravel()
    low, high = float(values.min()), float(values.max())
    if high > low:
        intensity = np.minimum(((values - low) / (high - low) * bins).astype(np.int64), bins - 1)
    else:
        intensity = np.zeros(values.size, np.int64)
    label = seg.ravel().astype(np.int64, copy=False)
    if label.min() < 0:
        raise ValueError(f"a label map holds non-negative labels, got {label.min()}")
    joint = np.bincount(label * bins + intensity, minlength=(int(label.max()) + 1) * bins).reshape(-1, bins)
    p = joint / values.size
    p_label, p_intensity = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log2(p[nonzero] / (p_label @ p_intensity)[nonzero])))


def dataset_mi(dataset: PreparedDataset, bins: int = DEFAULT_BINS) -> dict:
    """Every subject's MI(i; s) (its primary image and label map) and the mean of each split's."""
    subjects = {}
    for split in ("train", "val", "test"):
        for subject in dataset.split_subjects(split):
            subjects[subject] = intensity_label_mi(dataset.image(subject), dataset.seg(subject), bins)
    splits = {split: float(np.mean([subjects[s] for s in dataset.split_subjects(split)]))
              for split in ("train", "val", "test") if dataset.split_subjects(split)}
    pairs = pair_mi(dataset.pairs, subjects)
    pair_splits = {split: float(values.mean()) for split, values in pairs.groupby(dataset.pairs["split"], sort=False)}
    return {"unit": "bits", "bins": int(bins), "splits": splits, "pairs": pair_splits, "subjects": subjects}


def pair_mi(pairs: pd.DataFrame, subjects: dict[str, float]) -> pd.Series:
    """Each pair's MI(i; s) in bits: the mean of its fixed and its moving subject's (a table of fixed, moving)."""
    return pd.Series([(subjects[f] + subjects[m]) / 2 for f, m in zip(pairs["fixed"], pairs["moving"])],
                     index=pairs.index, name="intensity_label_mi", dtype=float)


def record_dataset_mi(prepared_dir, bins: int = DEFAULT_BINS) -> dict:
    """Add ``intensity_label_mi`` (:func:`dataset_mi`) to a prepared folder's dataset.json, and each pair's value
    (:func:`pair_mi`) to its pairs.csv (dataset.json last: the folder is complete when it has the record)."""
    info_path = Path(prepared_dir) / "dataset.json"
    dataset = PreparedDataset(prepared_dir)
    record = dataset_mi(dataset, bins)
    pairs = dataset.pairs[["split", "fixed", "moving"]].assign(intensity_label_mi=pair_mi(dataset.pairs, record["subjects"]))
    write_csv(Path(prepared_dir) / "pairs.csv", pairs)
    write_json(info_path, {**read_json(info_path), "intensity_label_mi": record})
    return record

