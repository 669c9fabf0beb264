"""How a registration is timed: one untimed warm-up call for a run, then ``runtime_repeats`` timed calls a pair."""
import pytest
import torch

from regbench.evaluation.scoring import evaluate_method
from regbench.method import RegistrationMethod


class CountingShift(RegistrationMethod):
    """A constant shift that counts its calls; its first call takes 0.3 s more (a one-time cost)."""
    name = "counting_shift"
    trainable = False

    def __init__(self):
        self.calls = 0

    def register(self, net, fixed, moving, recipe):
        import time

        self.calls += 1
        if self.calls == 1:
            time.sleep(0.3)   # what a warm-up absorbs: lazy initialisation
        return torch.full((1, 2, *fixed.shape[2:]), 0.5)


@pytest.mark.parametrize("repeats", [0, 1, 3])
def test_one_warm_up_for_the_run_then_the_timed_calls_of_each_pair(small_embedded2d, tmp_path, repeats):
    method = CountingShift()
    table = evaluate_method(method, {}, small_embedded2d, tmp_path, runtime_repeats=repeats)
    pairs = len(small_embedded2d.split_pairs("test"))
    assert pairs >= 3
    # repeats 0 (tuning): one untimed call a pair; else one warm-up, then `repeats` timed calls a pair
    assert method.calls == (pairs if repeats == 0 else 1 + pairs * repeats)
    if repeats:
        assert table["runtime_s"].max() < 0.1   # the first call's 0.3 s stayed out of every pair's time
    else:
        assert table["runtime_s"].isna().all()
