# Classical baselines. `syn` and `affine` are ordinary methods (trainable = False: rule register runs them,
# no training). This file adds what learned methods need from them: SyN displacements between training
# subjects, to supervise methods that declare `needs_supervision = True` (BIRNet). The rule runs only when
# such a method is in the config: rule train asks for its output through `syn_supervision` below.
#
# Include after data.smk (it uses rules.prepare) and before train.smk (which calls syn_supervision).
import json
import sys

from regbench import plugins
from regbench.workflow.config import job_settings, method_recipe
from regbench.training.supervision import DEFAULT_PAIRS, SUPERVISOR

SUPERVISION_CLI = f"{sys.executable} -m regbench.training.supervision"


def needs_supervision(method_id):
    """A method trained on an existing tool's deformations sets `needs_supervision = True`."""
    return bool(getattr(plugins.load_method(method_id), "needs_supervision", False))


SUPERVISED_METHODS = [m for m in METHODS if needs_supervision(m)]


def syn_supervision(wildcards):
    """Input function for rule train: the SyN supervision index of the dataset for a supervised method,
    nothing for every other method."""
    if needs_supervision(wildcards.method):
        return f"{RESULTS}/{wildcards.dataset}/syn_supervision/index.csv"
    return []


def supervision_pair_count(wildcards):
    """How many training pairs SyN registers: the most that any supervised method's recipe asks for
    (recipe key `supervision_pairs`; regbench.training.supervision.DEFAULT_PAIRS when none says). The list is
    prefix-stable, so a method asking for fewer trains on the first ones."""
    counts = [int(method_recipe(CONFIG, m)[1].get("supervision_pairs", DEFAULT_PAIRS)) for m in SUPERVISED_METHODS]
    return max(counts, default=DEFAULT_PAIRS)


def supervision_settings(wildcards):
    """Job settings of method syn (its recipe as this config chooses it, listed among the methods or not)."""
    return json.dumps(job_settings(CONFIG, wildcards.dataset, SUPERVISOR), sort_keys=True)


rule syn_supervision:
    """SyN displacements for a fixed, seeded list of ordered training pairs (regbench/training/supervision.py)."""
    input:
        info=rules.prepare.output.info,
    output:
        index=f"{RESULTS}/{{dataset}}/syn_supervision/index.csv",
        summary=f"{RESULTS}/{{dataset}}/syn_supervision/supervision.json",
    params:
        settings=supervision_settings,
        pairs=supervision_pair_count,
        prepared=f"{DATA}/{{dataset}}/prepared",
        out=f"{RESULTS}/{{dataset}}/syn_supervision",
    threads: CONFIG["torch_threads"]
    resources:
        **job_resources("syn_supervision"),
    log:
        f"{RESULTS}/logs/{{dataset}}/syn_supervision.log",
    shell:
        "{SUPERVISION_CLI} --prepared {params.prepared} --out {params.out} --settings {params.settings:q}"
        " --pairs {params.pairs} --workers {threads} > {log} 2>&1"
