"""ANTs SyN: the classical deformable registration every learned method in this benchmark is compared with.

Avants et al.'s symmetric normalization (MedIA 2008) optimises a diffeomorphism by gradient steps on a
similarity metric, both images moving towards a midpoint, with Gaussian smoothing of the update field
and of the total field; in the Klein et al. 2009 comparison of 14 tools it ranked first. Here it runs
through antspyx (ANTsPy), with antsRegistration's command line written out stage by stage
(:mod:`regbench.blocks.ants`): every recipe key below is one antsRegistration parameter, nothing is left to
antspyx's defaults. The forward transforms are converted to regbench's displacement (voxels, fixed grid,
``warped(x) = moving(x + u(x))``) by :func:`regbench.blocks.ants.displacement_from_transforms`.

Recipes:

- ``paper``: the setting of VoxelMorph's baseline (Balakrishnan et al., CVPR 2018 and TMI 2019, section
  "Baseline methods"): SyN with cross-correlation, "SyN step size of 0.25, Gaussian parameters (9, 0.2),
  at three scales with at most 201 iterations each", found by the authors' parameter sweep on brain MRI.
  In antsRegistration terms: ``SyN[0.25,9,0.2]`` (gradient step, update-field and total-field variance in
  voxels^2: the old ANTS program's ``-r Gauss[9,0.2]``), ``CC``, ``[201x201x201,...]``, shrink factors 4x2x1.
  Not stated there, and taken from ANTs' own defaults: CC radius 4 (antsRegistrationSyN.sh), smoothing
  sigmas 2x1x0 voxels (what antspyx uses for three levels), convergence threshold 1e-6 over a window of
  10 iterations (antsRegistration's defaults). The VoxelMorph data were affinely aligned beforehand, so
  there is no linear stage. TransMorph's SyN (Chen et al., MedIA 2022, IXI) is another setting, in
  :data:`TRANSMORPH` (from its code, ``IXI/Baseline_traditional_methods/SyN/infer_IXI.py``): copy that
  dict into the config as ``methods: {syn: {recipe: paper, overrides: {...}}}``.
- ``quick``: the default CPU run (embedded2d, 176 x 176): the paper's regularisation (``SyN[0.25,9,0.2]``),
  CC radius 2, 40 iterations at 1/4 and 10 at 1/2 resolution, none at full resolution (the field is
  upsampled from 1/2). On embedded2d's 13 val pairs: mean Dice 0.882 (0.634 unregistered) at under half a
  second of one CPU thread per pair, the paper setting 0.881 at about twelve times that: on these noisy 2D slices
  its radius-4 CC and 201 full-resolution iterations buy nothing.

Reproducibility: one ITK thread and a fixed nonzero random seed give bit-identical displacements on
rerun (regbench.blocks.ants); ``threads`` is part of the recipe, so it is recorded with the runtime in eval.json.
The images are registered in voxel space (unit spacing, identity direction): the plugin contract gives
``register`` arrays, not their spacing, and every parameter here is in voxels or unitless.
"""
from __future__ import annotations

import torch

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.ants import VOXEL_SPACE, linear_stage, register_tensors, registration_options, syn_stage

_LINEAR_OFF = {
    # an optional linear stage before SyN ("" = none; the data are affinely aligned). To add antspyx's
    # "SyN" affine stage: linear_transform Affine, Mattes 32 bins, Regular 0.2, [2100x1200x1200x0], 4x2x2x1, 3x2x1x0
    "linear_transform": "",
    "linear_gradient_step": 0.25,
    "linear_metric": "Mattes",
    "linear_metric_parameter": 32,
    "linear_sampling": "Regular",
    "linear_sampling_rate": 0.2,
    "linear_iterations": [2100, 1200, 1200, 0],
    "linear_convergence_threshold": 1e-6,
    "linear_convergence_window": 10,
    "linear_shrink_factors": [4, 2, 2, 1],
    "linear_smoothing_sigmas": [3.0, 2.0, 1.0, 0.0],
}

_COMMON = {
    "initial_transform": "identity",  # --initial-moving-transform: identity | center_of_mass | geometric_center
    "histogram_matching": False,      # --use-histogram-matching (same modality, same scanner: off)
    "winsorize": [0.0, 1.0],          # --winsorize-image-intensities quantiles; [0, 1] = off
    "smoothing_units": "vox",         # units of every --smoothing-sigmas
    "syn_gradient_step": 0.25,        # SyN[gradient step, update-field variance, total-field variance]
    "syn_update_variance": 9.0,       # voxels^2
    "syn_total_variance": 0.2,        # voxels^2
    "syn_metric": "CC",               # CC | MI | Mattes | MeanSquares | Demons
    "syn_convergence_threshold": 1e-6,
    "syn_convergence_window": 10,
    "threads": 1,                     # ITK threads (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS); 1 = reproducible
    "random_seed": 1,                 # --random-seed and ANTS_RANDOM_SEED; must be > 0
    **_LINEAR_OFF,
}

#: TransMorph's SyN (IXI, atlas-to-subject): ants.registration(fixed, moving, 'SyNOnly',
#: reg_iterations=(160, 80, 40), syn_metric='meansquares') with the antspyx of 2021 (0.2/0.3), whose
#: SyNOnly started from the centres of mass and matched histograms; the rest is antspyx's defaults.
TRANSMORPH = {
    "initial_transform": "center_of_mass",
    "histogram_matching": True,
    "syn_gradient_step": 0.2,
    "syn_update_variance": 3.0,
    "syn_total_variance": 0.0,
    "syn_metric": "MeanSquares",
    "syn_metric_parameter": 32,      # antspyx passes syn_sampling=32; MeanSquares ignores it
    "syn_iterations": [160, 80, 40],
    "syn_shrink_factors": [4, 2, 1],
    "syn_smoothing_sigmas": [2.0, 1.0, 0.0],
    "syn_convergence_threshold": 1e-7,
    "syn_convergence_window": 8,
}


class Method(RegistrationMethod):
    name = "syn"
    citation = ("B. B. Avants, C. L. Epstein, M. Grossman, J. C. Gee. Symmetric diffeomorphic image registration "
                "with cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain. "
                "Medical Image Analysis 12(1):26-41, 2008. ANTs (antsRegistration) through antspyx.")
    trainable = False
    deviations = (
        VOXEL_SPACE,
        Deviation("CC radius 4, smoothing sigmas 2x1x0 voxels and convergence 1e-6 over 10 iterations are ANTs' "
                  "defaults", "VoxelMorph's baseline section states the step, the Gaussian parameters, the scales and "
                  "the iterations only; the rest is what antsRegistrationSyN.sh and antspyx use.",
                  recipes=("paper",)),
        Deviation("Quick recipe: CC radius 2 and no iterations at full resolution",
                  "A smaller similarity window and a field upsampled from half resolution, so that a 2D pair takes "
                  "well under a second on a CPU; the regularisation is the paper's.", recipes=("quick",)),
        Deviation("One ITK thread and a fixed random seed", "Bit-identical reruns; ANTs' result does not depend "
                  "on the thread count beyond floating-point order.", changes_results=False),
    )
    # What an ANTs user tunes: the gradient step and the smoothing of the update and total fields (voxels^2;
    # the paper's 0.25, 9, 0.2 and TransMorph's 0.2, 3, 0 inside)
    search_space = {
        "syn_gradient_step": SearchRange(0.05, 1.0, "log"),
        "syn_update_variance": SearchRange(0.5, 16.0, "log"),
        "syn_total_variance": SearchRange(0.0, 3.0, "linear"),
    }
    recipes = {
        "paper": {
            **_COMMON,
            "syn_metric_parameter": 4,              # CC radius (voxels)
            "syn_iterations": [201, 201, 201],
            "syn_shrink_factors": [4, 2, 1],
            "syn_smoothing_sigmas": [2.0, 1.0, 0.0],
        },
        "quick": {
            **_COMMON,
            "syn_metric_parameter": 2,
            "syn_iterations": [40, 10, 0],
            "syn_shrink_factors": [4, 2, 1],
            "syn_smoothing_sigmas": [2.0, 1.0, 0.0],
        },
    }

    def stages(self, recipe: dict) -> list:
        stages = [linear_stage(recipe)] if recipe["linear_transform"] else []
        return stages + [syn_stage(recipe)]

    def register(self, net, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        return register_tensors(fixed, moving, self.stages(recipe), registration_options(recipe))

