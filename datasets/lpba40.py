"""LPBA40 (LONI Probabilistic Brain Atlas, Shattuck et al., NeuroImage 2008): 40 brains, 56 structures.

The variant is LONI's "LPBA40 Subjects Delineation Space" release (Analyze .hdr/.img, skull-stripped,
native delineation grid 256 x 124 x 256 at 0.86 x 1.5 x 0.86 mm), all 56 labels. LONI gives it only
after a terms-of-use form, so it is a manual download: put the zip where :meth:`LPBA40.download` says
(or set ``base_url`` to a mirror you may use). Papers use other variants (RCN/VTN's preprocessed
release, 160 x 192 x 160 crops, 54 labels): their numbers are not comparable with this one.

Split: S31-S40 for testing (every ordered pair of test subjects, 90 pairs), the test subjects of the 30/10
split of Mok and Chung (LapIRN, MICCAI 2020) on LPBA40; of their 30 training subjects, the last four (S27-S30)
are the validation split (every ordered pair, 12 pairs), on which every choice is made, and S01-S26 train.
Intensities are scaled to [0, 1] by each brain's 99.9th percentile (clipped).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regbench.dataset import DatasetSource, write_prepared
from regbench.data.download import extract_members, fetch, record_checksum
from regbench.io import InputError, check_same_grid, load_nifti, save_nifti

ARCHIVE = "LPBA40_Subjects_Delineation_Space.zip"
LONI_PAGE = "https://resource.loni.usc.edu/resources/atlases-downloads/"
SHAPE = (256, 124, 256)
SUBJECTS = [f"S{i:02d}" for i in range(1, 41)]

_REGIONS = {
    21: "superior frontal gyrus", 23: "middle frontal gyrus", 25: "inferior frontal gyrus", 27: "precentral gyrus",
    29: "middle orbitofrontal gyrus", 31: "lateral orbitofrontal gyrus", 33: "gyrus rectus",
    41: "postcentral gyrus", 43: "superior parietal gyrus", 45: "supramarginal gyrus", 47: "angular gyrus",
    49: "precuneus", 61: "superior occipital gyrus", 63: "middle occipital gyrus", 65: "inferior occipital gyrus",
    67: "cuneus", 81: "superior temporal gyrus", 83: "middle temporal gyrus", 85: "inferior temporal gyrus",
    87: "parahippocampal gyrus", 89: "lingual gyrus", 91: "fusiform gyrus", 101: "insular cortex",
    121: "cingulate gyrus", 161: "caudate", 163: "putamen", 165: "hippocampus",
}
LABELS = pd.DataFrame(
    [{"label": value + side, "name": f"{'L' if side == 0 else 'R'} {name}"}
     for value, name in _REGIONS.items() for side in (0, 1)]
    + [{"label": 181, "name": "cerebellum"}, {"label": 182, "name": "brainstem"}]
).sort_values("label").reset_index(drop=True)


class LPBA40(DatasetSource):
    name = "lpba40"
    ndim = 3
    description = ("LPBA40, LONI delineation space (native grid), 56 structures; S01-S26 train, S27-S30 val, "
                   "S31-S40 test")
    citation = ("D. W. Shattuck et al. Construction of a 3D probabilistic atlas of human cortical structures. "
                "NeuroImage 39(3):1064-1080, 2008")
    license = "LONI LPBA40 terms of use (accepted at download; no redistribution)"
    options = {"base_url": "", "sha256": "", "n_train": 26, "n_val": 4}  # the rest (10) test

    def download(self, raw_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        archive = Path(raw_dir) / ARCHIVE
        known = f"sha256:{options['sha256']}" if options["sha256"] else None
        if options["base_url"]:
            fetch(options["base_url"].rstrip("/") + "/" + ARCHIVE, archive, known_hash=known)
        elif not archive.exists():
            raise InputError(
                f"{archive}: LPBA40 is a manual download. Fill in LONI's terms-of-use form at {LONI_PAGE}, "
                f"download 'LPBA40 Subjects Delineation Space' ({ARCHIVE}) and put the zip file at "
                f"{archive.resolve()} (or set datasets.lpba40.base_url to a mirror); then rerun.")
        extract_members(archive, Path(raw_dir) / "extracted",
                        lambda name: "/delineation_space/S" in f"/{name}" and name.endswith((".hdr", ".img")),
                        verified=bool(known))

    def prepare(self, raw_dir, prepared_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        start = time.perf_counter()
        raw, prepared_dir = Path(raw_dir) / "extracted", Path(prepared_dir)
        folders = {path.name: path for path in raw.glob("**/delineation_space/S[0-9][0-9]") if path.is_dir()}
        missing = [s for s in SUBJECTS if s not in folders]
        if missing:
            raise InputError(f"{raw}: subjects {missing[:5]} missing from {ARCHIVE} "
                             f"(found {len(folders)} of 40 under */delineation_space/)")
        n_train, n_val = int(options["n_train"]), int(options["n_val"])
        if n_train < 2 or n_val < 0 or n_train + n_val > len(SUBJECTS) - 2:
            raise ValueError(f"dataset 'lpba40': n_train {n_train} and n_val {n_val} must leave at least 2 of the "
                             f"{len(SUBJECTS)} subjects for testing (and n_train >= 2)")
        splits = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(SUBJECTS) - n_train - n_val)
        rows = []
        for index, subject in enumerate(SUBJECTS):  # one subject at a time
            folder = folders[subject]
            image, spacing = load_nifti(folder / f"{subject}.delineation.skullstripped.hdr", ndim=3)
            seg, _ = load_nifti(folder / f"{subject}.delineation.structure.label.hdr", kind="labels", ndim=3)
            check_same_grid(folder / f"{subject}.delineation.skullstripped.hdr",
                            folder / f"{subject}.delineation.structure.label.hdr")
            for what, array in (("skullstripped", image), ("structure.label", seg)):
                if array.shape != SHAPE:
                    raise InputError(f"{folder / f'{subject}.delineation.{what}.hdr'}: shape {array.shape}, "
                                     f"expected {SHAPE}")
            unknown = set(np.unique(seg).tolist()) - set(LABELS["label"]) - {0}
            if unknown:
                raise InputError(f"{folder / f'{subject}.delineation.structure.label.hdr'}: label values "
                                 f"{sorted(unknown)[:5]} are not LPBA40's 56 structures")
            image = np.clip(image / max(float(np.percentile(image, 99.9)), 1e-6), 0, 1).astype(np.float32)
            save_nifti(prepared_dir / "images" / f"{subject}.nii.gz", image, spacing)
            save_nifti(prepared_dir / "segs" / f"{subject}.nii.gz", seg.astype(np.int16), spacing)
            rows.append({"subject": subject, "split": splits[index],
                         "image": f"images/{subject}.nii.gz", "seg": f"segs/{subject}.nii.gz"})
        members = {split: [s for s, chosen in zip(SUBJECTS, splits) if chosen == split] for split in ("val", "test")}
        pairs = pd.DataFrame([{"split": split, "fixed": f, "moving": m} for split, group in members.items()
                              for f in group for m in group if f != m], columns=["split", "fixed", "moving"])
        record_checksum(Path(raw_dir) / ARCHIVE)

        from regbench.runtime import provenance

        info = provenance(options)
        info.update({"source": ARCHIVE, "seconds": round(time.perf_counter() - start, 1)})
        write_prepared(prepared_dir, name=self.name, ndim=3, shape=SHAPE, spacing=spacing,
                       subjects=pd.DataFrame(rows), labels=LABELS, pairs=pairs, provenance=info)


DATASETS = {"lpba40": LPBA40()}
