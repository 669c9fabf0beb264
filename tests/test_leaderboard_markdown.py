"""leaderboard.md: ranks with their bootstrap intervals, what each row learned from, the best of each column in
bold (ties at the printed precision too), contrasts named."""
import pandas as pd
import pytest

from regbench.evaluation.aggregate import markdown_table, rank_text


def board(rows):
    return pd.DataFrame([{"method": m, "dice_mean": d, "dice_std": 0.01, "sdlogj_mean": s, "sdlogj_std": 0.0,
                          "n_pairs": 22, "n_seeds": 3, "dice_not_worse": m == "a", "moving_contrast": c,
                          "supervision": cls, "rank": rank, "rank_low": low, "rank_high": high,
                          "dice_ci_low": d - 0.02, "dice_ci_high": d + 0.02}
                         for m, d, s, c, cls, (rank, low, high) in rows])


def test_ranks_classes_bold_bests_and_contrasts():
    table = markdown_table(board([("a", 0.8, 0.0, "image", "none", (1, 1, 2)),
                                  ("b", 0.7, 1e-17, "t2", "labels", (2, 1, 3)),
                                  ("c", 0.6, 0.2, "image", "classical", (3, 3, 3))]))
    lines = table.splitlines()
    assert lines[0] == "| rank | method | learns from | Dice | SDlogJ | Dice 95 % CI | seeds | pairs |"
    assert lines[2] == "| 1 (1-2) | a ◆ | none | **0.800 ± 0.010** | **0.000 ± 0.000** | 0.780 to 0.820 | 3 | 22 |"
    # 1e-17 prints as the best
    assert lines[3] == "| 2 (1-3) | b (moving: t2) | labels | 0.700 ± 0.010 | **0.000 ± 0.000** | 0.680 to 0.720 | 3 | 22 |"
    assert lines[4] == "| 3 | c | classical | 0.600 ± 0.010 | 0.200 ± 0.000 | 0.580 to 0.620 | 3 | 22 |"


def test_a_rank_the_data_fix_prints_alone():
    assert rank_text({"rank": 4, "rank_low": 4, "rank_high": 4}) == "4"
    assert rank_text({"rank": 4, "rank_low": 2, "rank_high": 6}) == "4 (2-6)"
    assert rank_text({"class_rank": 1, "class_rank_low": 1, "class_rank_high": 2}, "class_") == "1 (1-2)"
    assert rank_text({}) == "–"


def test_a_row_no_better_than_no_registration_is_marked():
    rows = board([("a", 0.8, 0.0, "image", "none", (1, 1, 1)), ("identity", 0.6, 0.0, "image", "classical", (2, 2, 3)),
                  ("c", 0.59, 0.0, "image", "none", (3, 2, 3))])
    rows["dice_beats_identity"] = [True, float("nan"), False]
    lines = markdown_table(rows).splitlines()
    assert "| a ◆ |" in lines[2] and "○" not in lines[2]
    assert "| identity |" in lines[3]                      # the floor itself carries no mark
    assert "| c ○ |" in lines[4]


def test_the_leaderboard_tests_every_row_against_no_registration(tmp_path):
    """Scores written by hand for 12 pairs: "good" beats identity on every pair, "flat" only wobbles around it (6 pairs
    up, 6 down by the same 0.01: Wilcoxon p 1). good beats identity and flat on all 12 pairs: exact two-sided p
    2 / 2^12 = 2^-11 each; Holm over the 3 tests (2^-11, 1, 2^-11): 3 x 2^-11, then 2 x 2^-11 raised to it, then 1.
    identity is the only classical row, good and flat learn from images alone ("none")."""
    import numpy as np

    from regbench.evaluation import aggregate
    from regbench.io import write_csv, write_json
    from regbench.layout import run_dir

    floor = np.linspace(0.5, 0.7, 12)
    wobble = np.tile([0.01, -0.01], 6)
    for method, dice, supervision in (("identity", floor, "classical"), ("good", floor + 0.05 + wobble / 5, "none"),
                                      ("flat", floor + wobble, "none")):
        folder = run_dir(tmp_path, "toy", method, 0)
        write_csv(folder / "pairs.csv", pd.DataFrame({"fixed": [f"f{i}" for i in range(12)],
                                                      "moving": [f"m{i}" for i in range(12)], "dice": dice}))
        write_json(folder / "eval.json", {"supervision": supervision, "deviations": []})
    aggregate.write_leaderboard(tmp_path, "toy", ["identity", "good", "flat"], resamples=100)
    board = pd.read_csv(tmp_path / "toy" / "leaderboard.csv").set_index("method")   # as the report reads it
    assert board.at["good", "dice_p_vs_identity"] == pytest.approx(3 * 2.0 ** -11)   # Holm's, not the raw 2^-11
    assert board.at["flat", "dice_p_vs_identity"] == 1.0
    assert board.at["good", "dice_beats_identity"] and not board.at["flat", "dice_beats_identity"]
    assert pd.isna(board.at["identity", "dice_p_vs_identity"]) and pd.isna(board.at["identity", "dice_beats_identity"])
    # good is the best; identity and flat are worse than it (Holm p 3 x 2^-11); within the classes flat still
    # trails good, but identity is the best of its own
    assert board["dice_not_worse"].to_dict() == {"good": True, "identity": False, "flat": False}
    assert board["dice_not_worse_in_class"].to_dict() == {"good": True, "identity": True, "flat": False}
    write_json(tmp_path / "toy" / "leaderboard.json", {"failed": {}})
    names = {line.split(" | ")[1] for line in aggregate.write_markdown(tmp_path, ["toy"]).splitlines()
             if line.startswith("| ") and "---" not in line}
    assert {"good ◆", "flat ○", "identity"} <= names
