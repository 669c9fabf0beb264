"""Search spaces: what a method file declares it would tune, checked against its recipes, as Optuna distributions."""
from __future__ import annotations

import math

from regbench.method import RegistrationMethod, SearchRange

SCALES = ("log", "linear")


def check_search_space(method: RegistrationMethod) -> None:
    """Every entry names a numeric key of every recipe and a finite, non-empty, increasing range (positive on a
    log scale); one :class:`ValueError` naming the method and the key otherwise."""
    where = f"method {method.name!r}: search_space"
    if not isinstance(method.search_space, dict):
        raise ValueError(f"{where} must map recipe keys to SearchRange(low, high, scale)")
    for key, entry in method.search_space.items():
        for name, recipe in method.recipes.items():
            if key not in recipe:
                raise ValueError(f"{where}: {key!r} is not a key of its {name!r} recipe (keys: {sorted(recipe)})")
            value = recipe[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{where}: {key!r} is {value!r} in the {name!r} recipe, not a number to tune")
        if not isinstance(entry, SearchRange):
            raise ValueError(f"{where}: {key!r} must be a SearchRange(low, high, scale), got {entry!r}")
        low, high, scale = entry
        if scale not in SCALES:
            raise ValueError(f"{where}: {key!r} has scale {scale!r}; use one of {SCALES}")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float))
                and math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{where}: {key!r} needs a finite range, got [{low!r}, {high!r}]")
        if not low < high:
            raise ValueError(f"{where}: {key!r} has an empty or reversed range [{low!r}, {high!r}]")
        if scale == "log" and low <= 0:
            raise ValueError(f"{where}: {key!r} is on a log scale, so its range must be positive, got [{low!r}, "
                             f"{high!r}]")


def distributions(space: dict[str, SearchRange]) -> dict:
    """Optuna's float distributions of a search space, in its key order."""
    from optuna.distributions import FloatDistribution

    return {key: FloatDistribution(float(low), float(high), log=scale == "log") for key, (low, high, scale)
            in space.items()}


def describe(space: dict[str, SearchRange]) -> dict[str, list]:
    """``{key: [low, high, scale]}``, for the lock file and the report."""
    return {key: [entry.low, entry.high, entry.scale] for key, entry in space.items()}
