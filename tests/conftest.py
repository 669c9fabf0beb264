"""Fixtures shared by the test files."""
import pytest

from regbench.data.prepared import PreparedDataset
from regbench.plugins import load_dataset


@pytest.fixture(scope="session")
def small_embedded2d(tmp_path_factory):
    """A small embedded2d for the methods' short trainings: 8 training subjects per template, 2 test subjects
    per template (4 test pairs: one within each template, two across), prepared once per test session."""
    root = tmp_path_factory.mktemp("small_embedded2d")
    source = load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options({"n_train": 8, "n_val": 1, "n_test": 2}))
    return PreparedDataset(root / "prepared")


@pytest.fixture(scope="session")
def four_val_pairs(tmp_path_factory):
    """embedded2d with 2 val subjects per template: 4 val pairs (1 within each template, 2 across), so a mean over
    the val pairs is not any one pair's, nor their median; 3 training subjects per template, 1 test subject."""
    root = tmp_path_factory.mktemp("four_val_pairs")
    source = load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options({"n_train": 3, "n_val": 2, "n_test": 1}))
    return PreparedDataset(root / "prepared")
