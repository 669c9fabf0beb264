"""Deviations from the papers: declared in each method file, recorded by the evaluation, shown where users look."""
from __future__ import annotations

import pytest
import torch

from regbench import Deviation, RegistrationMethod
from regbench.evaluation import aggregate
from regbench.evaluation.scoring import evaluate_method
from regbench.io import read_json, write_json
from regbench.layout import run_dir
from regbench.plugins import load_method, method_ids
from regbench.report.page import DatasetSection
from regbench.workflow import cli

#: methods that are no paper's method: nothing to depart from
NOT_A_PAPER = {"identity", "external"}


@pytest.mark.parametrize("method_id", [m for m in method_ids() if m not in NOT_A_PAPER])
def test_every_method_lists_its_deviations(method_id):
    method = load_method(method_id)
    assert method.deviations, f"methods/{method_id}.py declares no deviations"
    for deviation in method.deviations:
        assert isinstance(deviation, Deviation)
        assert deviation.what.strip() and deviation.why.strip()
        assert set(deviation.recipes) <= set(method.recipes) | {"*"}, (method_id, deviation.what)


def test_departures_are_the_result_changing_deviations_of_a_recipe():
    both = Deviation("a", "why a")
    quick_only = Deviation("b", "why b", recipes=("quick",))
    cosmetic = Deviation("c", "why c", changes_results=False)
    option = Deviation("d", "why d", recipes=())

    class Toy(RegistrationMethod):
        name = "toy"
        recipes = {"paper": {}, "quick": {}}
        deviations = (both, quick_only, cosmetic, option)

    assert Toy().departures("paper") == [both]
    assert Toy().departures("quick") == [both, quick_only]


class Shift(RegistrationMethod):
    """A classical toy that moves by one voxel, with one deviation in its quick recipe."""

    name = "shift"
    trainable = False
    recipes = {"paper": {}, "quick": {}}
    deviations = (Deviation("one voxel", "a toy", recipes=("quick",)),
                  Deviation("a form", "nothing changes", changes_results=False))

    def register(self, net, fixed, moving, recipe):
        return torch.ones(fixed.shape[0], fixed.dim() - 2, *fixed.shape[2:])


def _score(method, dataset, results, recipe_name):
    out = run_dir(results, dataset.name, method.name, 0)
    evaluate_method(method, method.recipe(recipe_name), dataset, out, runtime_repeats=1, recipe_name=recipe_name)
    return out


def test_the_leaderboard_and_the_report_mark_rows_that_depart(small_embedded2d, tmp_path):
    results = tmp_path / "results"
    quick = _score(Shift(), small_embedded2d, results, "quick")
    record = read_json(quick / "eval.json")
    assert record["recipe_name"] == "quick"
    assert [d["applies"] for d in record["deviations"]] == [True, False]
    identity = load_method("identity")
    _score(identity, small_embedded2d, results, "quick")
    board = aggregate.write_leaderboard(results, small_embedded2d.name, ["shift", "identity"]).set_index("method")
    assert board.at["shift", "deviations"] == 1 and board.at["identity", "deviations"] == 0
    assert board.at["shift", "recipe"] == "quick" and board.at["shift", "working_grid"] == "dataset"
    write_json(results / small_embedded2d.name / "leaderboard.json", {"failed": {}})
    table = aggregate.write_markdown(results, [small_embedded2d.name])
    names = [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| ") and " | " in line]
    assert any(n.startswith("shift") and n.endswith("†") for n in names)
    assert any(n.startswith("identity") and "†" not in n for n in names)
    section = DatasetSection(results, small_embedded2d.name, ["shift", "identity"])
    page = section.tables_html()
    assert "<span class='dev' title='one voxel'>†</span>" in page
    assert "Where the rows differ from their papers" in page and "nothing changes" in page


def test_the_paper_recipe_of_the_same_method_is_not_marked(small_embedded2d, tmp_path):
    results = tmp_path / "results"
    out = _score(Shift(), small_embedded2d, results, "paper")
    assert not any(d["applies"] for d in read_json(out / "eval.json")["deviations"])


def test_regbench_list_methods_counts_the_deviations(capsys):
    assert cli.main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    vtn = load_method("vtn")
    paper = sum(d.applies_to("paper") and d.changes_results for d in vtn.deviations)
    assert f"{len(vtn.deviations)} deviations ({paper} in the paper recipe)" in lines["vtn"]
    assert "0 deviations" in lines["identity"]
