"""elastix B-spline registration: the classical free-form-deformation anchor, tuned like every other method.

Klein, Staring et al. (IEEE TMI 2010) optimise a cubic B-spline transform (Rueckert et al. 1999) by adaptive
stochastic gradient descent on Mattes mutual information sampled at random voxels, coarse to fine, with a
bending-energy penalty; its default B-spline parameter map is the setting most papers call "elastix". It runs
here through itk-elastix (``itk.elastix_registration_method``), one parameter map built from that default
(every recipe key below is one elastix parameter), and the transform is read back as a dense displacement with
transformix (``itk.transformix_deformation_field``): elastix's transform maps a fixed-image point to the moving
image, ``T(x) = x + d(x)``, which is regbench's convention; its vector components are in (x, y, z) order, the
reverse of the array axes, and are reordered.

Recipes:

- ``paper``: itk-elastix's default B-spline map (``ParameterObject.GetDefaultParameterMap("bspline")``): 4
  resolutions of smoothing pyramids, grid spacing 10 at the finest level (x2.83, x2, x1.41, x1), 256
  iterations a level of 2,048 random samples, Mattes MI plus bending energy with weight 1.
- ``quick``: the default CPU run (embedded2d, 176 x 176): 3 resolutions of 64 iterations (grid spacing x2,
  x1.41, x1), the rest as the paper. On embedded2d's 13 val pairs (0.634 unregistered): mean Dice 0.799 at about
  half a second of one CPU thread a pair; the default map 0.794 at about five times that.

Reproducibility: one ITK thread and elastix's ``RandomSeed`` make reruns bit-identical; the sampler is random,
so the method runs once per seed (``random_seed + seed``).
"""
from __future__ import annotations

import tempfile

import numpy as np
import torch

from regbench import Deviation, RegistrationMethod, SearchRange

_COMMON = {
    "metric": "AdvancedMattesMutualInformation",
    "histogram_bins": 32,                 # NumberOfHistogramBins (elastix's default)
    "bending_weight": 1.0,                # Metric1Weight of TransformBendingEnergyPenalty (Metric0Weight 1)
    "final_grid_spacing": 10.0,           # FinalGridSpacingInPhysicalUnits: voxels here (voxel space)
    "spatial_samples": 2048,              # NumberOfSpatialSamples, RandomCoordinate sampler, new every iteration
    "final_interpolation_order": 3,       # FinalBSplineInterpolationOrder
    "random_seed": 1,                     # RandomSeed; the run of seed k uses random_seed + k
    "threads": 1,                         # MaximumNumberOfThreads and ITK's global default: 1 = reproducible
}


class Method(RegistrationMethod):
    name = "elastix"
    citation = ("S. Klein, M. Staring, K. Murphy, M. A. Viergever, J. P. W. Pluim. elastix: a toolbox for "
                "intensity-based medical image registration. IEEE TMI 29(1):196-205, 2010. Through itk-elastix.")
    trainable = False
    random_component = True   # random voxel samples for the metric: one run per seed
    deviations = (
        Deviation("Registered in voxel space (unit spacing, identity direction)",
                  "The plugin contract hands register() arrays, not their spacing: the grid spacing is in voxels, "
                  "which on an isotropic grid is elastix's run in mm."),
        Deviation("Quick recipe: 3 resolutions of 64 iterations instead of 4 of 256",
                  "A 2D pair in about half a second of one CPU thread; on the val pairs it scores as the default map "
                  "(0.799 against 0.794).", recipes=("quick",)),
        Deviation("One ITK thread and a fixed random seed", "Bit-identical reruns; the thread count changes only "
                  "the order of floating-point sums.", changes_results=False),
    )
    # What an elastix user tunes: the control-point spacing and the weight of the bending energy
    search_space = {
        "final_grid_spacing": SearchRange(4.0, 32.0, "log"),
        "bending_weight": SearchRange(0.01, 10.0, "log"),
    }
    recipes = {
        "paper": {**_COMMON, "resolutions": 4, "iterations": 256},
        "quick": {**_COMMON, "resolutions": 3, "iterations": 64},
    }

    def recipe_for_seed(self, recipe: dict, seed: int) -> dict:
        """The run of ``seed`` samples with elastix's random seed ``random_seed + seed``."""
        return {**recipe, "random_seed": int(recipe["random_seed"]) + int(seed)}

    def register(self, net, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        if fixed.shape[0] != moving.shape[0] or fixed.shape[1] != 1 or moving.shape[1] != 1:
            raise ValueError(f"elastix registers single-channel pairs: fixed {tuple(fixed.shape)}, "
                             f"moving {tuple(moving.shape)}")
        fixed_np, moving_np = fixed.detach().cpu().numpy(), moving.detach().cpu().numpy()
        fields = [register_arrays(fixed_np[b, 0], moving_np[b, 0], recipe) for b in range(fixed.shape[0])]
        return torch.from_numpy(np.stack(fields)).to(dtype=fixed.dtype, device=fixed.device)


def parameter_map(recipe: dict) -> dict[str, tuple[str, ...]]:
    """elastix's default B-spline map with the recipe's values (every value a tuple of strings, as elastix takes)."""
    import itk

    levels = int(recipe["resolutions"])
    if levels < 1 or int(recipe["iterations"]) < 1:
        raise ValueError(f"elastix: resolutions and iterations must be >= 1, got {levels} and {recipe['iterations']}")
    values = dict(itk.ParameterObject.New().GetDefaultParameterMap("bspline"))
    values.update({
        "Metric": (str(recipe["metric"]), "TransformBendingEnergyPenalty"),
        "Metric0Weight": ("1.0",),
        "Metric1Weight": (repr(float(recipe["bending_weight"])),),
        "NumberOfHistogramBins": (str(int(recipe["histogram_bins"])),),
        "NumberOfResolutions": (str(levels),),
        # the default's schedule (sqrt(2) per level, 1 at the finest) for any number of levels
        "GridSpacingSchedule": tuple(repr(2 ** ((levels - 1 - i) / 2)) for i in range(levels)),
        "FinalGridSpacingInPhysicalUnits": (repr(float(recipe["final_grid_spacing"])),),
        "MaximumNumberOfIterations": (str(int(recipe["iterations"])),),
        "NumberOfSpatialSamples": (str(int(recipe["spatial_samples"])),),
        "FinalBSplineInterpolationOrder": (str(int(recipe["final_interpolation_order"])),),
        "RandomSeed": (str(int(recipe["random_seed"])),),
        "MaximumNumberOfThreads": (str(int(recipe["threads"])),),
        "WriteResultImage": ("false",),
    })
    return values


def register_arrays(fixed: np.ndarray, moving: np.ndarray, recipe: dict) -> np.ndarray:
    """elastix on one pair of arrays (voxel space); the displacement ``ndim x *spatial`` in voxels, float64."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(recipe["threads"]))
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameter_map(recipe))
    fixed_image = itk.image_from_array(np.ascontiguousarray(fixed, dtype=np.float32))
    moving_image = itk.image_from_array(np.ascontiguousarray(moving, dtype=np.float32))
    _, transform = itk.elastix_registration_method(fixed_image, moving_image, parameter_object=parameters,
                                                   log_to_console=False)
    with tempfile.TemporaryDirectory() as scratch:   # transformix writes deformationField.nii into its folder
        field = itk.array_from_image(itk.transformix_deformation_field(moving_image, transform,
                                                                       output_directory=scratch))
    # *spatial x ndim with (x, y, z) components -> ndim x *spatial in array-axis order
    return np.moveaxis(field[..., ::-1], -1, 0).astype(np.float64)
