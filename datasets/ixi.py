"""IXI (brain-development.org, CC BY-SA 3.0): T1 and T2 of the same heads, for multi-contrast registration.

Both contrasts of a subject are resampled (trilinear, through their NIfTI affines, so in scanner
space) onto one RAS grid centred on the T1 volume: ``shape`` voxels of ``spacing_mm`` (default
160 x 192 x 160 at 1.2 mm, 192 x 230 x 192 mm). The heads are not skull-stripped nor affinely
aligned across subjects. Intensities: clipped at the 99.5th percentile of the head, scaled to [0, 1].

IXI has no segmentations. Dice needs the user's label maps, one ``<subject>.nii.gz`` per subject
(e.g. FreeSurfer's aseg of the T1, such as the TransMorph benchmark used) in ``labels_dir``, in the
T1's space (resampled by nearest neighbour) and ``label_values`` to score; without them the
dataset stops with an error that says so.

Split: subjects sorted by IXI number, 70 % train, 10 % validation, 20 % test, as the TransMorph
benchmark's IXI split (403/58/115; Chen et al., MedIA 2022). Pairs join consecutive subjects of a
split; the multi-contrast methods take the fixed subject's T1 and the moving subject's T2
(``image_t2`` in subjects.csv).
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
from regbench.io import InputError, load_nifti, save_nifti

BASE_URL = "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/"
ARCHIVES = {"T1": "IXI-T1.tar", "T2": "IXI-T2.tar"}
MEMBER = re.compile(r"^(IXI(\d{3})-[A-Za-z]+-\d{4})-(T1|T2)\.nii\.gz$")


class IXI(DatasetSource):
    name = "ixi"
    ndim = 3
    description = "IXI T1 and T2 on a common 1.2 mm RAS grid; user-supplied labels for Dice"
    citation = "IXI dataset, https://brain-development.org/ixi-dataset/ (Imperial College London)"
    license = "CC BY-SA 3.0"
    options = {
        "base_url": BASE_URL,
        "t1_checksum": "md5:34901a0593b41dd19c1a1f746eac2d58",  # as published with MONAI's examples
        "t2_checksum": "",          # none published: the first valid download records one
        "labels_dir": "",           # folder of <subject>.nii.gz label maps in T1 space (required for Dice)
        "label_values": [],         # the labels to score; empty: every non-zero value of the first map
        "shape": [160, 192, 160],
        "spacing_mm": 1.2,
        "val_fraction": 0.1,
        "test_fraction": 0.2,
    }

    def download(self, raw_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        for contrast, archive in ARCHIVES.items():
            known = options[f"{contrast.lower()}_checksum"] or None
            path = fetch(options["base_url"].rstrip("/") + "/" + archive, Path(raw_dir) / archive, known_hash=known)
            extract_members(path, Path(raw_dir) / "extracted" / contrast,
                            lambda name: MEMBER.match(name.rsplit("/", 1)[-1]) is not None, verified=bool(known))

    def prepare(self, raw_dir, prepared_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        start = time.perf_counter()
        raw, prepared_dir = Path(raw_dir) / "extracted", Path(prepared_dir)
        if not options["labels_dir"]:
            raise InputError("dataset 'ixi': IXI has no segmentations; set datasets.ixi.labels_dir to a folder of "
                             "<subject>.nii.gz label maps in T1 space (e.g. FreeSurfer aseg) to score Dice")
        labels_dir = Path(options["labels_dir"])
        files = {}
        for contrast in ARCHIVES:
            for path in sorted((raw / contrast).glob("**/IXI*.nii.gz")):
                match = MEMBER.match(path.name)
                if match:
                    files.setdefault(match.group(1), {})[contrast] = path
        subjects = sorted((s for s, f in files.items() if len(f) == 2), key=lambda s: int(s[3:6]))
        if len(subjects) < 3:
            raise InputError(f"{raw}: {len(subjects)} subjects have both T1 and T2, at least 3 are needed")
        missing = [s for s in subjects if not (labels_dir / f"{s}.nii.gz").exists()]
        if missing:
            raise InputError(f"{labels_dir}: no label map for {len(missing)} subjects, e.g. {missing[0]}.nii.gz")
        shape, spacing = tuple(int(s) for s in options["shape"]), float(options["spacing_mm"])
        rows, label_values = [], [int(v) for v in options["label_values"]]
        splits = split_subjects(subjects, options["val_fraction"], options["test_fraction"])
        for subject in subjects:  # one subject at a time
            world = grid_world_coordinates(files[subject]["T1"], shape, spacing)
            t1 = normalise(resample(files[subject]["T1"], world, order=1), files[subject]["T1"])
            t2 = normalise(resample(files[subject]["T2"], world, order=1), files[subject]["T2"])
            seg = resample(labels_dir / f"{subject}.nii.gz", world, order=0, kind="labels").astype(np.int16)
            if not label_values:
                label_values = sorted(int(v) for v in np.unique(seg) if v != 0)
            for name, array in (("images", t1), ("images_t2", t2), ("segs", seg)):
                save_nifti(prepared_dir / name / f"{subject}.nii.gz", array, (spacing,) * 3)
            rows.append({"subject": subject, "split": splits[subject], "image": f"images/{subject}.nii.gz",
                         "seg": f"segs/{subject}.nii.gz", "image_t2": f"images_t2/{subject}.nii.gz"})
        table = pd.DataFrame(rows)
        pairs = []
        for split in ("val", "test"):
            members = list(table.loc[table["split"] == split, "subject"])
            pairs += [{"split": split, "fixed": a, "moving": b} for a, b in zip(members, members[1:])]
        if not label_values:
            raise InputError(f"{labels_dir}: the label maps hold no non-zero label")
        for archive in ARCHIVES.values():
            record_checksum(Path(raw_dir) / archive)

        from regbench.runtime import provenance

        info = provenance(options)
        info.update({"source": options["base_url"], "seconds": round(time.perf_counter() - start, 1)})
        write_prepared(prepared_dir, name=self.name, ndim=3, shape=shape, spacing=(spacing,) * 3, subjects=table,
                       labels=pd.DataFrame({"label": label_values, "name": [f"label {v}" for v in label_values]}),
                       pairs=pd.DataFrame(pairs, columns=["split", "fixed", "moving"]), provenance=info)


def split_subjects(subjects: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    n = len(subjects)
    n_test = max(2, round(n * float(test_fraction)))
    n_val = max(1, round(n * float(val_fraction))) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise InputError(f"dataset 'ixi': {n} subjects cannot be split into train, {n_val} val and {n_test} test")
    order = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return dict(zip(subjects, order))


def grid_world_coordinates(reference: Path, shape, spacing: float) -> np.ndarray:
    """World (scanner, mm) coordinates of an RAS grid of ``shape`` centred on ``reference``'s volume."""
    import nibabel as nib

    image = nib.load(str(reference))
    centre = image.affine @ np.append((np.asarray(image.shape[:3]) - 1) / 2, 1)
    axes = [(np.arange(n) - (n - 1) / 2) * spacing for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0)
    return grid + centre[:3].reshape(3, 1, 1, 1)


def resample(path: Path, world: np.ndarray, order: int, kind: str = "image") -> np.ndarray:
    """The volume at ``path`` sampled at ``world`` points through its affine (0 outside)."""
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    array, _ = load_nifti(path, kind=kind, ndim=3)
    inverse = np.linalg.inv(nib.load(str(path)).affine)
    voxels = np.einsum("ij,j...->i...", inverse[:3, :3], world) + inverse[:3, 3].reshape(3, 1, 1, 1)
    return map_coordinates(array.astype(np.float32 if kind == "image" else np.int32), voxels, order=order,
                           mode="constant", cval=0)


def normalise(image: np.ndarray, source: Path) -> np.ndarray:
    head = image[image > 0]
    if head.size == 0:
        raise InputError(f"{source}: the volume is empty on the common grid (is its affine right?)")
    return np.clip(image / float(np.percentile(head, 99.5)), 0, 1).astype(np.float32)


DATASETS = {"ixi": IXI()}
