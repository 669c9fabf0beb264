"""Displacements computed elsewhere: score any tool's output like a regbench method.

Point ``folder`` at a directory of Learn2Reg displacement files, ``disp_<fixed>_<moving>.nii.gz`` (or
``.npz``), one per test pair of the dataset: shape ``X x Y x Z x 3`` (2D: ``X x Y x 2``), voxels, on the
fixed grid (``warped(x) = moving(x + u(x))``). Subject ids are those of the prepared dataset's
subjects.csv. Runtime and memory are not measured (the registration ran elsewhere).

    methods:
      external:
        overrides: {folder: /path/to/my_tool_output}
"""
from pathlib import Path

from regbench import RegistrationMethod
from regbench.io import InputError
from regbench.learn2reg import find_displacement, read_displacement


class Method(RegistrationMethod):
    name = "external"
    citation = "Displacement files produced by another tool (Learn2Reg format)."
    trainable = False
    precomputed = True
    recipes = {"paper": {"folder": ""}, "quick": {"folder": ""}}

    def load_displacement(self, fixed_id, moving_id, shape, recipe):
        if not recipe["folder"]:
            raise InputError("method 'external' needs the folder of its displacement files: "
                             "methods: {external: {overrides: {folder: PATH}}}")
        folder = Path(recipe["folder"])
        if not folder.is_dir():
            raise InputError(f"{folder}: folder of external displacements not found")
        return read_displacement(find_displacement(folder, fixed_id, moving_id), shape)

    def register(self, net, fixed, moving, recipe):
        raise InputError("method 'external' scores precomputed displacement files; it does not register images")
