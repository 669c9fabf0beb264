"""FireANTs greedy registration: a classical diffeomorphic anchor optimised with torch, tuned like every other method.

Jena, Chaudhari and Gee (FireANTs, arXiv 2404.01249, 2024) optimise a dense warp by Riemannian gradient descent: each
step is an Adam direction, scaled so that no point moves more than half a voxel times the learning rate and
*composed* with the current warp (``phi <- phi o (id + v)``, so the map stays diffeomorphic), with Gaussian smoothing
of the gradient (``smooth_grad_sigma``) and of the composed warp (``smooth_warp_sigma``), coarse to fine, on local
normalised cross-correlation. It is among the classical methods of Jena et al.'s "magic or mirage?" comparison
(NeurIPS 2024), tuned there as carefully as the learned ones. It runs here through the ``fireants`` package
(``GreedyRegistration``, compositive warp), one pair at a time on the device of the tensors; every recipe key below is
one of its arguments.

FireANTs returns, for each fixed voxel, the moving image's sampling position in torch's normalised coordinates
(``grid_sample``, ``align_corners=True``: -1 and 1 are the centres of the first and last voxels, components in
(x, y, z) order, the reverse of the array axes). The displacement in regbench's convention (voxels, fixed grid,
``warped(x) = moving(x + u(x))``) is that position, reordered to array axes and scaled by ``(size - 1) / 2`` per
axis, minus the voxel's own index (:func:`displacement_from_grid`).

Recipes:

- ``paper``: the deformable run of FireANTs' quickstart (docs/quickstart.md of rohitrango/FireANTs, also its
  CUMC12 and IBSR scripts of the paper, fireants/scripts/pairwise/): scales 4, 2, 1 with 200, 100, 25 iterations,
  CC window 5, gradient smoothing 1 voxel, learning rate 0.5, Adam; not set there, so the library's defaults
  (``GreedyRegistration`` and ``WarpAdam`` in fireants 1.5.0): warp smoothing 0.5 voxel, Adam betas (0.9, 0.99),
  convergence tolerance 1e-6 over 10 iterations, blurred pyramid, mean reduction.
- ``quick``: the default CPU run (embedded2d, 176 x 176): the paper's smoothing, window and rate, 100 and 50
  iterations at 1/4 and 1/2 resolution and 10 at full resolution. On embedded2d's 13 val pairs (0.634
  unregistered): mean Dice 0.881, no folded voxel, at about 0.4 s of one CPU thread a pair (SyN's quick recipe,
  timed beside it: 0.882 at 0.4 s; elastix's: 0.799 at 0.5 s); the paper recipe 0.880 at about 1.6 s.

Reproducibility: on CPU with one torch thread (``threads``, set around each call and restored after) two runs give
bit-identical displacements (tests/test_fireants.py); nothing in the optimisation is random, so the method runs once.
FireANTs' pyramid levels have at least 32 voxels an axis (``MIN_IMG_SIZE``): a coarse scale of a small image is
registered on that grid instead, and an image with an axis under 32 voxels is refused (FireANTs 1.5.0 would size
its full-resolution warp to 32 and fail).
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import torch

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.spatial import identity_grid

#: fireants' MIN_IMG_SIZE: the smallest axis of a pyramid level, and so of an image it can register
MIN_SIZE = 32

_COMMON = {
    "deformation": "compositive",   # deformation_type: the greedy, compositive warp (not the SVF)
    "loss": "cc",                   # loss_type: local normalised cross-correlation (rectangular window)
    "cc_kernel_size": 5,            # CC window (voxels; quickstart; the library's default is 7)
    "smooth_grad_sigma": 1.0,       # Gaussian sigma on the gradient (voxels of the level; quickstart)
    "smooth_warp_sigma": 0.5,       # Gaussian sigma on the composed warp (library default)
    "lr": 0.5,                      # optimizer_lr: a step moves a point at most lr x half a voxel (quickstart)
    "beta1": 0.9,                   # WarpAdam's moments (library defaults)
    "beta2": 0.99,
    "tolerance": 1e-6,              # stop a level when the loss changes less than this ...
    "tolerance_window": 10,         # ... over this many iterations (max_tolerance_iters; library defaults)
    "scales": [4, 2, 1],            # pyramid: downsampling factors, coarse to fine (quickstart)
    "threads": 1,                   # torch intra-op threads during a registration; 1 = reproducible on CPU
}


class Method(RegistrationMethod):
    name = "fireants"
    citation = ("R. Jena, P. Chaudhari, J. C. Gee. FireANTs: adaptive Riemannian optimization for multi-scale "
                "diffeomorphic registration. arXiv:2404.01249, 2024. Through the fireants package.")
    trainable = False
    deviations = (
        Deviation("No affine stage before the deformable one",
                  "FireANTs' quickstart initialises the greedy run with its affine registration; regbench's datasets "
                  "are affinely aligned already, as for SyN, so the deformable stage starts from the identity."),
        Deviation("Registered in voxel space (unit spacing, identity direction)",
                  "The plugin contract hands register() arrays, not their spacing; every FireANTs parameter here is "
                  "in voxels or unitless, so on an isotropic grid it is FireANTs' run in mm."),
        Deviation("Quick recipe: 100, 50 and 10 iterations instead of 200, 100 and 25",
                  "A 2D pair in well under a second of one CPU thread; smoothing, window and rate are the paper's.",
                  recipes=("quick",)),
        Deviation("One torch thread on CPU", "Bit-identical reruns; the thread count changes only the order of "
                  "floating-point sums.", changes_results=False),
    )
    # What a FireANTs user tunes (its authors' OASIS sweep, fireants/scripts/pairwise/oasis.py: rate, both
    # smoothings and the window); the window is an odd integer, left at the paper's
    search_space = {
        "lr": SearchRange(0.05, 1.0, "log"),
        "smooth_grad_sigma": SearchRange(0.25, 4.0, "log"),
        "smooth_warp_sigma": SearchRange(0.1, 2.0, "log"),
    }
    budget_keys = ()   # no training: tuning scores whole registrations
    recipes = {
        "paper": {**_COMMON, "iterations": [200, 100, 25]},
        "quick": {**_COMMON, "iterations": [100, 50, 10]},
    }

    def register(self, net, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        if fixed.shape != moving.shape or fixed.shape[1] != 1 or fixed.dim() not in (4, 5):
            raise ValueError(f"fireants registers single-channel 2D or 3D pairs on one grid: fixed "
                             f"{tuple(fixed.shape)}, moving {tuple(moving.shape)}")
        check_recipe(recipe)
        if min(fixed.shape[2:]) < MIN_SIZE:
            raise ValueError(f"fireants needs at least {MIN_SIZE} voxels an axis (its coarsest grid; a smaller axis "
                             f"breaks its full-resolution level), got an image of {tuple(fixed.shape[2:])}")
        with torch_threads(int(recipe["threads"])):
            fields = [register_pair(fixed[b:b + 1], moving[b:b + 1], recipe) for b in range(fixed.shape[0])]
        return torch.cat(fields).to(dtype=fixed.dtype)


def check_recipe(recipe: dict) -> None:
    """One clear error for a recipe FireANTs would take with an assertion deep inside, or not at all."""
    scales, iterations = list(recipe["scales"]), list(recipe["iterations"])
    if not scales or len(scales) != len(iterations):
        raise ValueError(f"fireants: scales {scales} and iterations {iterations} must be non-empty and of one length")
    if any(s < 1 for s in scales) or scales != sorted(scales, reverse=True) or any(int(i) < 0 for i in iterations):
        raise ValueError(f"fireants: scales must be >= 1 and decreasing, iterations >= 0; got {scales}, {iterations}")
    if int(recipe["cc_kernel_size"]) < 1 or int(recipe["cc_kernel_size"]) % 2 == 0:
        raise ValueError(f"fireants: cc_kernel_size must be an odd number >= 1, got {recipe['cc_kernel_size']}")
    if recipe["deformation"] not in ("compositive", "geodesic"):
        raise ValueError(f"fireants: deformation must be 'compositive' or 'geodesic', got {recipe['deformation']!r}")


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to ``threads`` inside the block, the caller's restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fireants():
    """fireants' modules, imported quietly: the package prints its fused-op status on import, then logs every
    registration's set-up at INFO and, on a machine without its compiled CUDA ops, warns at every pyramid level that
    it falls back to torch's (lines a pair in the rule's log): the import's own warnings say it once."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from fireants.io.image import BatchedImages, Image
            from fireants.registration.greedy import GreedyRegistration
    except ImportError as err:
        raise ImportError(f"method 'fireants' needs the fireants package ({err}): pyproject.toml installs "
                          "fireants==1.5.0 on Python < 3.12 only, since its pinned SimpleITK 2.2.1 has no wheel for "
                          "newer Pythons") from err
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("fireants"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return Image, BatchedImages, GreedyRegistration


def register_pair(fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
    """FireANTs' greedy registration of one pair (``1 x 1 x *spatial``); the displacement ``1 x ndim x *spatial``."""
    import SimpleITK as sitk

    Image, BatchedImages, GreedyRegistration = _fireants()
    device = fixed.device

    def batch(x: torch.Tensor):
        # unit spacing, zero origin, identity direction: FireANTs' physical space is the voxel grid
        array = np.ascontiguousarray(x[0, 0].detach().cpu().numpy(), dtype=np.float32)
        return BatchedImages([Image(sitk.GetImageFromArray(array), device=str(device))])

    fixed_batch, moving_batch = batch(fixed), batch(moving)
    registration = GreedyRegistration(
        scales=[float(s) for s in recipe["scales"]], iterations=[int(i) for i in recipe["iterations"]],
        fixed_images=fixed_batch, moving_images=moving_batch, loss_type=str(recipe["loss"]),
        deformation_type=str(recipe["deformation"]), optimizer="Adam", optimizer_lr=float(recipe["lr"]),
        optimizer_params={"beta1": float(recipe["beta1"]), "beta2": float(recipe["beta2"])},
        cc_kernel_size=int(recipe["cc_kernel_size"]), smooth_grad_sigma=float(recipe["smooth_grad_sigma"]),
        smooth_warp_sigma=float(recipe["smooth_warp_sigma"]), tolerance=float(recipe["tolerance"]),
        max_tolerance_iters=int(recipe["tolerance_window"]), progress_bar=False)
    with torch.enable_grad():   # the evaluation registers under no_grad; FireANTs' steps are gradients
        registration.optimize()
    with torch.no_grad():
        grid = registration.get_warped_coordinates(fixed_batch, moving_batch)
    return displacement_from_grid(grid.detach(), moving.shape[2:])


def displacement_from_grid(grid: torch.Tensor, moving_shape) -> torch.Tensor:
    """``grid_sample`` positions (``B x *spatial x ndim``, normalised with ``align_corners=True``, (x, y, z) order)
    in a moving image of ``moving_shape`` -> regbench's displacement ``B x ndim x *spatial`` (voxels, array axes)."""
    ndim = grid.shape[-1]
    if ndim != len(moving_shape) or grid.dim() != ndim + 2:
        raise ValueError(f"fireants: a {ndim}-component grid of shape {tuple(grid.shape)} does not fit a moving image "
                         f"of shape {tuple(moving_shape)}")
    grid = grid.to(torch.float64).flip(-1).movedim(-1, 1)                     # B x ndim x *spatial, array axes
    half = torch.tensor([(s - 1) / 2 for s in moving_shape], dtype=torch.float64, device=grid.device)
    position = (grid + 1) * half.view(1, ndim, *([1] * ndim))               # voxel index in the moving image
    return position - identity_grid(grid.shape[2:], device=grid.device, dtype=torch.float64)
