"""The package's layers, read from the code's imports: nothing imports a layer above its own.

regbench/'s top-level modules (the plugin contracts, the loader, files, geometry, runtime) are what every part
uses; above them, in order: the blocks that methods assemble, the data, training and evaluation (side by side),
tuning, the report, the workflow's core. methods/ and datasets/ import only regbench's public modules, and only
the plugin loader imports them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "regbench"

#: layer of each subpackage; top-level modules are layer 0. Equal layers may not import each other.
LAYERS = {"blocks": 1, "data": 2, "training": 3, "evaluation": 3, "tuning": 4, "report": 5, "workflow": 6}


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every ``import``/``from ... import`` in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
    return found


def regbench_targets(module: str, names: list[str], package: Path = PACKAGE) -> list[str]:
    """The regbench modules an import reaches: ``from regbench.report import plots`` reaches regbench.report.plots."""
    if module != "regbench" and not module.startswith("regbench."):
        return []
    targets = []
    for name in names or [""]:
        candidate = f"{module}.{name}" if name else module
        as_module = package.parent / (candidate.replace(".", "/") + ".py")
        as_package = package.parent / candidate.replace(".", "/")
        targets.append(candidate if as_module.exists() or as_package.is_dir() else module)
    return targets


def layer_of(module: str) -> tuple[int, str]:
    """(layer, subpackage or '') of a regbench module name."""
    parts = module.split(".")
    if len(parts) < 2 or not (PACKAGE / parts[1]).is_dir():
        return 0, ""
    if parts[1] not in LAYERS:
        raise AssertionError(f"regbench/{parts[1]}/ has no layer in tests/test_layout.py: give it one")
    return LAYERS[parts[1]], parts[1]


def upward_imports(package: Path) -> list[str]:
    """Every import in ``package`` (a regbench tree) that reaches its own layer's siblings or a layer above."""
    offences = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        own_layer, own_package = layer_of(name)
        for line, module, names in imported_modules(path):
            for target in regbench_targets(module, names, package):
                layer, subpackage = layer_of(target)
                if subpackage != own_package and subpackage and layer >= own_layer:
                    offences.append(f"{path.relative_to(package.parent)}:{line} imports {target} (layer {layer}, "
                                    f"its own is {own_layer})")
    return offences


def test_layers_of_the_package_only_import_downwards():
    offences = upward_imports(PACKAGE)
    assert not offences, "imports that run back up a layer:\n" + "\n".join(offences)


def test_layer_check_reports_imports_that_run_up(tmp_path):
    """The check is not vacuous: in a toy tree, a block importing the report, the data importing training,
    a top-level module importing a block and evaluation importing training (same layer) are all reported."""
    package = tmp_path / "regbench"
    for folder in ["blocks", "data", "training", "evaluation", "report"]:
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "report" / "plots.py").write_text("from regbench.blocks.spatial import warp\n")  # fine
    (package / "blocks" / "spatial.py").write_text("from regbench.report import plots\n")
    (package / "data" / "prepared.py").write_text("import regbench.training.loop\n")
    (package / "training" / "loop.py").write_text("from regbench.data.prepared import x\n")  # fine
    (package / "evaluation" / "scoring.py").write_text("def f():\n    from regbench.training import loop\n")
    (package / "io.py").write_text("from regbench.blocks import spatial\n")
    found = upward_imports(package)
    assert [line.split(" imports ")[0] for line in found] == [
        "regbench/blocks/spatial.py:1", "regbench/data/prepared.py:1", "regbench/evaluation/scoring.py:2",
        "regbench/io.py:1"]


@pytest.mark.parametrize("folder", ["methods", "datasets"])
def test_plugins_import_only_public_regbench_modules(folder):
    offences = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module, names in imported_modules(path):
            if module in {"methods", "datasets"} or module.startswith(("methods.", "datasets.")):
                offences.append(f"{path.relative_to(ROOT)}:{line} imports another plugin ({module})")
            for target in regbench_targets(module, names):
                if any(part.startswith("_") for part in target.split(".")):
                    offences.append(f"{path.relative_to(ROOT)}:{line} imports the private module {target}")
                if module.startswith("regbench") and any(n.startswith("_") for n in names):
                    offences.append(f"{path.relative_to(ROOT)}:{line} imports a private name from {module}")
            if module.startswith("regbench_plugins"):
                offences.append(f"{path.relative_to(ROOT)}:{line} reaches into the plugin loader's modules")
    assert not offences, "\n".join(offences)


def test_only_the_plugin_loader_loads_plugin_files():
    """No regbench module imports methods/ or datasets/ itself; they go through regbench.plugins."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for line, module, _ in imported_modules(path):
            if module.split(".")[0] in {"methods", "datasets", "regbench_plugins"}:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
        if path.name != "plugins.py" and "spec_from_file_location" in text:
            offences.append(f"{path.relative_to(ROOT)} loads a file by path (only regbench/plugins.py may)")
    assert not offences, "\n".join(offences)
