"""ANTs affine: the linear baseline, what is left to a deformable method once the pose is fixed.

One antsRegistration linear stage (12 parameters in 3D, 6 in 2D) through antspyx, started from the
images' centres of mass, with Mattes mutual information on a randomly perturbed regular sample of the
voxels; the ``.mat`` it writes is converted to regbench's displacement (voxels, fixed grid,
``warped(x) = moving(x + u(x))``) by :func:`regbench.blocks.ants.displacement_from_transforms`. Every recipe key
is one antsRegistration parameter (:mod:`regbench.blocks.ants`); nothing is left to antspyx's defaults.

Recipes:

- ``paper``: antspyx's ``ants.registration(type_of_transform="Affine")`` written out, as the antspyx
  (0.2 to 0.5) that TransMorph's and later papers' ANTs baselines ran: centre-of-mass start,
  ``Mattes[fixed,moving,1,32,Regular,0.2]``, ``Affine[0.25]``, ``[2100x1200x1200x10,1e-6,10]``, shrink
  factors 6x4x2x1, smoothing sigmas 3x2x1x0 voxels, histogram matching on. The papers' own "Affine" rows
  are not ANTs runs (VoxelMorph: FreeSurfer's affine preprocessing; TransMorph's IXI: the affinely
  pre-aligned data), so there is no paper-specific setting to copy.
- ``quick``: the default CPU run (embedded2d): the same metric, 100 and 50 iterations at 1/4 and 1/2
  resolution (4x2x1, smoothing 2x1x0), none at full resolution, sampling rate 0.25, no histogram
  matching. On embedded2d's 13 val pairs: mean Dice 0.669 (0.634 unregistered, the paper recipe 0.669) at about
  a tenth of a second of one CPU thread per pair.

Reproducibility as for ``syn``: one ITK thread and a fixed nonzero seed make the sampled metric, and so
the result, identical on rerun; ``threads`` is part of the recipe and recorded with the runtime.
"""
from __future__ import annotations

import torch

from regbench import Deviation, RegistrationMethod
from regbench.blocks.ants import VOXEL_SPACE, linear_stage, register_tensors, registration_options

_COMMON = {
    "initial_transform": "center_of_mass",  # --initial-moving-transform [fixed,moving,1]
    "winsorize": [0.0, 1.0],                # --winsorize-image-intensities quantiles; [0, 1] = off
    "smoothing_units": "vox",
    "linear_transform": "Affine",           # Translation | Rigid | Similarity | Affine
    "linear_gradient_step": 0.25,
    "linear_metric": "Mattes",              # Mattes | MI | MeanSquares | GC | CC
    "linear_metric_parameter": 32,          # histogram bins
    "linear_sampling": "Regular",           # None (every voxel) | Regular (randomly perturbed grid) | Random
    "linear_convergence_threshold": 1e-6,
    "linear_convergence_window": 10,
    "threads": 1,                           # ITK threads; 1 = reproducible
    "random_seed": 1,                       # --random-seed and ANTS_RANDOM_SEED; must be > 0
}


class Method(RegistrationMethod):
    name = "affine"
    citation = ("B. B. Avants, N. J. Tustison, G. Song, P. A. Cook, A. Klein, J. C. Gee. A reproducible evaluation "
                "of ANTs similarity metric performance in brain image registration. NeuroImage 54(3):2033-2044, "
                "2011. ANTs (antsRegistration) affine stage through antspyx.")
    trainable = False
    random_component = True   # Mattes MI on a randomly perturbed sample of the voxels: one run per seed
    deviations = (
        VOXEL_SPACE,
        Deviation("The paper recipe is antspyx's Affine registration, not a paper's own setting",
                  "The papers' Affine rows are not ANTs runs (VoxelMorph: FreeSurfer's preprocessing; TransMorph's "
                  "IXI: the pre-aligned data); antspyx's type_of_transform='Affine' is what later ANTs baselines "
                  "ran.", recipes=("paper",)),
        Deviation("Quick recipe: no histogram matching, sampling rate 0.25, no full-resolution iterations",
                  "A 2D pair in about a tenth of a second; the metric and the transform are the paper recipe's.",
                  recipes=("quick",)),
        Deviation("One ITK thread and a fixed random seed", "Bit-identical reruns of the sampled metric.",
                  changes_results=False),
    )
    recipes = {
        "paper": {
            **_COMMON,
            "histogram_matching": True,
            "linear_sampling_rate": 0.2,
            "linear_iterations": [2100, 1200, 1200, 10],
            "linear_shrink_factors": [6, 4, 2, 1],
            "linear_smoothing_sigmas": [3.0, 2.0, 1.0, 0.0],
        },
        "quick": {
            **_COMMON,
            "histogram_matching": False,
            "linear_sampling_rate": 0.25,
            "linear_iterations": [100, 50, 0],
            "linear_shrink_factors": [4, 2, 1],
            "linear_smoothing_sigmas": [2.0, 1.0, 0.0],
        },
    }

    def recipe_for_seed(self, recipe: dict, seed: int) -> dict:
        """The run of ``seed`` samples its metric with ANTs' random seed ``random_seed + seed`` (must stay > 0)."""
        return {**recipe, "random_seed": int(recipe["random_seed"]) + int(seed)}

    def stages(self, recipe: dict) -> list:
        if not recipe["linear_transform"]:
            raise ValueError("method 'affine' needs a linear_transform (Translation, Rigid, Similarity or Affine)")
        return [linear_stage(recipe)]

    def register(self, net, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        return register_tensors(fixed, moving, self.stages(recipe), registration_options(recipe))
