"""leaderboard.md: ranks with their bootstrap intervals, what each row learned from, the best of each column in
bold (ties at the printed precision too), contrasts named."""
import pandas as pd

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
