"""regbench: a reproducible benchmark for learning-based deformable image registration."""
from regbench.dataset import DatasetSource
from regbench.method import RegistrationMethod

__version__ = "0.1.0"
__all__ = ["DatasetSource", "RegistrationMethod", "__version__"]
