"""No registration: the zero displacement. Every table's floor, and the sanity check of the metrics."""
import torch

from regbench import RegistrationMethod


class Method(RegistrationMethod):
    name = "identity"
    citation = "No registration (the moving image as it is)."
    trainable = False
    recipes = {"paper": {}, "quick": {}}

    def register(self, net, fixed, moving, recipe):
        return torch.zeros(fixed.shape[0], fixed.ndim - 2, *fixed.shape[2:], dtype=fixed.dtype, device=fixed.device)
