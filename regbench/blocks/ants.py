"""ANTs through antspyx: one explicit ``antsRegistration`` call, and its transforms in regbench's convention.

Three parts, shared by the classical baselines (``methods/syn.py``, ``methods/affine.py``) and the SyN
supervision of later methods (:mod:`regbench.training.supervision`):

- :class:`Stage` and :func:`registration`: antsRegistration's command line written out stage by stage
  (transform, metric, iterations, shrink factors, smoothing), so every parameter a recipe sets is visible
  and no antspyx default can change under it. antspyx's simplified ``ants.registration(type_of_transform=
  ...)`` hides some of them (the affine stage of ``"SyN"`` has fixed iterations and shrink factors, and its
  histogram-matching default changed in antspyx 0.6), so the full interface is called with this list.
- :func:`to_ants`: a numpy array (array-axis order) with spacing, origin and direction -> an ANTsImage.
  antspyx keeps array axis k as ITK index axis k, so physical point = origin + direction @ (spacing * index).
- :func:`displacement_from_transforms`: ANTs' forward transforms (``fwdtransforms``: the SyN warp field
  and the affine ``.mat``, in ANTs' list order) -> regbench's displacement ``u`` (``ndim x *shape``, voxels,
  on the fixed grid, channel k along array axis k, ``warped(x) = moving(x + u(x))``). For every fixed
  voxel x: p = physical point of x; p goes through the transforms in list order (antsApplyTransforms
  applies the last one first to an image, so the first one first to a point: the warp, then the affine);
  the result is taken to the moving image's continuous voxel index, and x is subtracted. This holds for
  any spacing, origin and direction of either image; fixed and moving may differ in all three.

Transform details (ITK): a linear ``.mat`` is a MatrixOffsetTransformBase, ``T(p) = A (p - c) + c + t`` with
the parameters ``A`` (row-major) then ``t`` and the fixed parameters ``c``. A warp field stores physical
displacement vectors (ITK's LPS components) on its own grid; between its voxels it is interpolated
linearly and beyond its border continued by the nearest voxel (ITK's
VectorLinearInterpolateNearestNeighborExtrapolateImageFunction, which DisplacementFieldTransform uses).
SyN's forward warp lives on the fixed grid, so at fixed voxels it is read, not interpolated.

Determinism: ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when a process first runs a filter,
so the thread count is fixed per process (:func:`load_ants`); with one thread and a fixed nonzero random
seed (``--random-seed`` and ``ANTS_RANDOM_SEED``) a rerun gives bit-identical transforms. With two
threads the randomly perturbed "Regular" sampling of the linear stages is not reproducible (measured with
antspyx 0.5.3: up to 0.8 voxel between two runs of the same SyN pair).
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from regbench.method import Deviation

__all__ = [
    "Stage",
    "load_ants",
    "ants_version",
    "to_ants",
    "grid_of",
    "registration",
    "transform_points",
    "displacement_from_transforms",
    "register_arrays",
    "register_tensors",
    "registration_options",
    "linear_stage",
    "syn_stage",
]

THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
SEED_ENV = "ANTS_RANDOM_SEED"

#: antsRegistration's metrics (case as ANTs spells them); "MI" is the joint-histogram mutual information,
#: "Mattes" Mattes' mutual information, "GC" global correlation, "CC" local (neighbourhood) correlation.
METRICS = {"cc": "CC", "mi": "MI", "mattes": "Mattes", "meansquares": "MeanSquares", "demons": "Demons", "gc": "GC"}
SAMPLING = {"none": "None", "regular": "Regular", "random": "Random"}
LINEAR_TRANSFORMS = {"translation": "Translation", "rigid": "Rigid", "similarity": "Similarity", "affine": "Affine"}
DEFORMABLE_TRANSFORMS = {"syn": "SyN"}
INITIAL_TRANSFORMS = {"identity": None, "center_of_mass": 1, "geometric_center": 0, "origin": 2}

#: ITK threads when the first caller names none: one, the only count that reproduces sampled metrics
DEFAULT_THREADS = 1

#: What every ANTs-based method shares: the images are registered as arrays.
VOXEL_SPACE = Deviation(
    "Registered in voxel space (unit spacing, identity direction)",
    "The plugin contract hands register() arrays, not their spacing; every parameter here is in voxels, so on an "
    "isotropic grid this is ANTs' physical-space run, and on an anisotropic one (LPBA40) the smoothing and the CC "
    "window are isotropic in voxels rather than in mm.")

_threads_in_use: int | None = None


# --------------------------------------------------------------------------------------------- import


def load_ants(threads: int | None = None):
    """Import antspyx with ITK's thread count fixed; returns the ``ants`` module.

    ITK takes its default thread count from the environment once per process, when it first needs it,
    so the count is fixed before antspyx is first used (every caller here goes through this): ``threads``, or
    :data:`DEFAULT_THREADS` when the first caller names none. Every later call gets that count; asking
    another one is an error (run it in another process), not a silent change of the numbers.
    """
    global _threads_in_use
    if threads is not None:
        threads = int(threads)
        if threads < 1:
            raise ValueError(f"ANTs threads must be >= 1, got {threads}")
    if _threads_in_use is None:
        _threads_in_use = threads or DEFAULT_THREADS
        os.environ[THREADS_ENV] = str(_threads_in_use)
    elif threads is not None and threads != _threads_in_use:
        raise RuntimeError(
            f"ITK's thread count is fixed once per process: this process already runs ANTs with "
            f"{_threads_in_use} thread(s), a recipe now asks for {threads}; run it in its own process")
    try:
        import ants
    except ImportError as err:
        raise ImportError("the classical baselines need antspyx (pip install antspyx, the version "
                          "pyproject.toml pins)") from err
    return ants


def ants_threads() -> int | None:
    """ITK's thread count in this process (None before :func:`load_ants` fixed it)."""
    return _threads_in_use


def ants_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("antspyx")
    except metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Grid:
    """Where an image's voxels are: ``physical = origin + direction @ (spacing * index)`` (float64)."""

    shape: tuple[int, ...]
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def index_to_physical(self) -> np.ndarray:
        return self.direction @ np.diag(self.spacing)

    def to_physical(self, index: np.ndarray) -> np.ndarray:
        """``N x ndim`` continuous indices -> ``N x ndim`` physical points."""
        return index @ self.index_to_physical.T + self.origin

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """``N x ndim`` physical points -> ``N x ndim`` continuous indices."""
        return np.linalg.solve(self.index_to_physical, (points - self.origin).T).T

    def voxels(self) -> np.ndarray:
        """Every voxel's index, ``N x ndim``, in C order (the last array axis fastest)."""
        axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape], indexing="ij")
        return np.stack([a.ravel() for a in axes], axis=1)

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        return (self.shape == other.shape and np.allclose(self.origin, other.origin, atol=tol)
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol))


def make_grid(shape, spacing=None, origin=None, direction=None) -> Grid:
    ndim = len(shape)
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    origin = np.zeros(ndim) if origin is None else np.asarray(origin, dtype=np.float64).reshape(-1)
    direction = np.eye(ndim) if direction is None else np.asarray(direction, dtype=np.float64)
    if spacing.shape != (ndim,) or origin.shape != (ndim,) or direction.shape != (ndim, ndim):
        raise ValueError(f"an image of {ndim} axes needs {ndim} spacings, {ndim} origin coordinates and a "
                         f"{ndim} x {ndim} direction; got {spacing.shape}, {origin.shape}, {direction.shape}")
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive, got {spacing.tolist()}")
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-4:
        raise ValueError(f"direction must be orthonormal, got {direction.tolist()}")
    return Grid(tuple(int(s) for s in shape), origin, spacing, direction)


def grid_of(image) -> Grid:
    """The grid of an ANTsImage."""
    return make_grid(image.shape, image.spacing, image.origin, np.asarray(image.direction))


def to_ants(array: np.ndarray, spacing=None, origin=None, direction=None):
    """A 2D or 3D numpy array (array-axis order) -> a float32 ANTsImage with that geometry."""
    ants = load_ants()
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"ANTs registers 2D and 3D images; got an array of shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("the image contains NaN or infinite values")
    grid = make_grid(array.shape, spacing, origin, direction)
    return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), origin=tuple(grid.origin.tolist()),
                           spacing=tuple(grid.spacing.tolist()), direction=grid.direction.copy())


# --------------------------------------------------------------------------------------------- stages


def _join(values, kind=str) -> str:
    return "x".join(_number(kind(v)) for v in values)


def _number(value) -> str:
    """ANTs parses numbers from text; floats print without trailing noise (0.2, not 0.20000000000000001)."""
    if isinstance(value, float):
        return repr(float(value)) if value != int(value) else str(int(value))
    return str(value)


@dataclass(frozen=True)
class Stage:
    """One antsRegistration stage: ``--transform``, ``--metric``, ``--convergence``, ``--shrink-factors``,
    ``--smoothing-sigmas``, in the command line's own terms.

    ``transform``: "Translation", "Rigid", "Similarity", "Affine" (parameters: gradient step) or "SyN"
    (gradient step, update-field variance, total-field variance; variances in voxels^2).
    ``metric``: "CC" (``metric_parameter`` = radius in voxels), "MI" / "Mattes" (number of bins),
    "MeanSquares", "Demons", "GC" (parameter unused by ANTs, passed as given). ``sampling``: "None"
    (every voxel), "Regular" (a perturbed grid; the perturbation is random), "Random", with
    ``sampling_rate`` the fraction of voxels. One entry of ``iterations``, ``shrink_factors`` and
    ``smoothing_sigmas`` per resolution level, coarsest first; convergence stops a level early when the
    slope of the metric over the last ``convergence_window`` iterations falls below ``convergence_threshold``.
    """

    transform: str
    transform_parameters: tuple[float, ...]
    metric: str
    metric_parameter: float
    iterations: tuple[int, ...]
    shrink_factors: tuple[int, ...]
    smoothing_sigmas: tuple[float, ...]
    convergence_threshold: float = 1e-6
    convergence_window: int = 10
    sampling: str = "None"
    sampling_rate: float = 1.0
    smoothing_units: str = "vox"
    metric_weight: float = 1.0

    def __post_init__(self):
        table = {**LINEAR_TRANSFORMS, **DEFORMABLE_TRANSFORMS}
        if self.transform.lower() not in table:
            raise ValueError(f"ANTs transform must be one of {sorted(table.values())}, got {self.transform!r}")
        object.__setattr__(self, "transform", table[self.transform.lower()])
        if self.metric.lower() not in METRICS:
            raise ValueError(f"ANTs metric must be one of {sorted(METRICS.values())}, got {self.metric!r}")
        object.__setattr__(self, "metric", METRICS[self.metric.lower()])
        if self.sampling.lower() not in SAMPLING:
            raise ValueError(f"ANTs metric sampling must be one of {sorted(SAMPLING.values())}, got {self.sampling!r}")
        object.__setattr__(self, "sampling", SAMPLING[self.sampling.lower()])
        for name in ("iterations", "shrink_factors", "smoothing_sigmas", "transform_parameters"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = {len(self.iterations), len(self.shrink_factors), len(self.smoothing_sigmas)}
        if len(levels) != 1 or not self.iterations:
            raise ValueError(f"ANTs {self.transform} stage: iterations {list(self.iterations)}, shrink factors "
                             f"{list(self.shrink_factors)} and smoothing sigmas {list(self.smoothing_sigmas)} "
                             "need one entry per level each (and at least one level)")
        if any(int(f) < 1 for f in self.shrink_factors) or any(int(i) < 0 for i in self.iterations):
            raise ValueError(f"ANTs {self.transform} stage: shrink factors must be >= 1 and iterations >= 0")
        expected = 3 if self.transform == "SyN" else 1
        if len(self.transform_parameters) != expected:
            raise ValueError(f"ANTs {self.transform} takes {expected} parameter(s), got {list(self.transform_parameters)}")
        if self.smoothing_units not in ("vox", "mm"):
            raise ValueError(f"smoothing units must be 'vox' or 'mm', got {self.smoothing_units!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {self.sampling_rate}")

    def args(self, fixed: str, moving: str) -> list[str]:
        """The stage's part of the command line, images given as antspyx pointer strings."""
        metric = f"{self.metric}[{fixed},{moving},{_number(float(self.metric_weight))},{_number(self.metric_parameter)}"
        if self.sampling != "None":
            metric += f",{self.sampling},{_number(float(self.sampling_rate))}"
        metric += "]"
        return [
            "--transform", f"{self.transform}[{','.join(_number(float(p)) for p in self.transform_parameters)}]",
            "--metric", metric,
            "--convergence", f"[{_join(self.iterations, int)},{self.convergence_threshold:g},{int(self.convergence_window)}]",
            "--shrink-factors", _join(self.shrink_factors, int),
            "--smoothing-sigmas", _join(self.smoothing_sigmas, float) + self.smoothing_units,
        ]


def linear_stage(recipe: dict[str, Any], prefix: str = "linear_") -> Stage:
    """A linear stage from a recipe's ``<prefix>transform``, ``<prefix>gradient_step``, ``<prefix>metric``, ..."""
    return Stage(
        transform=recipe[f"{prefix}transform"],
        transform_parameters=(recipe[f"{prefix}gradient_step"],),
        metric=recipe[f"{prefix}metric"],
        metric_parameter=recipe[f"{prefix}metric_parameter"],
        sampling=recipe[f"{prefix}sampling"],
        sampling_rate=recipe[f"{prefix}sampling_rate"],
        iterations=recipe[f"{prefix}iterations"],
        convergence_threshold=recipe[f"{prefix}convergence_threshold"],
        convergence_window=recipe[f"{prefix}convergence_window"],
        shrink_factors=recipe[f"{prefix}shrink_factors"],
        smoothing_sigmas=recipe[f"{prefix}smoothing_sigmas"],
        smoothing_units=recipe["smoothing_units"],
    )


def syn_stage(recipe: dict[str, Any], prefix: str = "syn_") -> Stage:
    """The SyN stage from a recipe's ``<prefix>gradient_step``, ``<prefix>update_variance``, ..."""
    return Stage(
        transform="SyN",
        transform_parameters=(recipe[f"{prefix}gradient_step"], recipe[f"{prefix}update_variance"],
                              recipe[f"{prefix}total_variance"]),
        metric=recipe[f"{prefix}metric"],
        metric_parameter=recipe[f"{prefix}metric_parameter"],
        iterations=recipe[f"{prefix}iterations"],
        convergence_threshold=recipe[f"{prefix}convergence_threshold"],
        convergence_window=recipe[f"{prefix}convergence_window"],
        shrink_factors=recipe[f"{prefix}shrink_factors"],
        smoothing_sigmas=recipe[f"{prefix}smoothing_sigmas"],
        smoothing_units=recipe["smoothing_units"],
    )


# --------------------------------------------------------------------------------------------- registration


def registration(fixed, moving, stages: Sequence[Stage], outprefix: str, *, initial_transform: str = "identity",
                 histogram_matching: bool = False, winsorize: Sequence[float] = (0.0, 1.0),
                 random_seed: int = 1, threads: int = 1) -> list[str]:
    """Run antsRegistration on two ANTsImages; returns the forward transforms (ANTs' list order).

    ``initial_transform``: "identity", "center_of_mass", "geometric_center" or "origin" (antsRegistration's
    ``--initial-moving-transform [fixed,moving,k]``). ``winsorize``: lower and upper quantiles of
    ``--winsorize-image-intensities`` ((0, 1): not passed). Transforms are collapsed (``-z 1``: one linear
    ``.mat`` and at most one warp) and written as ``outprefix`` + "0GenericAffine.mat", "1Warp.nii.gz", ...
    Computation in single precision (``--float 1``, antspyx's default).
    """
    ants = load_ants(threads)
    from ants.internal import get_pointer_string

    if not stages:
        raise ValueError("antsRegistration needs at least one stage")
    if random_seed is None or int(random_seed) <= 0:
        raise ValueError(f"random_seed must be a positive integer (ANTs takes 0 as 'not set'), got {random_seed!r}")
    if initial_transform not in INITIAL_TRANSFORMS:
        raise ValueError(f"initial_transform must be one of {sorted(INITIAL_TRANSFORMS)}, got {initial_transform!r}")
    lower, upper = (float(q) for q in winsorize)
    if not 0.0 <= lower < upper <= 1.0:
        raise ValueError(f"winsorize quantiles must satisfy 0 <= lower < upper <= 1, got {list(winsorize)}")
    if fixed.dimension != moving.dimension:
        raise ValueError(f"fixed image is {fixed.dimension}D, moving image {moving.dimension}D")
    fixed, moving = fixed.clone("float"), moving.clone("float")
    f, m = get_pointer_string(fixed), get_pointer_string(moving)
    args = ["--dimensionality", str(fixed.dimension), "--float", "1", "--collapse-output-transforms", "1",
            "--output", f"[{outprefix}]", "--use-histogram-matching", str(int(bool(histogram_matching))),
            "--random-seed", str(int(random_seed)), "--write-composite-transform", "0", "--verbose", "0"]
    if (lower, upper) != (0.0, 1.0):
        args += ["--winsorize-image-intensities", f"[{lower:g},{upper:g}]"]
    init = INITIAL_TRANSFORMS[initial_transform]
    if init is not None:
        args += ["--initial-moving-transform", f"[{f},{m},{init}]"]
    for stage in stages:
        args += stage.args(f, m)
    os.environ[SEED_ENV] = str(int(random_seed))
    status = ants.registration(args, None)  # antspyx's full interface: the command line as a list
    if status not in (0, None):
        raise RuntimeError(f"antsRegistration failed with exit code {status}")
    return forward_transforms(outprefix)


def forward_transforms(outprefix: str) -> list[str]:
    """The forward transforms antsRegistration wrote under ``outprefix``, in ANTs' list order (last stage first)."""
    found = []
    for path in glob.glob(glob.escape(outprefix) + "[0-9]*"):
        match = re.fullmatch(r"(\d+)(GenericAffine\.mat|Warp\.nii\.gz)", path[len(outprefix):])
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise RuntimeError(f"antsRegistration wrote no transform under {outprefix}")
    return [path for _, path in sorted(found, reverse=True)]


# --------------------------------------------------------------------------------------------- transforms


def _linear(path: str, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``T(p) = A p + b`` for a linear ANTs/ITK transform file."""
    ants = load_ants()
    tx = ants.read_transform(path)
    if tx.dimension != ndim:
        raise ValueError(f"{path}: a {tx.dimension}D transform for {ndim}D images")
    params = np.asarray(tx.parameters, dtype=np.float64)
    center = np.asarray(tx.fixed_parameters, dtype=np.float64)
    if tx.transform_type in ("AffineTransform", "MatrixOffsetTransformBase") and params.size == ndim * ndim + ndim:
        matrix = params[: ndim * ndim].reshape(ndim, ndim)
        translation = params[ndim * ndim:]
        return matrix, translation + center - matrix @ center
    # any other linear type (Euler, Similarity, Versor, Translation, ...): probe it at ndim + 1 points,
    # far apart so that single-precision rounding in the transform stays small against the offsets
    scale = 100.0
    base = np.asarray(tx.apply_to_point(tuple([0.0] * ndim)), dtype=np.float64)
    matrix = np.stack([(np.asarray(tx.apply_to_point(tuple(scale * e)), dtype=np.float64) - base) / scale
                       for e in np.eye(ndim)], axis=1)
    return matrix, base


def _sample_field(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``*shape x ndim`` ``values`` at ``N x ndim`` continuous indices, continued by
    the nearest voxel beyond the border (ITK's DisplacementFieldTransform)."""
    from scipy.ndimage import map_coordinates

    shape = values.shape[:-1]
    clipped = np.clip(index, 0, np.array(shape, dtype=np.float64) - 1)
    return np.stack([map_coordinates(values[..., c], clipped.T, order=1, mode="nearest")
                     for c in range(values.shape[-1])], axis=1)


def transform_points(points: np.ndarray, transforms: Sequence[str], voxels_of: Grid | None = None) -> np.ndarray:
    """Map ``N x ndim`` physical points of the fixed space through ANTs' forward transforms (list order).

    ``voxels_of``: the grid whose voxels (C order, :meth:`Grid.voxels`) ``points`` are. A first warp field
    on that very grid is then read at its voxels instead of being interpolated (the same numbers up to
    rounding, without the cost).
    """
    ants = load_ants()
    points = np.array(points, dtype=np.float64)
    ndim = points.shape[1]
    for i, path in enumerate(transforms):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: transform file not found")
        if path.endswith(".mat") or path.endswith(".txt") or path.endswith(".tfm"):
            matrix, offset = _linear(path, ndim)
            points = points @ matrix.T + offset
            continue
        warp = ants.image_read(path)
        if warp.dimension != ndim or warp.components != ndim:
            raise ValueError(f"{path}: a warp of {warp.components} components on a {warp.dimension}D grid, "
                             f"expected {ndim} on {ndim}D")
        values = np.asarray(warp.numpy(), dtype=np.float64)  # *shape x ndim, physical vectors
        grid = grid_of(warp)
        if i == 0 and voxels_of is not None and grid.same_as(voxels_of):
            points = points + values.reshape(-1, ndim)
        else:
            points = points + _sample_field(values, grid.to_index(points))
    return points


def displacement_from_transforms(transforms: Sequence[str], fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """regbench's displacement (``ndim x *fixed shape``, float64, moving voxels minus fixed voxels) of ANTs'
    forward transforms from ``fixed_grid`` to ``moving_grid`` (each an ANTsImage or a :class:`Grid`)."""
    fixed_grid = fixed_grid if isinstance(fixed_grid, Grid) else grid_of(fixed_grid)
    moving_grid = moving_grid if isinstance(moving_grid, Grid) else grid_of(moving_grid)
    if fixed_grid.ndim != moving_grid.ndim:
        raise ValueError(f"fixed grid is {fixed_grid.ndim}D, moving grid {moving_grid.ndim}D")
    voxels = fixed_grid.voxels()
    mapped = transform_points(fixed_grid.to_physical(voxels), transforms, voxels_of=fixed_grid)
    u = moving_grid.to_index(mapped)
    u -= voxels
    return np.ascontiguousarray(u.T.reshape(fixed_grid.ndim, *fixed_grid.shape))


def register_arrays(fixed: np.ndarray, moving: np.ndarray, stages: Sequence[Stage], *,
                    fixed_geometry: dict | None = None, moving_geometry: dict | None = None,
                    workdir: str | os.PathLike | None = None, **options) -> np.ndarray:
    """Register two numpy arrays with ANTs; returns regbench's displacement (``ndim x *fixed.shape``, float64).

    ``*_geometry``: ``{"spacing": ..., "origin": ..., "direction": ...}`` (each optional; default unit
    spacing, zero origin, identity direction). ``options`` go to :func:`registration`. The transform files
    go to a temporary folder (inside ``workdir`` if given) that is removed afterwards.
    """
    load_ants(options.get("threads"))  # before the first image: ITK fixes its thread count then
    fixed_image = to_ants(fixed, **(fixed_geometry or {}))
    moving_image = to_ants(moving, **(moving_geometry or {}))
    with tempfile.TemporaryDirectory(prefix="regbench-ants-", dir=workdir) as tmp:
        transforms = registration(fixed_image, moving_image, stages, str(Path(tmp) / "reg_"), **options)
        return displacement_from_transforms(transforms, grid_of(fixed_image), grid_of(moving_image))


def register_tensors(fixed, moving, stages: Sequence[Stage], options: dict[str, Any]):
    """A method's ``register``: one antsRegistration per pair of a batch (``B x 1 x *spatial`` tensors),
    in voxel space; returns ``B x ndim x *spatial`` in the fixed tensor's dtype and device."""
    import torch

    if fixed.shape[0] != moving.shape[0] or fixed.shape[1] != 1 or moving.shape[1] != 1:
        raise ValueError(f"ANTs registers single-channel pairs: fixed {tuple(fixed.shape)}, moving {tuple(moving.shape)}")
    fixed_np = fixed.detach().cpu().numpy()
    moving_np = moving.detach().cpu().numpy()
    fields = [register_arrays(fixed_np[b, 0], moving_np[b, 0], stages, **options) for b in range(fixed.shape[0])]
    return torch.from_numpy(np.stack(fields)).to(dtype=fixed.dtype, device=fixed.device)


def registration_options(recipe: dict[str, Any]) -> dict[str, Any]:
    """The global antsRegistration options of a recipe (keys shared by ``syn`` and ``affine``)."""
    return {
        "initial_transform": recipe["initial_transform"],
        "histogram_matching": recipe["histogram_matching"],
        "winsorize": tuple(recipe["winsorize"]),
        "random_seed": recipe["random_seed"],
        "threads": recipe["threads"],
    }
