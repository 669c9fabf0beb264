"""What a dataset plugin is, and the prepared layout every dataset writes.

A file ``datasets/<file>.py`` defines ``DATASETS``, a dict from dataset id to an instance of a
:class:`DatasetSource` subclass (one file may offer variants, such as 2D and 3D). The workflow
calls ``download(raw_dir, options)`` then ``prepare(raw_dir, prepared_dir, options)``.

Prepared layout (``data/<id>/prepared/``), every path relative to that folder:

- ``subjects.csv``: subject, split (train/val/test), image, seg, then optional columns:
  ``image_<contrast>`` for extra contrasts, ``gt_transform`` (an ``.npz`` holding ``to_template``
  and ``from_template`` displacements, voxels, ``ndim x *spatial``) and ``template``;
- ``labels.csv``: label, name (the evaluation labels; background 0 is never one);
- ``pairs.csv``: split, fixed, moving;
- ``dataset.json``: id, ndim, shape, spacing (mm), and provenance.

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
    write_csv(prepared_dir / "subjects.csv", subjects)
    write_csv(prepared_dir / "labels.csv", labels[["label", "name"]])
    write_csv(prepared_dir / "pairs.csv", pairs[["split", "fixed", "moving"]])
    write_json(prepared_dir / "dataset.json", {
        "id": name, "ndim": int(ndim), "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing], "provenance": provenance or {},
    })
