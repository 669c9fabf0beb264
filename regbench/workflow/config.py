"""The workflow configuration: defaults, checks against the plugins, and what each job receives.

The JSON schema (config/schema.yaml) checks shapes and types; :func:`check_config` then checks what
a schema cannot: that every dataset and method id names a plugin file, that every recipe override and
dataset option is a known key of the right type, and that the training loop's own recipe keys are in
range. Both run before any job starts, and a mistake stops the run with one message naming the config
file, where in it, and what is wrong.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from regbench import plugins
from regbench.io import InputError
from regbench.layout import IO_SUFFIX, plugin_id
from regbench.tuning.lock import chosen_values, read_lock
from regbench.tuning.space import check_search_space

DEFAULTS: dict[str, Any] = {
    "data_dir": "data",
    "results_dir": "results",
    "seed": 0,
    # training seeds (spec/protocol.md, section 3): every learned method trains and is scored once per seed;
    # None: [seed]
    "seeds": None,
    # bootstrap of the mean and of the ranks over test pairs and seeds
    "bootstrap": {"resamples": 1000, "seed": 0},
    "device": "auto",
    "torch_threads": 2,
    "mixed_precision": False,
    # processes reading training batches ahead (regbench.data.loader): auto = 4 on CUDA, 0 on CPU
    "data_workers": "auto",
    "on_failure": "stop",
    "recipe": "quick",
    "evaluation": {"label_warp": "nearest", "runtime_repeats": 3, "export_displacements": False},
    # spec/protocol.md, section 2: the same number of trials and the same fraction of the budget for every method
    "tuning": {"trials": 12, "fraction": 1.0, "max_fold_pct": 0.5, "seed": 0},
    # dataset id -> lock file of tuned values (relative to the folder of the config file that names it)
    "tuned": {},
    # dataset id (trained on) -> other datasets whose test pairs its runs also register: {target: options}
    # (a list in the config: every target with its default options)
    "evaluate_on": {},
    # learned methods that also get a row fine-tuned on each test pair (<method>+io; regbench.training.instance)
    "instance_optimisation": {"methods": [], "steps": 50, "lr": None},
}


def result_rows(config: dict[str, Any]) -> list[str]:
    """Every row the config's leaderboards have: its methods, then each instance-optimised one (``<method>+io``),
    which registers with the trained runs of its method and trains nothing of its own."""
    return list(config["methods"]) + [m + IO_SUFFIX for m in config["instance_optimisation"]["methods"]]


class ConfigError(ValueError):
    """The configuration names something that does not exist or has a value of the wrong kind."""


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    resolved = copy.deepcopy(DEFAULTS)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(resolved.get(key), dict):
            resolved[key] = {**resolved[key], **value}
        else:
            resolved[key] = copy.deepcopy(value)
    resolved["datasets"] = {k: dict(v or {}) for k, v in resolved.get("datasets", {}).items()}
    if resolved["seeds"] is None:
        resolved["seeds"] = [resolved["seed"]]
    resolved["methods"] = {k: dict(v or {}) for k, v in resolved.get("methods", {}).items()}
    resolved["evaluate_on"] = {k: ({t: {} for t in v} if isinstance(v, list) else {t: dict(o or {}) for t, o in v.items()})
                               for k, v in (resolved.get("evaluate_on") or {}).items()}
    return resolved


#: The smallest value of each training-loop recipe key (regbench.method.TRAINING_KEYS) a run can use.
TRAINING_MINIMA = {"iterations": 0, "batch_size": 1, "checkpoint_every": 1, "log_every": 1}


def check_schema(config: Any, schema_path, source: str = "the config") -> None:
    """Check ``config`` against the JSON schema at ``schema_path``; one :class:`ConfigError` for the most
    relevant violation, naming ``source`` and the key path (``methods > voxelmorph > recipe``)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        where = " > ".join(str(part) for part in error.absolute_path) or "the top level"
        raise ConfigError(f"{source}: at {where}: {error.message}")


def check_config(config: dict[str, Any], source: str = "the config", schema=None, config_dir=None) -> dict[str, Any]:
    """Resolve defaults and check every name and override (first against the JSON schema at ``schema``,
    when given); return the resolved config. Lock files named under ``tuned`` are read (relative to ``config_dir``,
    the folder of the config file, else the working directory) and kept as ``_locks``: dataset -> lock."""
    if schema is not None:
        check_schema(config, schema, source)
    resolved = with_defaults(config)
    resolved["_locks"] = {}
    for dataset_id, name in resolved["tuned"].items():
        path = Path(config_dir or ".") / name
        try:
            resolved["_locks"][dataset_id] = read_lock(path, dataset_id)
        except InputError as err:
            raise ConfigError(f"{source}: tuned > {dataset_id}: {err}") from None
    known_datasets = plugins.dataset_ids()
    for dataset_id, options in resolved["datasets"].items():
        if dataset_id not in known_datasets:
            raise ConfigError(f"{source}: unknown dataset {dataset_id!r} under 'datasets'; "
                              f"known: {', '.join(known_datasets)}")
        try:
            plugins.load_dataset(dataset_id).resolve_options(options)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    _check_evaluate_on(resolved, source)
    known_methods = plugins.method_ids()
    for method_id, entry in resolved["methods"].items():
        if method_id not in known_methods:
            raise ConfigError(f"{source}: unknown method {method_id!r} under 'methods'; "
                              f"known: {', '.join(known_methods)}")
        try:
            check_search_space(plugins.load_method(method_id))
            _, recipe = method_recipe(resolved, method_id)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        for dataset_id, lock in resolved["_locks"].items():
            unknown = sorted(set(chosen_values(lock, method_id)) - set(recipe))
            if unknown:
                raise ConfigError(f"{source}: tuned > {dataset_id}: {Path(config_dir or '.') / resolved['tuned'][dataset_id]}"
                                  f": method {method_id!r} has no recipe key {unknown[0]!r} (its keys: {sorted(recipe)})")
            method_recipe(resolved, method_id, dataset_id)
        if plugins.load_method(method_id).trainable:
            _check_training_keys(recipe, method_id, source)
    _check_instance_optimisation(resolved, source)
    return resolved


def _check_instance_optimisation(config: dict[str, Any], source: str) -> None:
    """Each method named under ``instance_optimisation`` is a learned method of the config that has a loss of its
    own to fine-tune with (regbench.training.instance.check_instance_optimisation)."""
    from regbench.training.instance import check_instance_optimisation

    options = config["instance_optimisation"]
    for method_id in options["methods"]:
        if method_id not in config["methods"]:
            raise ConfigError(f"{source}: instance_optimisation > methods: {method_id!r} is not under 'methods'")
        try:
            check_instance_optimisation(plugins.load_method(method_id), io_settings(config, method_id))
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None


def io_settings(config: dict[str, Any], method_id: str, dataset_id: str | None = None) -> dict[str, Any]:
    """``{"steps", "lr"}`` of a method's instance optimisation: the config's rate, else its recipe's (tuned) one."""
    options = config["instance_optimisation"]
    lr = options["lr"] if options["lr"] is not None else method_recipe(config, method_id, dataset_id)[1].get("lr", 1e-4)
    return {"steps": int(options["steps"]), "lr": float(lr)}


def _check_evaluate_on(config: dict[str, Any], source: str) -> None:
    """Every ``evaluate_on`` entry: a dataset of the config, trained on; targets that exist, have its number of
    dimensions, are not itself, and take options that are known and, for a dataset also under ``datasets``, the same."""
    known = plugins.dataset_ids()
    given: dict[str, dict] = {}   # target -> the options first given for it under evaluate_on
    for dataset_id, targets in config["evaluate_on"].items():
        if dataset_id not in config["datasets"]:
            raise ConfigError(f"{source}: evaluate_on > {dataset_id}: {dataset_id!r} is not under 'datasets' "
                              f"(a model is evaluated elsewhere only where it is trained)")
        ndim = plugins.load_dataset(dataset_id).ndim
        for target, options in targets.items():
            where = f"{source}: evaluate_on > {dataset_id}"
            if target not in known:
                raise ConfigError(f"{where}: unknown dataset {target!r}; known: {', '.join(known)}")
            if target == dataset_id:
                raise ConfigError(f"{where}: lists {target!r} itself (its own test pairs are always scored)")
            if plugins.load_dataset(target).ndim != ndim:
                raise ConfigError(f"{where}: {target!r} is {plugins.load_dataset(target).ndim}D, {dataset_id!r} is "
                                  f"{ndim}D: a model registers images of the number of dimensions it was trained on")
            try:
                resolved = plugins.load_dataset(target).resolve_options(options)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
            if target in config["datasets"] and options and \
                    resolved != plugins.load_dataset(target).resolve_options(config["datasets"][target]):
                raise ConfigError(f"{where}: {target!r} has other options under 'datasets'; give them in one place")
            if target not in config["datasets"] and given.setdefault(target, options) != options:
                raise ConfigError(f"{where}: {target!r} has other options under another evaluate_on entry; "
                                  f"give them in one place")


def evaluation_targets(config: dict[str, Any], dataset_id: str) -> list[str]:
    """The datasets whose test pairs the runs trained on ``dataset_id`` also register (config ``evaluate_on``)."""
    return list((config.get("evaluate_on") or {}).get(dataset_id, {}))


def dataset_options(config: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """The options of a dataset the config trains on (``datasets``) or only evaluates on (``evaluate_on``)."""
    if dataset_id in config["datasets"]:
        return config["datasets"][dataset_id]
    for targets in (config.get("evaluate_on") or {}).values():
        if dataset_id in targets:
            return targets[dataset_id]
    raise KeyError(f"dataset {dataset_id!r} is neither under 'datasets' nor under 'evaluate_on' in the config")


def _check_training_keys(recipe: dict[str, Any], method_id: str, source: str) -> None:
    for key, low in TRAINING_MINIMA.items():
        value = recipe.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"{source}: method {method_id!r}: recipe key {key!r} must be >= {low}, got {value!r}")
    lr = recipe.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not (lr > 0 and lr == lr):
        raise ConfigError(f"{source}: method {method_id!r}: recipe key 'lr' must be > 0, got {lr!r}")


def method_recipe(config: dict[str, Any], method_id: str, dataset_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """(recipe name, resolved recipe) of a method under this config: the named recipe, then the values tuned for
    ``dataset_id`` (its lock file, when the config names one), then the config's own overrides."""
    entry = config["methods"].get(method_id) or {}
    which = entry.get("recipe", config.get("recipe", "quick"))
    return which, plugins.load_method(method_id).recipe(which, {**tuned_values(config, method_id, dataset_id),
                                                                **(entry.get("overrides") or {})})


def tuned_values(config: dict[str, Any], method_id: str, dataset_id: str | None) -> dict[str, float]:
    """The values a lock file of ``dataset_id`` chose for the method ({} without one)."""
    lock = (config.get("_locks") or {}).get(dataset_id)
    return chosen_values(lock, method_id) if lock else {}


def is_trainable(method_id: str) -> bool:
    """True for a row (a method, or its ``+io`` row) whose method trains."""
    return plugins.load_method(plugin_id(method_id)).trainable


def method_seeds(config: dict[str, Any], method_id: str) -> list[int]:
    """The seeds a method runs with: every seed of the config when it trains (or has a random component), else
    the first one only (a deterministic method gives the same result for every seed)."""
    seeds = [int(s) for s in config["seeds"]]
    return seeds if plugins.load_method(plugin_id(method_id)).seeded else seeds[:1]


def job_settings(config: dict[str, Any], dataset_id: str, method_id: str | None = None,
                 tuned: bool = True, seed: int | None = None, evaluated_on: str | None = None) -> dict[str, Any]:
    """Everything one job needs to reproduce its outputs (its hash is the provenance's config hash).

    ``tuned``: the recipe takes the dataset's lock-file values (``tuned``: which values, from which file, and the
    config's overrides of them); False for the tuning itself, which starts from the recipe. ``seed``: the run's
    training seed (one of ``seeds``; default: ``seed``). ``evaluated_on``: the run of ``dataset_id`` registers that
    dataset's test pairs (``evaluate_on``); the settings name it and its options. ``method_id`` may be a row
    ``<method>+io``: the method's settings, with ``row`` and its ``instance_optimisation``."""
    settings = {
        "dataset": dataset_id,
        "dataset_options": plugins.load_dataset(dataset_id).resolve_options(dataset_options(config, dataset_id)),
        "seed": int(config["seed"] if seed is None else seed),
        "device": config["device"],
        "torch_threads": config["torch_threads"],
        "mixed_precision": config["mixed_precision"],
        "data_workers": config["data_workers"],
        "on_failure": config["on_failure"],
        "evaluation": config["evaluation"],
    }
    if method_id is not None and method_id != plugin_id(method_id):  # an instance-optimised row of the method
        row, method_id = method_id, plugin_id(method_id)
        settings.update({"row": row, "instance_optimisation": io_settings(config, method_id, dataset_id)})
    if method_id is not None:
        which, recipe = method_recipe(config, method_id, dataset_id if tuned else None)
        recipe = plugins.load_method(method_id).recipe_for_seed(recipe, settings["seed"])
        settings.update({"method": method_id, "recipe_name": which, "recipe": recipe})
        values = tuned_values(config, method_id, dataset_id) if tuned else {}
        if values:
            overridden = sorted(set(values) & set((config["methods"].get(method_id) or {}).get("overrides") or {}))
            settings["tuned"] = {"file": config["tuned"][dataset_id], "values": values, "overridden": overridden}
        if not tuned:
            settings["tuning"] = config["tuning"]
    if evaluated_on is not None:
        settings["evaluated_on"] = evaluated_on
        settings["evaluated_on_options"] = plugins.load_dataset(evaluated_on).resolve_options(
            dataset_options(config, evaluated_on))
    return settings


def prepared_dir(config: dict[str, Any], dataset_id: str) -> Path:
    return Path(config["data_dir"]) / dataset_id / "prepared"


def method_dir(config: dict[str, Any], dataset_id: str, method_id: str) -> Path:
    return Path(config["results_dir"]) / dataset_id / method_id
