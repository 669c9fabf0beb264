"""regbench: a reproducible benchmark for learning-based deformable image registration."""
from regbench.dataset import DatasetSource
from regbench.geometry import WorkingGrid
from regbench.method import Deviation, RegistrationMethod, SearchRange

__version__ = "0.1.0"
__all__ = ["DatasetSource", "Deviation", "RegistrationMethod", "SearchRange", "WorkingGrid", "__version__"]
