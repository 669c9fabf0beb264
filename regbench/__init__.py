"""regbench: a reproducible benchmark for learning-based deformable image registration."""
from regbench.dataset import DatasetSource
from regbench.geometry import WorkingGrid
from regbench.method import Deviation, RegistrationMethod

__version__ = "0.1.0"
__all__ = ["DatasetSource", "Deviation", "RegistrationMethod", "WorkingGrid", "__version__"]
