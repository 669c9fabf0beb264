"""`snakemake --lint` reports nothing but its advice to give each rule a conda environment or container.

The rules run the installed regbench (pyproject.toml, environment.yml); a per-rule environment would only repeat it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONDA_ADVICE = "Specify a conda environment or container for each rule."
RULES = {"prepare", "syn_supervision", "train", "register", "aggregate", "report_dataset", "report", "tune_method",
         "aggregate_on", "generalization"}


def lint_items(text: str) -> list[tuple[str, str]]:
    """(what, title) of every item of `snakemake --lint`'s text: what is 'rule <name>' or 'snakefile <path>'."""
    items, where = [], None
    for line in text.splitlines():
        heading = re.match(r"Lints for (rule \S+|snakefile [^\s:]+)", line)
        if heading:
            where = heading.group(1)
            continue
        item = re.match(r"\s+\* (.*):$", line)
        if item and where is not None:
            items.append((where, item.group(1)))
    return items


def test_lint_parser_reads_every_item():
    text = ("Lints for snakefile /x/rules/report.smk:\n"
            "    * Mixed rules and functions in same snakefile.:\n      Small one-liner functions...\n"
            "Lints for rule report (line 57, /x/rules/report.smk):\n"
            f"    * {CONDA_ADVICE}:\n      This way, ...\n"
            "    * Shell command directly uses variable RESULTS from outside of the rule:\n      It is ...\n")
    shell_variable = "Shell command directly uses variable RESULTS from outside of the rule"
    assert lint_items(text) == [("snakefile /x/rules/report.smk", "Mixed rules and functions in same snakefile."),
                                ("rule report", CONDA_ADVICE), ("rule report", shell_variable)]


@pytest.mark.parametrize("configfile, own_register_rules", [("config/config.yaml", {"register_embedded2d"}),
                                                            ("config/oasis.yaml", set())])
def test_snakemake_lint_gives_only_the_conda_advice(configfile, own_register_rules):
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", configfile],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    items = lint_items(result.stdout + result.stderr)
    others = [f"{where}: {title}" for where, title in items if title != CONDA_ADVICE]
    assert not others, "snakemake --lint:\n" + "\n".join(others)
    # every rule was linted (the parse saw them), each with only the conda advice; one lock rule per dataset, and a
    # register rule of its own per dataset evaluated on others (evaluate_on)
    linted = {where.removeprefix("rule ") for where, _ in items}
    assert {name for name in linted if not name.startswith("lock_")} == RULES | own_register_rules
    assert len([name for name in linted if name.startswith("lock_")]) == 1
