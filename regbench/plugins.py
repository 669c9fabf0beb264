"""Find and load the plugin files in ``methods/`` and ``datasets/`` by path.

The two folders are plugin folders, not packages: each file is imported under a private module
name (``regbench_plugins.methods.<id>``), so nothing named ``methods`` or ``datasets`` ever lands in
``sys.modules`` or site-packages. Tests, the CLI and the workflow rules all load plugins here.

The folders are looked up in ``$REGBENCH_ROOT`` if set, else in the repository that holds this
package (an editable install), else in the current directory.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

from regbench.dataset import DatasetSource
from regbench.method import RegistrationMethod


def project_root() -> Path:
    if os.environ.get("REGBENCH_ROOT"):
        return Path(os.environ["REGBENCH_ROOT"]).resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "methods").is_dir():
        return here
    return Path.cwd()


def _import_file(kind: str, path: Path):
    module_name = f"regbench_plugins.{kind}.{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _plugin_files(kind: str) -> dict[str, Path]:
    folder = project_root() / kind
    if not folder.is_dir():
        raise FileNotFoundError(f"no {kind}/ folder under {project_root()} (set REGBENCH_ROOT to the regbench checkout)")
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")}


def method_ids() -> list[str]:
    return sorted(_plugin_files("methods"))


@functools.lru_cache(maxsize=None)
def load_method(method_id: str) -> RegistrationMethod:
    """The method plugin ``methods/<method_id>.py``, instantiated."""
    files = _plugin_files("methods")
    if method_id not in files:
        raise ValueError(f"unknown method {method_id!r}; known methods: {', '.join(sorted(files))}")
    module = _import_file("methods", files[method_id])
    cls = getattr(module, "Method", None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, RegistrationMethod)):
        raise TypeError(f"{files[method_id]}: must define class Method(regbench.RegistrationMethod)")
    method = cls()
    if method.name != method_id:
        raise TypeError(f"{files[method_id]}: Method.name is {method.name!r}, expected {method_id!r} (the file name)")
    return method


@functools.lru_cache(maxsize=None)
def dataset_registry() -> dict[str, DatasetSource]:
    """Every dataset id offered by ``datasets/*.py``."""
    registry: dict[str, DatasetSource] = {}
    for stem, path in _plugin_files("datasets").items():
        module = _import_file("datasets", path)
        offered = getattr(module, "DATASETS", None)
        if not isinstance(offered, dict):
            raise TypeError(f"{path}: must define DATASETS = {{id: DatasetSource(...)}}")
        for dataset_id, source in offered.items():
            if dataset_id in registry:
                raise TypeError(f"{path}: dataset id {dataset_id!r} is already defined by another file")
            if not isinstance(source, DatasetSource) or source.name != dataset_id:
                raise TypeError(f"{path}: DATASETS[{dataset_id!r}] must be a DatasetSource named {dataset_id!r}")
            registry[dataset_id] = source
    return registry


def dataset_ids() -> list[str]:
    return sorted(dataset_registry())


def load_dataset(dataset_id: str) -> DatasetSource:
    registry = dataset_registry()
    if dataset_id not in registry:
        raise ValueError(f"unknown dataset {dataset_id!r}; known datasets: {', '.join(sorted(registry))}")
    return registry[dataset_id]
