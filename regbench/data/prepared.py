"""Read a prepared dataset (the layout of :mod:`regbench.dataset`) and serve pairs as tensors."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from regbench.dataset import ARRAY_INDEX, LAYOUT, array_path, check_tables
from regbench.io import InputError, read_json


#: What training and tuning may read: every choice is made on these, never on the test split.
CHOOSING_SPLITS = ("train", "val")


class PreparedDataset:
    """A prepared dataset folder: its tables, and its volumes read from their uncompressed arrays on demand.

    Nothing is cached: a volume is read from the page cache each time it is asked for (its .npy), so memory does
    not grow with the number of subjects. Each read is checked (shape, finite intensities, an unsigned non-empty
    label map), an error naming the file. ``splits`` limits what the object can serve: :meth:`without_test`
    (training, tuning) holds no test pair and refuses to load a test subject, so that no choice can see the test
    split even by mistake.
    """

    def __init__(self, prepared_dir, splits: tuple[str, ...] | None = None):
        self.root = Path(prepared_dir)
        info_path = self.root / "dataset.json"
        if not info_path.exists():
            raise InputError(f"{info_path}: not found; the dataset was not prepared (or its preparation was interrupted)")
        self.info = read_json(info_path)
        self.ndim, self.shape, self.spacing = _check_info(info_path, self.info)
        if self.info.get("layout", 1) != LAYOUT or not (self.root / ARRAY_INDEX).exists():
            raise InputError(f"{info_path}: prepared in layout {self.info.get('layout', 1)}, without the "
                             f"uncompressed arrays of layout {LAYOUT}: prepare the dataset again (`snakemake` does, "
                             f"its prepare step rebuilds the folder)")
        subjects = _read_table(self.root / "subjects.csv", ["subject", "split", "image", "seg"])
        self.labels = _read_table(self.root / "labels.csv", ["label", "name"])
        self.pairs = _read_table(self.root / "pairs.csv", ["split", "fixed", "moving"])
        check_tables(self.root, subjects, self.labels, self.pairs)
        self.splits = tuple(splits) if splits is not None else None
        if self.splits is not None:
            hidden = subjects[~subjects["split"].isin(self.splits)]
            self.hidden = dict(zip(hidden["subject"].astype(str), hidden["split"].astype(str)))
            subjects = subjects[subjects["split"].isin(self.splits)]
            self.pairs = self.pairs[self.pairs["split"].isin(self.splits)].reset_index(drop=True)
        else:
            self.hidden = {}
        self.subjects = subjects.set_index("subject", drop=False)
        self.label_values = self.labels["label"].to_numpy(dtype=np.int64).copy()
        self._split_subjects: dict[str, tuple[str, ...]] = {}

    def without_test(self) -> "PreparedDataset":
        """The same folder, seen with its train and val splits only (:data:`CHOOSING_SPLITS`)."""
        return PreparedDataset(self.root, CHOOSING_SPLITS)

    @property
    def name(self) -> str:
        return self.info["id"]

    @property
    def contrasts(self) -> list[str]:
        """The extra contrasts served besides ``image`` (``"t2"`` for a column ``image_t2``)."""
        return [c[len("image_"):] for c in self.subjects.columns if c.startswith("image_")]

    def moving_contrast(self, method) -> str | None:
        """The contrast ``method`` gets as its moving image here: its ``moving_contrast`` if served, else None."""
        wanted = getattr(method, "moving_contrast", None)
        return wanted if wanted in self.contrasts else None

    def split_subjects(self, split: str) -> list[str]:
        """The subjects of ``split`` in subjects.csv's order (looked up once: a training step asks every time)."""
        if split not in self._split_subjects:
            self._split_subjects[split] = tuple(self.subjects.index[self.subjects["split"] == split])
        return list(self._split_subjects[split])

    def split_pairs(self, split: str) -> pd.DataFrame:
        self._check_split(split)
        return self.pairs[self.pairs["split"] == split].reset_index(drop=True)

    def _check_split(self, split: str) -> None:
        if self.splits is not None and split not in self.splits:
            raise InputError(f"{self.root}: the {split} split is out of reach here (this view holds "
                             f"{', '.join(self.splits)}: training and tuning never read the test split)")

    def _check_subject(self, subject: str) -> None:
        if subject in self.hidden:
            raise InputError(f"{self.root / 'subjects.csv'}: subject {subject} is in the {self.hidden[subject]} "
                             f"split, out of reach of training and tuning (this view holds {', '.join(self.splits)})")

    def image(self, subject: str, contrast: str | None = None) -> np.ndarray:
        """A subject's image (``image``, or ``image_<contrast>``), float32, read from its array."""
        self._check_subject(subject)
        column = "image" if contrast is None else f"image_{contrast}"
        array = self._array(subject, column)
        # one pass: a NaN or an infinity makes the sum non-finite (blank images were refused when it was written)
        if array.dtype != np.float32 or not np.isfinite(array.sum()):
            raise InputError(f"{self.root / array_path(subject, column)}: the image is not finite float32 "
                             "(prepare the dataset again)")
        return array

    def seg(self, subject: str, dtype=np.int64) -> np.ndarray:
        """A subject's label map, as ``dtype`` (int64 for the metrics; a batch keeps the stored unsigned type)."""
        self._check_subject(subject)
        array = self._array(subject, "seg")
        if not np.issubdtype(array.dtype, np.unsignedinteger) or not array.any():
            raise InputError(f"{self.root / array_path(subject, 'seg')}: not a label map (unsigned integers, some "
                             "non-zero); prepare the dataset again")
        return array.astype(dtype, copy=False) if dtype is not None else array

    def _array(self, subject: str, column: str) -> np.ndarray:
        """The array of a subject's volume, read from its uncompressed .npy (from the page cache once it is warm)."""
        path = self.root / array_path(subject, column)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise InputError(f"{path}: cannot read the array ({type(err).__name__}: {err}); prepare the dataset "
                             "again") from None
        self._check_shape(subject, column, array, path)
        return array

    def has_ground_truth(self, fixed: str, moving: str) -> bool:
        """True when both subjects come from one template, so their true displacement is known."""
        if "gt_transform" not in self.subjects.columns or "template" not in self.subjects.columns:
            return False
        rows = self.subjects.loc[[fixed, moving]]
        return rows["gt_transform"].notna().all() and rows["template"].nunique() == 1

    def true_displacement(self, fixed: str, moving: str) -> torch.Tensor:
        """The displacement (``1 x ndim x *spatial``) that warps ``moving`` onto ``fixed``.

        Each subject stores ``to_template`` (psi_s - id: where a subject voxel samples its template) and
        ``from_template`` (psi_s^-1 - id). For fixed a and moving b, u = psi_b^-1 o psi_a - id.
        """
        from regbench.blocks.spatial import compose_displacements

        to_template = self._transform(fixed)["to_template"]
        from_template = self._transform(moving)["from_template"]
        return compose_displacements(outer=torch.from_numpy(from_template)[None],
                                     inner=torch.from_numpy(to_template)[None])

    @functools.lru_cache(maxsize=8)
    def _transform(self, subject: str) -> dict[str, np.ndarray]:
        self._check_subject(subject)
        path = self.root / self.subjects.at[subject, "gt_transform"]
        try:
            with np.load(path) as npz:
                return {key: npz[key].astype(np.float32) for key in ("to_template", "from_template")}
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"{path}: cannot read the ground-truth transform ({err})") from None

    def pair(self, fixed: str, moving: str, contrast: str | None = None,
             compact: bool = False) -> dict[str, torch.Tensor]:
        """One pair as a batch of size 1 (see :mod:`regbench.method` for the keys). ``compact``: label maps in the
        stored type (uint8, else int32) rather than int64, for batches that cross to the device before
        :func:`to_device` makes them int64."""
        seg_type = None if compact else np.int64
        batch = {
            "fixed": torch.from_numpy(self.image(fixed))[None, None],
            "moving": torch.from_numpy(self.image(moving, contrast))[None, None],
            "fixed_seg": torch.from_numpy(_torch_friendly(self.seg(fixed, seg_type)))[None, None],
            "moving_seg": torch.from_numpy(_torch_friendly(self.seg(moving, seg_type)))[None, None],
            "labels": torch.from_numpy(self.label_values),
        }
        return batch

    def _check_shape(self, subject, column, array, path=None):
        if tuple(array.shape) != self.shape:
            raise InputError(f"{path or self.root / self.subjects.at[subject, column]}: shape {array.shape}, "
                             f"but dataset.json says {self.shape}")


def _torch_friendly(labels: np.ndarray) -> np.ndarray:
    """uint8 and int64 pass; wider unsigned label maps become int32 (torch has no arithmetic on uint16/uint32)."""
    return labels if labels.dtype in (np.uint8, np.int64) else labels.astype(np.int32)


def to_device(batch: dict[str, torch.Tensor], device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """A batch on ``device`` in the working types: label maps (``*_seg``, ``labels``) int64, the rest as they are."""
    moved = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=non_blocking)
        moved[key] = value.long() if (key.endswith("_seg") or key == "labels") and value.dtype != torch.int64 else value
    return moved


def training_batch(dataset: PreparedDataset, iteration: int, batch_size: int, seed: int,
                   contrast: str | None = None, compact: bool = False) -> dict[str, torch.Tensor]:
    """The batch of a training iteration: random ordered pairs of distinct training subjects.

    ``contrast``: the moving images' contrast (an ``image_<contrast>`` column; None: ``image``).
    The pairs depend only on (seed, iteration), not on what came before, so a resumed training run
    sees exactly the pairs an uninterrupted one sees.
    """
    subjects = dataset.split_subjects("train")
    if len(subjects) < 2:
        raise InputError(f"{dataset.root / 'subjects.csv'}: fewer than two training subjects")
    rng = np.random.default_rng([seed, iteration])
    pairs = [rng.choice(len(subjects), size=2, replace=False) for _ in range(batch_size)]
    return stack_pairs([dataset.pair(subjects[f], subjects[m], contrast, compact) for f, m in pairs])


def stack_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from pairs of batch size 1 (:meth:`PreparedDataset.pair`): tensors concatenated, ``labels`` once."""
    if len(items) == 1:   # a pair is already a batch of one: no copy of its volumes
        return dict(items[0])
    batch = {key: torch.cat([item[key] for item in items]) for key in items[0] if key != "labels"}
    batch["labels"] = items[0]["labels"]
    return batch


def _check_info(path: Path, info) -> tuple[int, tuple[int, ...], tuple[float, ...]]:
    """(ndim, shape, spacing) of dataset.json, after checking them."""
    if not isinstance(info, dict):
        raise InputError(f"{path}: expected a JSON object with id, ndim, shape and spacing")
    missing = [key for key in ("id", "ndim", "shape", "spacing") if key not in info]
    if missing:
        raise InputError(f"{path}: missing keys {missing}")
    ndim, shape, spacing = info["ndim"], info["shape"], info["spacing"]
    if ndim not in (2, 3) or not isinstance(shape, list) or not isinstance(spacing, list) \
            or len(shape) != ndim or len(spacing) != ndim:
        raise InputError(f"{path}: ndim {ndim!r} with shape {shape!r} and spacing {spacing!r}; expected ndim 2 or 3 "
                         "and that many sizes and spacings")
    if not all(isinstance(n, int) and n > 0 for n in shape) \
            or not all(isinstance(s, (int, float)) and np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{path}: shape {shape} and spacing {spacing} must be positive numbers")
    return int(ndim), tuple(int(n) for n in shape), tuple(float(s) for s in spacing)


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable CSV table ({err})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    return table
