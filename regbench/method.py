"""What a method plugin is: the contract between ``methods/<id>.py`` and the workflow.

A method file defines one class ``Method`` that subclasses :class:`RegistrationMethod`, sets
``name`` to the file's stem, cites its paper, declares its recipes side by side (``"paper"``: the
paper's budget, for GPUs; ``"quick"``: what the default CPU run uses) and implements:

- ``build(ndim, recipe)``: the network (an ``nn.Module``), for 2D and 3D from the same code;
- ``loss_terms(net, batch, recipe)``: the training loss as named terms ``{name: (weight, value)}``;
  the training loop sums ``weight * value`` and logs every term;
- ``register(net, fixed, moving, recipe)``: the displacement ``B x ndim x *spatial`` (voxels, on the
  fixed grid, ``warped(x) = moving(x + u(x))``).

A method whose paper runs its network on a particular grid (a cube, a spacing) returns it from
``working_grid(ndim, recipe)``: the workflow then trains it on pairs resampled onto that grid and brings each
displacement back to the dataset's grid (:mod:`regbench.geometry`); ``register`` and ``loss_terms`` see the
working grid only. Where a file departs from its paper or the official code, it says so in ``deviations``
(:class:`Deviation`), which the leaderboard and the report show beside its row.

A method that does not learn (identity, classical tools) sets ``trainable = False`` and receives
``net=None``.

A batch is a dict of tensors: ``fixed``, ``moving`` (``B x 1 x *spatial``, float in [0, 1]);
``fixed_seg``, ``moving_seg`` (``B x 1 x *spatial``, int64 labels) and ``labels`` (the dataset's
evaluation label values, int64) when the dataset has segmentations. ``moving`` is in the contrast
the method registers from (``moving_contrast``) when the dataset serves it; ``fixed`` is always the
dataset's primary image.
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import nn

from regbench.geometry import GridAdapter, WorkingGrid

#: Recipe keys the training loop itself reads; every other key belongs to the method.
TRAINING_KEYS = {
    "iterations": "optimiser steps",
    "batch_size": "pairs per step",
    "lr": "Adam learning rate",
    "checkpoint_every": "iterations between checkpoints",
    "log_every": "iterations between rows of train_log.csv",
}
#: Training-loop keys a recipe may leave out (the default then holds); a config may set them for any learned method.
OPTIONAL_TRAINING_KEYS = {
    "model_selection": "the network a run keeps: 'last' (the default) or 'val_dice', the best of its checkpoints "
                       "on the val pairs (regbench.evaluation.selection)",
}


class TrainingStage(NamedTuple):
    """A stage of training: ``iterations`` steps of a fresh Adam over ``parameters`` (the rest frozen).

    ``adam`` holds extra keyword arguments of ``torch.optim.Adam`` (DLIR: ``{"amsgrad": True}``).
    ``lr_decay`` = ``(milestones, gamma)``: the rate is multiplied by ``gamma`` at each milestone (steps
    counted from the stage's start), as torch's MultiStepLR/StepLR, with Adam's moments kept.
    """

    name: str
    iterations: int
    parameters: list
    lr: float | None = None  # None: the recipe's lr
    adam: dict | None = None
    lr_decay: tuple | None = None


class Deviation(NamedTuple):
    """One way a method file departs from its paper or the paper's official code.

    ``recipes``: the recipes that run with it (``("*",)``, the default: every recipe; a quick-only change of the
    method lists ``("quick",)``; an option that is off by default lists none; a quick recipe's ordinary scaling, a
    smaller network or budget, is in its recipe, not here). ``changes_results``: True where a row's numbers can differ from the paper's method because
    of it; False for a difference of form (a normalisation folded into a weight) or where the file follows the
    paper against its code.
    """

    what: str
    why: str
    recipes: tuple[str, ...] = ("*",)
    changes_results: bool = True

    def applies_to(self, recipe_name: str) -> bool:
        """True when the recipe ``recipe_name`` runs with this deviation."""
        return "*" in self.recipes or recipe_name in self.recipes


class SearchRange(NamedTuple):
    """A recipe value to tune: from ``low`` to ``high``, sampled on a ``"log"`` or ``"linear"`` scale."""

    low: float
    high: float
    scale: str = "log"


class RegistrationMethod:
    """Base class of every method plugin (see the module docstring for the contract)."""

    name: str = ""
    citation: str = ""
    trainable: bool = True
    #: True when training needs a classical tool's displacements for the training pairs (BIRNet);
    #: the workflow then computes them first and the batch carries ``supervision`` (B x ndim x *spatial).
    needs_supervision: bool = False
    #: The moving image's contrast this method is made for (``"t2"``: the dataset's ``image_t2`` column), registered
    #: to the fixed subject's primary image; training and evaluation serve it as ``moving`` where the dataset
    #: has that column, the primary image elsewhere (eval.json records which). None: one contrast.
    moving_contrast: str | None = None
    #: True when the method trains and registers correctly under autocast (config ``mixed_precision``);
    #: a method whose losses or integration need float32 throughout leaves it False.
    allows_mixed_precision: bool = False
    #: True when the training loop may keep the method's images and conv weights channels-last on CPU
    #: (:func:`regbench.runtime.memory_format`: most networks step faster so); a method that measures slower
    #: with it (``benchmarks/memory_format.py``) sets False. The layout does not change a computed value.
    channels_last: bool = True
    #: ``{"paper": {...}, "quick": {...}}``; each a flat dict of hyper-parameters.
    recipes: dict[str, dict[str, Any]] = {}
    #: Where this file departs from the paper and its official code (what, why, which recipes, whether it can
    #: change results); empty for a method that is its paper, or has none.
    deviations: tuple[Deviation, ...] = ()
    #: What its users would tune (regbench.tuning, spec/protocol.md section 2): recipe key -> :class:`SearchRange`;
    #: the regulariser weight(s) and the learning rate of a learned method. Empty: nothing to tune.
    search_space: dict[str, SearchRange] = {}
    #: Recipe keys that count optimiser steps; tuning trains with the same fraction of each for every method.
    budget_keys: tuple[str, ...] = ("iterations",)
    #: A method without training whose result depends on a random seed (ANTs' sampled metrics): it runs once per
    #: seed of the config (:meth:`recipe_for_seed`), as learned methods train once per seed; False: it runs once.
    random_component: bool = False
    #: Recipe keys weighting a loss on segmentations (a soft Dice term): a row whose recipe gives one a weight > 0
    #: learned from labels (:meth:`supervision`), and is ranked with the methods that did.
    label_terms: tuple[str, ...] = ()

    @property
    def seeded(self) -> bool:
        """True when the method runs once per seed (it trains, or has a random component)."""
        return self.trainable or self.random_component

    def recipe_for_seed(self, recipe: dict[str, Any], seed: int) -> dict[str, Any]:
        """The recipe of the run with ``seed`` (a method with a random component puts the seed where it belongs)."""
        return recipe

    def supervision(self, recipe: dict[str, Any]) -> str:
        """What a row learned from, by its resolved recipe (spec/protocol.md, section 4): ``classical`` (no
        training), ``teacher`` (another tool's fields), ``labels`` (a segmentation loss with weight > 0) or
        ``none`` (images only)."""
        if not self.trainable:
            return "classical"
        if self.needs_supervision:
            return "teacher"
        if any(float(recipe.get(key) or 0) > 0 for key in self.label_terms):
            return "labels"
        return "none"

    def departures(self, recipe_name: str) -> list[Deviation]:
        """The deviations that the recipe ``recipe_name`` runs with and that can change its results."""
        return [d for d in self.deviations if d.applies_to(recipe_name) and d.changes_results]

    def recipe(self, which: str = "quick", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The named recipe with ``overrides`` applied, then :meth:`complete_recipe`; an unknown key or recipe is
        an error."""
        if which not in self.recipes:
            raise ValueError(f"method {self.name!r} has no recipe {which!r}; it has {sorted(self.recipes)}")
        resolved = copy.deepcopy(self.recipes[which])
        for key, value in (overrides or {}).items():
            if key not in resolved and self.trainable and key in OPTIONAL_TRAINING_KEYS:
                resolved[key] = value
                continue
            if key not in resolved:
                raise ValueError(
                    f"method {self.name!r}: unknown recipe key {key!r} in the config; "
                    f"known keys: {sorted(resolved)}"
                )
            expected = type(resolved[key])
            if resolved[key] is not None and not same_kind(value, resolved[key]):
                raise ValueError(
                    f"method {self.name!r}: recipe key {key!r} must be {expected.__name__}, "
                    f"got {type(value).__name__} {value!r}"
                )
            resolved[key] = value
        return self.complete_recipe(resolved)

    def complete_recipe(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Fill values a recipe leaves to others (None), once the overrides are in: VoxelMorph's regulariser
        weight follows its similarity unless the config sets it. The default returns the recipe as it is."""
        return recipe

    def scale_budget(self, recipe: dict[str, Any], fraction: float) -> dict[str, Any]:
        """The recipe with every :attr:`budget_keys` step count times ``fraction`` (at least one step)."""
        scaled = dict(recipe)
        for key in self.budget_keys:
            if key in scaled:
                scaled[key] = max(1, int(round(int(scaled[key]) * fraction)))
        return scaled

    def working_grid(self, ndim: int, recipe: dict[str, Any]) -> WorkingGrid | None:
        """The grid the paper's network runs on; None (the default): the dataset's own grid."""
        return None

    def grid_adapter(self, shape, spacing, recipe: dict[str, Any], trained_on=None) -> GridAdapter:
        """Resampling between a dataset's grid (``shape``, ``spacing`` in mm) and :meth:`working_grid`.

        ``trained_on``: ``(shape, spacing)`` of the dataset a trained network learned on, when it registers another
        dataset's images: they are resampled onto the grid the network was trained on (its working grid there) and
        the displacement is brought back to ``shape`` (:meth:`regbench.geometry.GridAdapter.onto`)."""
        if trained_on is None:
            return GridAdapter(shape, spacing, self.working_grid(len(shape), recipe))
        trained_shape, trained_spacing = trained_on
        return self.grid_adapter(trained_shape, trained_spacing, recipe).onto(shape, spacing)

    def register_on_dataset_grid(self, net: nn.Module | None, fixed: torch.Tensor, moving: torch.Tensor,
                                 recipe: dict[str, Any], adapter: GridAdapter) -> torch.Tensor:
        """:meth:`register` on the working grid, its displacement brought back to the dataset's grid."""
        u = self.register(net, adapter.image(fixed), adapter.image(moving), recipe)
        return adapter.displacement_to_dataset(u)

    def build(self, ndim: int, recipe: dict[str, Any]) -> nn.Module | None:
        if self.trainable:
            raise NotImplementedError(f"method {self.name!r} must implement build()")
        return None

    def training_stages(self, net: nn.Module, recipe: dict[str, Any]) -> list[TrainingStage]:
        """Stages trained one after another (DLIR trains its stages with earlier ones frozen).

        Default: one stage of ``recipe["iterations"]`` steps over every parameter. The loop calls
        :meth:`start_stage` before each stage's first step (also when it resumes inside a stage).
        """
        return [TrainingStage("all", int(recipe["iterations"]), list(net.parameters()))]

    def start_stage(self, net: nn.Module, index: int, recipe: dict[str, Any]) -> None:
        """Called before training stage ``index``; a method with stages records it on ``net``."""

    def loss_terms(self, net: nn.Module, batch: dict[str, torch.Tensor],
                   recipe: dict[str, Any]) -> dict[str, tuple[float, torch.Tensor]]:
        raise NotImplementedError(f"method {self.name!r} must implement loss_terms()")

    def register(self, net: nn.Module | None, fixed: torch.Tensor, moving: torch.Tensor,
                 recipe: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} must implement register()")


def same_kind(value: Any, reference: Any) -> bool:
    """A config value may replace a recipe value of the same kind (ints are accepted for floats)."""
    if isinstance(reference, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(reference, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float))
    if isinstance(reference, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(reference))


def parameter_count(net: nn.Module | None) -> int:
    """Number of parameters of the network (0 for methods without one)."""
    if net is None:
        return 0
    return sum(p.numel() for p in net.parameters())
