"""A second MR contrast of the same anatomy, made from a label map (the label-wise remap of SynthMorph).

SynthMorph (Hoffmann et al., IEEE TMI 41(3), 2022) synthesises images from label maps by giving every label
one intensity, then blurring and adding noise. :func:`label_contrast` does the same with a fixed table instead
of random draws, so that one label map always gives the same image: :data:`T2_LIKE` gives the FreeSurfer
``aseg`` structures T2-weighted intensities (CSF and ventricles bright, cortex and deep grey matter in the
middle, white matter dark, the iron-rich pallidum darker still), roughly the reverse of a T1's order, so a
T1 and its T2-like twin need a multi-modal similarity (mutual information) to be registered.

The recipe, in order, for a label map ``seg`` (``B x 1 x *spatial``, integers):

1. every voxel takes its label's intensity: ``intensities[label]`` if given there, else a value drawn
   uniformly in [0.2, 1) by ``numpy.random.default_rng([seed, label])`` (so a label's draw depends on
   nothing else: not on the other labels present, not on the batch); label 0 is background (0), except
   where the optional ``tissue`` mask says there is tissue without a label: those voxels take
   ``tissue_intensity`` (0.7 by default, CSF-like). Skull-stripped data have tissue that no aseg label covers
   (meninges, extra-cerebral CSF: a third of the embedded 2D brain mask, 1-18 voxels outside the labels);
   ``tissue = image > 0`` keeps the second contrast's brain mask equal to the first's;
2. a Gaussian blur of standard deviation ``blur_sigma`` voxels (separable, zero padding), standing in for
   the partial-volume mixing that a real image has at tissue borders;
3. Gaussian noise of standard deviation ``noise_std`` on the tissue (labelled voxels, and ``tissue``; the
   background stays 0, as in skull-stripped data), from a ``torch.Generator`` seeded with ``seed``;
4. clipped to [0, 1].

The result is ``B x 1 x *spatial`` float32 (or ``dtype``) on the label map's device; the same inputs give
the same bits on a CPU. 2D and 3D (and 1D) through the same code.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["T2_LIKE", "label_contrast"]

#: T2-weighted-like intensity in [0, 1] per FreeSurfer aseg label (FreeSurferColorLUT numbers)
T2_LIKE: dict[int, float] = {
    # cerebral and cerebellar white matter, corpus callosum: dark
    2: 0.30, 41: 0.30, 7: 0.32, 46: 0.32, 251: 0.28, 252: 0.28, 253: 0.28, 254: 0.28, 255: 0.28,
    # cortex (cerebral, cerebellar): intermediate
    3: 0.58, 42: 0.58, 8: 0.55, 47: 0.55,
    # CSF spaces: bright
    4: 0.95, 43: 0.95, 5: 0.90, 44: 0.90, 14: 0.95, 15: 0.95, 24: 1.00, 72: 0.95,
    # deep grey matter
    10: 0.45, 49: 0.45,           # thalamus
    11: 0.55, 50: 0.55,           # caudate
    12: 0.50, 51: 0.50,           # putamen
    13: 0.36, 52: 0.36,           # pallidum (iron: dark on T2)
    17: 0.62, 53: 0.62,           # hippocampus
    18: 0.60, 54: 0.60,           # amygdala
    26: 0.55, 58: 0.55,           # accumbens
    28: 0.40, 60: 0.40,           # ventral diencephalon
    16: 0.42,                     # brain stem
    # the rest of aseg: vessels (flow voids), choroid plexus, hypointensities (bright on T2), chiasm
    30: 0.20, 62: 0.20, 31: 0.70, 63: 0.70,
    77: 0.72, 78: 0.72, 79: 0.72, 80: 0.65, 81: 0.65, 82: 0.65, 85: 0.40,
}

_UNKNOWN_RANGE = (0.2, 1.0)


def _label_intensity(label: int, intensities: dict[int, float], seed: int) -> float:
    if label == 0:
        return 0.0
    if label in intensities:
        return float(intensities[label])
    low, high = _UNKNOWN_RANGE
    return float(np.random.default_rng([int(seed), int(label)]).uniform(low, high))


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``B x 1 x *spatial`` (zero padding), kernel radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-x * x / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    ndim = image.ndim - 2
    convolve = getattr(F, f"conv{ndim}d")
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = kernel.numel()
        padding = [0] * ndim
        padding[axis] = radius
        image = convolve(image, kernel.reshape(shape), padding=padding)
    return image


def label_contrast(seg: torch.Tensor, intensities: dict[int, float] | None = None, seed: int = 0,
                   blur_sigma: float = 0.5, noise_std: float = 0.0, tissue: torch.Tensor | None = None,
                   tissue_intensity: float = 0.7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The image of the label map ``seg`` (``B x 1 x *spatial``, integers) in another contrast, in [0, 1].

    ``intensities`` maps labels to intensities (default :data:`T2_LIKE`); ``tissue`` (boolean, the shape of
    ``seg``) marks unlabelled voxels that hold tissue, given ``tissue_intensity``. See the module docstring
    for the steps (lookup, blur of ``blur_sigma`` voxels, noise of ``noise_std`` on the tissue, clip) and how
    ``seed`` makes labels missing from the table and the noise deterministic.
    """
    if seg.ndim < 3 or seg.shape[1] != 1:
        raise ValueError(f"label_contrast: seg must be B x 1 x *spatial, got shape {tuple(seg.shape)}")
    if seg.is_floating_point() or seg.is_complex():
        raise ValueError(f"label_contrast: seg must hold integer labels, got dtype {seg.dtype}")
    if blur_sigma < 0 or noise_std < 0:
        raise ValueError(f"label_contrast: blur_sigma and noise_std must be >= 0, got {blur_sigma} and {noise_std}")
    table = T2_LIKE if intensities is None else intensities
    labels = torch.unique(seg)  # sorted
    lookup = torch.tensor([_label_intensity(int(label), table, seed) for label in labels.tolist()],
                          dtype=dtype, device=seg.device)
    image = lookup[torch.searchsorted(labels, seg.contiguous())]
    inside = seg != 0
    if tissue is not None:
        if tissue.shape != seg.shape:
            raise ValueError(f"label_contrast: tissue {tuple(tissue.shape)} and seg {tuple(seg.shape)} differ in shape")
        unlabelled = tissue.bool() & ~inside
        image = torch.where(unlabelled, torch.as_tensor(float(tissue_intensity), dtype=dtype, device=seg.device), image)
        inside = inside | unlabelled
    if blur_sigma > 0:
        image = _gaussian_blur(image, blur_sigma)
    if noise_std > 0:
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(image.shape, generator=generator, dtype=dtype).to(seg.device)
        image = image + noise_std * noise * inside.to(dtype)
    return image.clamp(0.0, 1.0)
