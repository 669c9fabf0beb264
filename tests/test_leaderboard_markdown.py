"""leaderboard.md: the best of each column in bold (ties at the printed precision too), contrasts named."""
import pandas as pd

from regbench.evaluation.aggregate import markdown_table


def board(rows):
    return pd.DataFrame([{"method": m, "dice_mean": d, "dice_std": 0.01, "sdlogj_mean": s, "sdlogj_std": 0.0,
                          "n_pairs": 22, "dice_not_worse": m == "a", "moving_contrast": c}
                         for m, d, s, c in rows])


def test_the_best_and_its_printed_ties_are_bold_and_the_contrast_is_named():
    table = markdown_table(board([("a", 0.8, 0.0, "image"), ("b", 0.7, 1e-17, "t2"), ("c", 0.6, 0.2, "image")]))
    lines = table.splitlines()
    assert lines[0] == "| method | Dice | SDlogJ | pairs |"
    assert lines[2] == "| a ◆ | **0.800 ± 0.010** | **0.000 ± 0.000** | 22 |"
    assert lines[3] == "| b (moving: t2) | 0.700 ± 0.010 | **0.000 ± 0.000** | 22 |"   # 1e-17 prints as the best
    assert lines[4] == "| c | 0.600 ± 0.010 | 0.200 ± 0.000 | 22 |"
