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


def fake_clock(monkeypatch, durations):
    """Make scoring's clock advance by the next of ``durations`` (seconds) during each registration call."""
    import time
    from types import SimpleNamespace

    from regbench.evaluation import scoring

    now = [0.0]
    monkeypatch.setattr(scoring, "time", SimpleNamespace(perf_counter=lambda: now[0], sleep=time.sleep))
    calls = []

    def call():
        now[0] += durations[len(calls)]
        calls.append(now[0])
        return torch.zeros(1)

    return call, calls


@pytest.mark.parametrize("warm_up", [True, False])
def test_a_pair_s_time_is_the_median_of_its_timed_calls_the_warm_up_left_out(monkeypatch, warm_up):
    """Timed calls of 1, 2 and 9 s (after a 5 s warm-up when asked): the median is 2 s (the mean would be 4, the
    last 9, the first 1; with the warm-up counted, the median of 5, 1, 2, 9 would be 3.5)."""
    from regbench.evaluation.scoring import measure

    call, calls = fake_clock(monkeypatch, [5.0, 1.0, 2.0, 9.0] if warm_up else [1.0, 2.0, 9.0])
    result, seconds, _ = measure(call, torch.device("cpu"), 3, warm_up=warm_up)
    assert seconds == 2.0 and len(calls) == 3 + warm_up and torch.equal(result, torch.zeros(1))


def test_no_repeats_is_one_untimed_call(monkeypatch):
    """``repeats`` 0 (tuning): the registration runs once, with no warm-up, and time and memory are NaN."""
    import math

    from regbench.evaluation.scoring import measure

    call, calls = fake_clock(monkeypatch, [5.0, 1.0])
    _, seconds, memory = measure(call, torch.device("cpu"), 0)
    assert len(calls) == 1 and math.isnan(seconds) and math.isnan(memory)


def test_mixed_precision_is_off_on_cpu_and_the_config_hash_ignores_key_order():
    """bf16 autocast is slower on CPU: fp32 there even when the method allows it and the config asks; the hash
    reads the config with sorted keys (the same for any order, another for another value), 12 hex digits."""
    from regbench.runtime import config_hash, training_precision

    assert training_precision(torch.device("cpu"), True, True) == "fp32"
    a = config_hash({"seed": 0, "methods": {"identity": {}}})
    assert a == config_hash({"methods": {"identity": {}}, "seed": 0}) and len(a) == 12 and int(a, 16) >= 0
    assert a != config_hash({"seed": 1, "methods": {"identity": {}}})
