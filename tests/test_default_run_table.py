"""The default run's README table (benchmarks/default_run.py) carries each row's p against no registration (the
leaderboard's dice_p_vs_identity, tested in tests/test_leaderboard_markdown.py) and what produced it."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import default_run  # noqa: E402


def test_the_readme_table_prints_each_row_s_p():
    board = pd.DataFrame({
        "method": ["syn", "voxelmorph", "identity"], "supervision": ["classical", "none", "classical"],
        "rank": [1, 2, 3], "rank_low": [1, 2, 3], "rank_high": [1, 2, 3],
        "dice_mean": [0.8, 0.7, 0.6], "dice_std": [0.01] * 3, "dice_ci_low": [0.79, 0.69, 0.59],
        "dice_ci_high": [0.81, 0.71, 0.61], "fold_pct_mean": [0.0] * 3, "runtime_s_mean": [1.0, 0.1, 0.0],
        "train_time_s": [float("nan"), 60.0, float("nan")], "n_seeds": [1, 3, 1], "n_pairs": [22] * 3,
        "dice_p_vs_identity": [0.03, 0.0004, float("nan")],
    })
    table = default_run.figures_table(board, 600.0, "0123456789abcdef", ROOT / "config" / "config.yaml")
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| 0.030 |" in rows["syn"] and "| 4.0e-04 |" in rows["voxelmorph"] and "| – |" in rows["identity"]
    assert "10.0 min" in table and "0123456789ab" in table
    assert "speed" not in table   # no reference measured, none printed
    timed = default_run.figures_table(board, 600.0, "0123456789abcdef", ROOT / "config" / "config.yaml", (31.04, 42.96))
    assert "10.0 min of wall time on this machine's CPU, from nothing (the machine's speed then: a VoxelMorph " \
           "training step of 31.0 ms before the run and 43.0 ms after it, one thread)." in timed
    noted = default_run.figures_table(board, 600.0, "0123456789abcdef", ROOT / "config" / "config.yaml",
                                      time_note="Where the time went: train 900 s.")
    assert "Training time: mean over the seeds, one thread. Where the time went: train 900 s." in noted


def test_the_readme_table_names_the_learned_methods_that_do_not_beat_no_registration():
    board = pd.DataFrame({
        "method": ["syn", "voxelmorph", "identity", "c2fvit", "affine"],
        "supervision": ["classical", "none", "classical", "none", "classical"],
        "rank": [1, 2, 3, 4, 5], "rank_low": [1, 2, 3, 3, 3], "rank_high": [1, 2, 5, 5, 5],
        "dice_mean": [0.8, 0.7, 0.6, 0.59, 0.65], "dice_std": [0.01] * 5, "dice_ci_low": [0.5] * 5,
        "dice_ci_high": [0.9] * 5, "fold_pct_mean": [0.0] * 5, "runtime_s_mean": [0.1] * 5,
        "train_time_s": [float("nan"), 60.0, float("nan"), 30.0, float("nan")], "n_seeds": [1, 3, 1, 3, 3],
        "n_pairs": [22] * 5, "dice_p_vs_identity": [1e-4, 1e-4, float("nan"), 1.0, 0.07],
        "dice_beats_identity": [True, True, float("nan"), False, False],
    })
    table = default_run.figures_table(board, 600.0, "0123456789abcdef", ROOT / "config" / "config.yaml")
    # a classical row that does not beat it (affine) is not named: the criterion is the learned methods'
    assert table.endswith("Learned methods that do not beat no registration here (a higher mean Dice with "
                          "p < 0.05): c2fvit.")
    board.loc[board["method"] == "c2fvit", "dice_beats_identity"] = True
    assert default_run.figures_table(board, 600.0, "0123456789abcdef", ROOT / "config" / "config.yaml").endswith(
        "Every learned method (2) beats no registration (a higher mean Dice with p < 0.05).")
    # a board whose column holds numpy booleans only (a config without the identity row)
    board = board[board["method"] != "identity"].astype({"dice_beats_identity": bool})
    board.loc[board["method"] == "c2fvit", "dice_beats_identity"] = False
    assert default_run.figures_table(board, 600.0, "0123456789abcdef", ROOT / "config" / "config.yaml").endswith(
        "p < 0.05): c2fvit.")


def test_the_reference_step_times_voxelmorph_s_training_step(monkeypatch):
    """The median of the timed steps, the two warm-up steps left out, in ms (on a fake clock)."""
    import memory_format

    calls = []

    def fake_step_in_layout(method, recipe, grid, layout):
        assert method.name == "voxelmorph" and recipe == method.recipe("quick") and grid["shape"] == (176, 176)
        return (lambda: calls.append(len(calls))), []

    durations = [50, 40, 3, 4, 5, 6, 90]   # ms: two slow warm-up steps, one slow timed step
    clock = iter(t / 1000 for k, d in enumerate(durations) for t in (1000 * k, 1000 * k + d))
    monkeypatch.setattr(memory_format, "step_in_layout", fake_step_in_layout)
    monkeypatch.setattr(default_run.time, "perf_counter", lambda: next(clock))
    # the median of 3, 4, 5, 6 and 90 ms (their mean would be 21.6; with the warm-up, the median is 6)
    assert default_run.reference_step_ms(steps=5) == pytest.approx(5.0)
    assert len(calls) == 7


def test_the_readme_generalization_table_gives_each_method_its_target_dice_drop_and_rank():
    rows = []
    for method, supervision, home, target, rank in (("syn", "classical", 0.86, 0.84, 1), ("voxelmorph", "none", 0.75,
                                                                                          0.61, 2)):
        for scored_on, dice in (("embedded2d", home), ("embedded2d_shift", target)):
            rows.append({"method": method, "supervision": supervision, "trained_on": "embedded2d",
                         "evaluated_on": scored_on, "dice_mean": dice, "dice_ci_low": dice - 0.01,
                         "dice_ci_high": dice + 0.01, "dice_drop": home - dice, "dice_drop_ci_low": home - dice - 0.02,
                         "dice_drop_ci_high": home - dice + 0.02, "rank": rank, "rank_low": rank, "rank_high": rank,
                         "pair_mi": 1.14 if scored_on == "embedded2d" else 0.98})
    text = default_run.generalization_figures(pd.DataFrame(rows), "0123456789abcdef", ROOT / "config" / "config.yaml")
    line = next(l for l in text.splitlines() if l.startswith("| voxelmorph |"))
    assert line == ("| voxelmorph | none | 0.750 (0.740 to 0.760) | 0.610 (0.600 to 0.620) | +0.140 (+0.120 to +0.160) "
                    "| 2 |")
    assert "embedded2d 1.14 bits, embedded2d_shift 0.98 bits" in text and "0123456789ab" in text
