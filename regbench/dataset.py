"""What a dataset plugin is, and the prepared layout every dataset writes.

A file ``datasets/<file>.py`` defines ``DATASETS``, a dict from dataset id to an instance of a
:class:`DatasetSource` subclass (one file may offer variants, such as 2D and 3D). The workflow
calls ``download(raw_dir, options)`` then ``prepare(raw_dir, prepared_dir, options)``.

Prepared layout (``data/<id>/prepared/``), every path relative to that folder:

- ``subjects.csv``: subject, split (train/val/test), image, seg, then optional columns:
  ``image_<contrast>`` for extra contrasts, ``gt_transform`` (an ``.npz`` holding ``to_template``
  and ``from_template`` displacements, voxels, ``ndim x *spatial``) and ``template``;
- ``labels.csv``: label, name (the evaluation labels; background 0 is never one);
- ``pairs.csv``: split, fixed, moving, and ``intensity_label_mi`` (bits, each pair's MI(intensity; labels), which the
  prepare step adds: :mod:`regbench.evaluation.information`);
- ``arrays/<subject>.<column>.npy``: every volume of subjects.csv again (``image``, ``image_<contrast>``, ``seg``),
  uncompressed so that a batch reads it (np.load) instead of decompressing a NIfTI: images float32, label maps the
  smallest unsigned integer type that holds their values (the NIfTI files stay, for people and other tools);
- ``dataset.json``: id, ndim, shape, spacing (mm), ``layout`` (:data:`LAYOUT`), and provenance.

``write_prepared`` checks these tables and writes them last, ``dataset.json`` at the very end, so
a prepared folder with a ``dataset.json`` is complete.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd

from regbench.io import InputError, write_csv, write_json
from regbench.method import same_kind  # the rule that recipe overrides follow: an int may replace a float

SPLITS = ("train", "val", "test")
#: The prepared layout's version: 2 added the uncompressed arrays. A folder of another version is prepared again.
LAYOUT = 2
#: subjects.csv columns that name volumes (besides image_<contrast>)
VOLUME_COLUMNS = ("image", "seg")


def volume_columns(subjects: pd.DataFrame) -> list[str]:
    """The columns of a subjects table that name volumes: image, image_<contrast>..., seg."""
    return [c for c in subjects.columns if c in VOLUME_COLUMNS or c.startswith("image_")]


#: the arrays' index (subject, column, file, dtype), written after them: a folder with it has every array
ARRAY_INDEX = "arrays/index.csv"


def array_path(subject: str, column: str) -> str:
    """Where a subject's volume of one column lies as a .npy array, relative to the prepared folder."""
    return f"arrays/{subject}.{column}.npy"


class DatasetSource:
    """Base class of dataset plugins."""

    name: str = ""
    ndim: int = 3
    description: str = ""
    citation: str = ""
    license: str = ""
    #: default options; the config may override any of them (unknown keys are an error)
    options: dict[str, Any] = {}

    def resolve_options(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        resolved = copy.deepcopy(self.options)
        for key, value in (overrides or {}).items():
            if key not in resolved:
                raise ValueError(f"dataset {self.name!r}: unknown option {key!r}; known: {sorted(resolved)}")
            if resolved[key] is not None and not same_kind(value, resolved[key]):
                raise ValueError(f"dataset {self.name!r}: option {key!r} must be {type(resolved[key]).__name__} "
                                 f"(like its default {resolved[key]!r}), got {type(value).__name__} {value!r}")
            resolved[key] = value
        return resolved

    def download(self, raw_dir: Path, options: dict[str, Any]) -> None:
        """Fetch the raw files into ``raw_dir`` (nothing to do for embedded data)."""

    def expected_grid(self, options: dict[str, Any]) -> dict[str, Any] | None:
        """What the prepared folder will hold, where it is known before any download: ``ndim``, ``shape``,
        ``spacing`` (mm), the number of ``labels`` and of ``test_pairs`` (``regbench plan``); None otherwise."""
        return None

    def prepare(self, raw_dir: Path, prepared_dir: Path, options: dict[str, Any]) -> None:
        raise NotImplementedError(f"dataset {self.name!r} must implement prepare()")


def check_tables(root: Path, subjects: pd.DataFrame, labels: pd.DataFrame, pairs: pd.DataFrame) -> None:
    """The three tables of a prepared folder agree: unique subjects, known splits, images and label maps
    named, positive integer labels, pairs of known subjects (:class:`InputError` naming the table).

    :func:`write_prepared` checks what a dataset writes, :class:`regbench.data.prepared.PreparedDataset` what it reads.
    """
    duplicated = sorted(set(subjects["subject"][subjects["subject"].duplicated()].astype(str)))
    if duplicated:
        raise InputError(f"{root / 'subjects.csv'}: duplicate subjects {duplicated[:5]}")
    for name, table in (("subjects.csv", subjects), ("pairs.csv", pairs)):
        unknown = sorted(set(table["split"].astype(str)) - set(SPLITS))
        if unknown:
            raise InputError(f"{root / name}: unknown splits {unknown}; use {list(SPLITS)}")
    for column in ("image", "seg"):
        if subjects[column].isna().any():
            raise InputError(f"{root / 'subjects.csv'}: subjects without {column!r}: "
                             f"{subjects['subject'][subjects[column].isna()].tolist()[:5]}")
    values = pd.to_numeric(labels["label"], errors="coerce")
    bad = labels["label"][values.isna() | (values != values.round()) | (values <= 0)].tolist()
    if bad:
        raise InputError(f"{root / 'labels.csv'}: label values {bad[:5]} are not positive integers "
                         "(0 is the background, never an evaluation label)")
    if values.duplicated().any():
        raise InputError(f"{root / 'labels.csv'}: label values listed twice: {sorted(set(values[values.duplicated()]))}")
    known = set(subjects["subject"].astype(str))
    unknown = sorted((set(pairs["fixed"].astype(str)) | set(pairs["moving"].astype(str))) - known)
    if unknown:
        raise InputError(f"{root / 'pairs.csv'}: subjects {unknown[:5]} are not in subjects.csv")


def write_prepared(prepared_dir, *, name: str, ndim: int, shape, spacing, subjects: pd.DataFrame,
                   labels: pd.DataFrame, pairs: pd.DataFrame, provenance: dict[str, Any] | None = None) -> None:
    """Check the three tables against each other and write them, then ``dataset.json``."""
    prepared_dir = Path(prepared_dir)
    for column in ("subject", "split", "image", "seg"):
        if column not in subjects.columns:
            raise ValueError(f"{prepared_dir / 'subjects.csv'}: the subjects table lacks column {column!r}")
    check_tables(prepared_dir, subjects, labels, pairs)
    for column in subjects.columns:
        if column in ("image", "seg", "gt_transform") or column.startswith("image_"):
            for rel in subjects[column].dropna():
                if not (prepared_dir / rel).exists():
                    raise ValueError(f"{prepared_dir / rel}: listed in subjects.csv but not written")
    write_arrays(prepared_dir, subjects, int(ndim))
    write_csv(prepared_dir / "subjects.csv", subjects)
    write_csv(prepared_dir / "labels.csv", labels[["label", "name"]])
    write_csv(prepared_dir / "pairs.csv", pairs[["split", "fixed", "moving"]])
    write_json(prepared_dir / "dataset.json", {
        "id": name, "ndim": int(ndim), "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing], "layout": LAYOUT, "provenance": provenance or {},
    })


def write_arrays(prepared_dir: Path, subjects: pd.DataFrame, ndim: int) -> None:
    """Every volume of the subjects table as an uncompressed .npy (:func:`array_path`), one at a time: images
    float32, label maps in the smallest unsigned type that holds them (uint8 for FreeSurfer's aseg)."""
    import numpy as np

    from regbench.io import atomic_path, check_same_grid, load_nifti

    index = []
    for _, row in subjects.iterrows():
        for column in volume_columns(subjects):
            if pd.isna(row[column]):
                continue
            kind = "labels" if column == "seg" else "image"
            array, _ = load_nifti(prepared_dir / row[column], kind=kind, ndim=ndim)
            if kind == "image":
                check_same_grid(prepared_dir / row["seg"], prepared_dir / row[column])
            if kind == "labels":
                array = array.astype(np.min_scalar_type(int(array.max())))
            path = prepared_dir / array_path(str(row["subject"]), column)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as stream:
                np.save(stream, np.ascontiguousarray(array))
            index.append({"subject": row["subject"], "column": column, "file": array_path(str(row["subject"]), column),
                          "dtype": str(array.dtype)})
    write_csv(prepared_dir / ARRAY_INDEX, pd.DataFrame(index, columns=["subject", "column", "file", "dtype"]))
