"""OASIS-1 as released by neurite (v1.0): the brains of Learn2Reg's OASIS task and the VoxelMorph tutorials.

- ``oasis``: 3D, ``aligned_norm`` (160 x 192 x 224 at 1 mm, affinely aligned, intensities in [0, 1])
  with ``aligned_seg35`` (35 FreeSurfer structures; ``labels: seg4`` for the 4-class maps).
- ``oasis2d``: the coronal ``slice_norm`` (160 x 192) with ``slice_seg24`` (24 structures).

Splits follow Learn2Reg 2021 (task 3), by OASIS-1 subject number: validation pairs 0395->0396 ...
0413->0414, test pairs 0415->0416 ... 0452->0453, every other subject for training. OASIS-1 numbers
have gaps; a pair whose subject is not in the release is left out and listed in dataset.json.
Learn2Reg's own files are axis-permuted (160 x 224 x 192); these are neurite's axes.

Data: Marcus et al., OASIS, J Cogn Neurosci 2007; processed by Hoopes et al. (HyperMorph, IPMI 2021).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regbench.dataset import DatasetSource, write_prepared
from regbench.data.download import extract_members, fetch, record_checksum
from regbench.io import InputError, check_same_grid, load_nifti, save_nifti

BASE_URL = "http://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/"
SUBJECT = re.compile(r"^OASIS_OAS1_(\d{4})_MR1$")
VAL_PAIRS = [(n, n + 1) for n in range(395, 414)]   # 19 pairs
TEST_PAIRS = [(n, n + 1) for n in range(415, 453)]  # 38 pairs

VARIANTS = {
    3: {"archive": "neurite-oasis.v1.0.tar", "image": "aligned_norm.nii.gz", "shape": (160, 192, 224),
        "labels": {"seg35": "aligned_seg35.nii.gz", "seg4": "aligned_seg4.nii.gz"}, "default_labels": "seg35"},
    2: {"archive": "neurite-oasis.2d.v1.0.tar", "image": "slice_norm.nii.gz", "shape": (160, 192),
        "labels": {"seg24": "slice_seg24.nii.gz", "seg4": "slice_seg4.nii.gz"}, "default_labels": "seg24"},
}


class NeuriteOasis(DatasetSource):
    citation = ("D. S. Marcus et al. Open Access Series of Imaging Studies (OASIS). J Cogn Neurosci 19(9), 2007; "
                "A. Hoopes et al. HyperMorph. IPMI 2021 (the neurite-oasis processing); "
                "A. Hering et al. Learn2Reg. IEEE TMI 42(3), 2023 (the splits)")
    license = "OASIS Data Use Agreement (https://www.oasis-brains.org): research use, cite the sources"

    def __init__(self, ndim: int):
        self.ndim = ndim
        self.name = "oasis" if ndim == 3 else "oasis2d"
        self.variant = VARIANTS[ndim]
        self.description = (f"OASIS-1, neurite v1.0, {'3D aligned brains' if ndim == 3 else '2D coronal slices'}; "
                            "Learn2Reg splits")
        self.options = {
            "base_url": BASE_URL,            # a mirror, or a local server in the tests
            "sha256": "",                    # none is published; the first valid download records one
            "labels": self.variant["default_labels"],
            "expected_subjects": 414,        # a release with another count stops with an error
        }

    def expected_grid(self, options: dict[str, Any]) -> dict[str, Any]:
        """The neurite release's grid (1 mm), its label set's size and Learn2Reg's test pairs, before downloading."""
        labels = int(re.sub(r"\D", "", options["labels"]))   # seg35: 35 labels
        return {"ndim": self.ndim, "shape": self.variant["shape"], "spacing": (1.0,) * self.ndim, "labels": labels,
                "test_pairs": len(TEST_PAIRS)}

    def archive_path(self, raw_dir: Path) -> Path:
        return Path(raw_dir) / self.variant["archive"]

    def download(self, raw_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        if options["labels"] not in self.variant["labels"]:
            raise ValueError(f"dataset {self.name!r}: labels must be one of {sorted(self.variant['labels'])}, "
                             f"got {options['labels']!r}")
        archive = self.archive_path(raw_dir)
        known = f"sha256:{options['sha256']}" if options["sha256"] else None
        fetch(options["base_url"].rstrip("/") + "/" + archive.name, archive, known_hash=known)
        used = {self.variant["image"], self.variant["labels"][options["labels"]]}
        extract_members(archive, Path(raw_dir) / "extracted",
                        lambda name: name.rsplit("/", 1)[-1] in used or name.endswith("_labels.txt")
                        or name == "subjects.txt", verified=bool(known))

    def prepare(self, raw_dir, prepared_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        start = time.perf_counter()
        raw, prepared_dir = Path(raw_dir) / "extracted", Path(prepared_dir)
        label_file = self.variant["labels"][options["labels"]]
        labels = read_label_table(raw / f"{options['labels']}_labels.txt")
        numbers = self.validate_listing(raw, options, label_file)
        rows = []
        for number in sorted(numbers):  # one subject at a time: memory stays that of one volume
            subject = f"OASIS_OAS1_{number:04d}_MR1"
            image, spacing = load_nifti(raw / subject / self.variant["image"], ndim=self.ndim)
            seg, _ = load_nifti(raw / subject / label_file, kind="labels", ndim=self.ndim)
            check_same_grid(raw / subject / self.variant["image"], raw / subject / label_file)
            self.check_volume(raw / subject, image, seg, labels, label_file)
            save_nifti(prepared_dir / "images" / f"{subject}.nii.gz", image.astype(np.float32), spacing)
            save_nifti(prepared_dir / "segs" / f"{subject}.nii.gz", seg.astype(np.int16), spacing)
            rows.append({"subject": subject, "split": split_of(number), "image": f"images/{subject}.nii.gz",
                         "seg": f"segs/{subject}.nii.gz"})
        pairs, missing = learn2reg_pairs(numbers)
        if not (pairs["split"] == "test").any():
            raise InputError(f"{raw}: none of Learn2Reg's test pairs (OAS1 0415 ... 0453) is in this release")
        record_checksum(self.archive_path(raw_dir))  # the archive passed validation: later runs verify it

        from regbench.runtime import provenance

        info = provenance(options)
        info.update({"source": options["base_url"] + self.variant["archive"], "labels": options["labels"],
                     "pairs_left_out": missing, "seconds": round(time.perf_counter() - start, 1)})
        write_prepared(prepared_dir, name=self.name, ndim=self.ndim, shape=self.variant["shape"],
                       spacing=(1.0,) * self.ndim, subjects=pd.DataFrame(rows), labels=labels, pairs=pairs,
                       provenance=info)

    def validate_listing(self, raw: Path, options: dict, label_file: str) -> list[int]:
        """The subject numbers, after checking subjects.txt against the extracted folders."""
        listing = raw / "subjects.txt"
        if not listing.exists():
            raise InputError(f"{listing}: missing from {self.variant['archive']}; is this the neurite-oasis release?")
        names = [line.strip().rstrip("/") for line in listing.read_text().splitlines() if line.strip()]
        bad = [name for name in names if not SUBJECT.match(name)]
        if bad:
            raise InputError(f"{listing}: unexpected subject names {bad[:3]} (expected OASIS_OAS1_XXXX_MR1)")
        if len(names) != int(options["expected_subjects"]):
            raise InputError(f"{listing}: {len(names)} subjects, expected {options['expected_subjects']} "
                             f"(the neurite-oasis v1.0 release)")
        for name in names:
            for file in (self.variant["image"], label_file):
                if not (raw / name / file).exists():
                    raise InputError(f"{raw / name / file}: listed in subjects.txt but not in the archive")
        return [int(SUBJECT.match(name).group(1)) for name in names]

    def check_volume(self, folder: Path, image: np.ndarray, seg: np.ndarray, labels: pd.DataFrame,
                     label_file: str) -> None:
        expected = self.variant["shape"]
        for file, array in ((self.variant["image"], image), (label_file, seg)):
            if array.shape != expected:
                raise InputError(f"{folder / file}: shape {array.shape}, expected {expected}")
        unknown = set(np.unique(seg).tolist()) - set(labels["label"]) - {0}
        if unknown:
            raise InputError(f"{folder / label_file}: label values {sorted(unknown)[:5]} "
                             "are not in the label table")
        if image.min() < -1e-3 or image.max() > 1 + 1e-3:
            raise InputError(f"{folder / self.variant['image']}: intensities in [{image.min():.3g}, "
                             f"{image.max():.3g}], expected [0, 1]")


def read_label_table(path: Path) -> pd.DataFrame:
    """neurite's ``segNN_labels.txt``: one ``<value> <name>`` a line; background 0 is dropped."""
    if not path.exists():
        raise InputError(f"{path}: missing; the archive has no label table for these labels")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split(None, 1)
        if not parts or not parts[0].lstrip("-").isdigit():
            continue
        if len(parts) < 2:
            raise InputError(f"{path}, line {number}: expected '<value> <name>', got {line!r}")
        rows.append({"label": int(parts[0]), "name": parts[1].strip()})
    table = pd.DataFrame(rows, columns=["label", "name"])
    table = table[table["label"] != 0].reset_index(drop=True)
    if table.empty:
        raise InputError(f"{path}: no labels found")
    return table


def split_of(number: int) -> str:
    if 395 <= number <= 414:
        return "val"
    if 415 <= number <= 453:
        return "test"
    return "train"


def learn2reg_pairs(numbers) -> tuple[pd.DataFrame, list[str]]:
    """Learn2Reg's validation and test pairs among ``numbers``, and the pairs left out."""
    present, rows, missing = set(numbers), [], []
    for split, pairs in (("val", VAL_PAIRS), ("test", TEST_PAIRS)):
        for fixed, moving in pairs:
            if fixed in present and moving in present:
                rows.append({"split": split, "fixed": f"OASIS_OAS1_{fixed:04d}_MR1",
                             "moving": f"OASIS_OAS1_{moving:04d}_MR1"})
            else:
                missing.append(f"{fixed:04d}->{moving:04d}")
    return pd.DataFrame(rows, columns=["split", "fixed", "moving"]), missing


DATASETS = {"oasis": NeuriteOasis(3), "oasis2d": NeuriteOasis(2)}
