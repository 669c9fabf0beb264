# What the rules share: the jobs' command line and settings, input functions, resources. Rules live in the other
# files of this folder; every function they call is here (snakemake-workflows' convention).
import json
import os
import re
import shlex
import sys

from regbench import plugins
from regbench.training.supervision import DEFAULT_PAIRS, SUPERVISOR
from regbench.runtime import config_hash
from regbench.workflow.config import (ConfigError, evaluation_targets, is_trainable, job_settings, method_recipe,
                                      method_seeds, plugin_id)

# Jobs call `regbench` and `python` of the environment that runs Snakemake, activated or not: its bin folder
# leads the PATH of every shell command (a cluster job's too, which runs this file again in its own Python).
shell.prefix(f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")

# The command line of this run, for the report's provenance: the main snakemake process records it, and jobs
# (a cluster's too) receive it through the environment. Not a param: another command line for the same config
# does not make the report out of date.
if workflow.is_main_process:
    os.environ["REGBENCH_COMMAND"] = shlex.join(["snakemake", *sys.argv[1:]])
else:
    os.environ.setdefault("REGBENCH_COMMAND", "")


envvars:
    "REGBENCH_COMMAND",


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    method="[A-Za-z0-9_]+(\\+io)?",
    seed="[0-9]+",
    target="[A-Za-z0-9_]+",


def settings_json(wildcards):
    """The job's settings (config hash = provenance), passed to the CLI as one JSON argument."""
    method = getattr(wildcards, "method", None)
    seed = int(wildcards.seed) if hasattr(wildcards, "seed") else None
    return json.dumps(job_settings(CONFIG, wildcards.dataset, method, seed=seed), sort_keys=True)


#: method -> the seeds it runs with (every seed of the config for a learned method, the first for a deterministic one)
SEEDS = {m: method_seeds(CONFIG, m) for m in METHODS}


def run_files(name, dataset="{dataset}"):
    """Every run's ``name`` (pairs.csv, labels.csv, ...) of every method: results/<dataset>/<method>/seed<k>/name."""
    return [f"{RESULTS}/{dataset}/{m}/seed{s}/{name}" for m in METHODS for s in SEEDS[m]]


# ------------------------------------------------------------------------------ other datasets' test pairs

#: dataset trained on -> the datasets whose test pairs its runs also register (config evaluate_on)
TARGETS = {d: evaluation_targets(CONFIG, d) for d in DATASETS}


def targets_json(wildcards, output, targets):
    """What a run registers besides its own test pairs (`regbench register --on`): per target, its prepared folder,
    the folder of the job's outputs on it (pairs_on_<target>) and the run's settings (its training dataset's recipe
    and tuned values) naming it."""
    return json.dumps([{"prepared": f"{DATA}/{t}/prepared", "out": os.path.dirname(output[f"pairs_on_{t}"]),
                        "settings": job_settings(CONFIG, wildcards.dataset, wildcards.method, seed=int(wildcards.seed),
                                                 evaluated_on=t)} for t in targets], sort_keys=True)


# the datasets that register their own test pairs only (rule register); the others have a rule each (evaluate.smk)
OWN_PAIRS_ONLY = "(?!(?:{})/)[^/]+".format("|".join(re.escape(d) for d in DATASETS if TARGETS[d])) if any(
    TARGETS.values()) else "[^/]+"


def target_run_files(wildcards):
    """Every run's pairs.csv on one target: results/<dataset>/<method>/seed<k>/on_<target>/pairs.csv."""
    return [f"{RESULTS}/{wildcards.dataset}/{m}/seed{s}/on_{wildcards.target}/pairs.csv"
            for m in METHODS for s in SEEDS[m]]


def target_tables(wildcards):
    """What the generalization table of a dataset reads: each target's leaderboard and scores, and every scored
    dataset's prepared pairs.csv (MI per pair)."""
    targets = TARGETS[wildcards.dataset]
    return ([f"{RESULTS}/{wildcards.dataset}/on_{t}/{name}" for t in targets for name in ("leaderboard.csv", "scores.csv")]
            + [f"{DATA}/{d}/prepared/dataset.json" for d in [wildcards.dataset, *targets]])


def generalization_tables(wildcards=None):
    """results/<dataset>/generalization.csv of every dataset that the config evaluates elsewhere."""
    return [f"{RESULTS}/{d}/generalization.csv" for d in DATASETS if TARGETS[d]]


def prepared_folder(wildcards, input):
    """data/<dataset>/prepared: the folder of the job's input dataset.json."""
    return os.path.dirname(input.info)


def method_folder(wildcards, output):
    """results/<dataset>/<method>: the folder of the job's first output."""
    return os.path.dirname(output[0])


# ----------------------------------------------------------------------------------------- learned methods

def trained_run(wildcards):
    """results/<dataset>/<method>/seed<k>: the run whose model registers (a +io row's is its method's)."""
    return f"{RESULTS}/{wildcards.dataset}/{plugin_id(wildcards.method)}/seed{wildcards.seed}"


def trained_model(wildcards):
    """A learned method is evaluated from the model of its run; identity and classical tools need none."""
    if is_trainable(wildcards.method):
        return f"{trained_run(wildcards)}/model.pt"
    return []


def register_priority(wildcards):
    """A tool that trains nothing registers as early as a training starts (its register jobs are the long ones,
    ready from the start); a trained run's are short and fill the cores while the last trainings run."""
    return 0 if is_trainable(wildcards.method) else 1


# ----------------------------------------------------------------------------- SyN supervision (BIRNet)

def needs_supervision(method_id):
    """A method trained on an existing tool's deformations sets `needs_supervision = True`."""
    return bool(getattr(plugins.load_method(plugin_id(method_id)), "needs_supervision", False))


SUPERVISED_METHODS = [m for m in METHODS if needs_supervision(m)]


def syn_supervision(wildcards):
    """Input function of the train rule. The SyN supervision index of the dataset for a supervised method,
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


# ------------------------------------------------------------------------------------------------ tuning

#: the methods a tuning tunes: those that declare a search space
TUNED_METHODS = [m for m in CONFIG["methods"] if plugins.load_method(m).search_space]


def tune_settings(wildcards):
    """A tuning job's settings: the recipe before any lock file, and the config's tuning section."""
    return json.dumps(job_settings(CONFIG, wildcards.dataset, wildcards.method, tuned=False), sort_keys=True)


def seeds_json(wildcards):
    """{method: [seeds]} for the aggregate step: which runs make each method's scores."""
    return json.dumps(SEEDS, sort_keys=True)


def supervision_folder(wildcards):
    """Where a method that learns from SyN's fields finds them: results/<dataset>/syn_supervision."""
    return f"{RESULTS}/{wildcards.dataset}/syn_supervision"


def lock_file(dataset):
    """The lock file a tuning of ``dataset`` writes: the one the config names, else <config folder>/tuned/<dataset>.yaml."""
    return os.path.join(CONFIG_DIR, CONFIG["tuned"].get(dataset, f"tuned/{dataset}.yaml"))


def named_lock_file(wildcards):
    """The lock file the config trains this dataset with ("" when it names none): what the report shows."""
    return lock_file(wildcards.dataset) if wildcards.dataset in CONFIG["tuned"] else ""


# ------------------------------------------------------------------------------------------------ report

def dataset_figure(name, title):
    """A figure of rule report_dataset, flagged for `snakemake --report` (titles numbered in the page's order)."""
    return report(f"{RESULTS}/report/{{dataset}}/{name}.png", caption=f"../report/{name}.rst",
                  category="{dataset}", labels={"figure": title})


# ------------------------------------------------------------------------------------------------ resources

#: What a job asks a cluster for when the config's `resources:` section does not say (a config without one,
#: e.g. a real 3D dataset with the papers' recipes: generous upper bounds, a job that ends early frees its slot).
#: runtime in minutes, mem_mb in MB, gpu a count; cpus defaults to the rule's threads.
RESOURCE_DEFAULTS = {
    "default": {"runtime": 60, "mem_mb": 8000, "gpu": 0},
    "prepare": {"runtime": 240, "mem_mb": 16000},
    "syn_supervision": {"runtime": 1440, "mem_mb": 16000},
    "train": {"runtime": 2880, "mem_mb": 32000, "gpu": 1},
    "register": {"runtime": 720, "mem_mb": 16000},
    "tune": {"runtime": 2880, "mem_mb": 32000, "gpu": 1},
}


def _check_resource_methods(section):
    known = plugins.method_ids()
    for method_id in section.get("methods") or {}:
        if method_id not in known:
            raise ConfigError(f"{' + '.join(CONFIG_FILES)}: unknown method {method_id!r} under 'resources: methods:'; "
                              f"known: {', '.join(known)}")


_check_resource_methods(CONFIG.get("resources") or {})


def job_resource(rule_name, method, key, threads):
    """One resource of one job: the config's `resources:` (methods.<method>.<rule>, then <rule>, then default)
    over RESOURCE_DEFAULTS (<rule>, then default); cpus falls back to the job's threads."""
    section = CONFIG.get("resources") or {}
    layers = [RESOURCE_DEFAULTS["default"], RESOURCE_DEFAULTS.get(rule_name, {}),
              section.get("default") or {}, section.get(rule_name) or {}]
    if method is not None:
        layers.append(((section.get("methods") or {}).get(method) or {}).get(rule_name) or {})
    value = threads if key == "cpus" else None
    for layer in layers:
        value = layer.get(key, value)
    return value


def job_resources(rule_name):
    """The `resources:` of a rule, for `resources: **job_resources("<rule>")`: runtime (minutes), mem_mb,
    cpus_per_task and gpu, per job (a method's train and register jobs can differ). The SLURM executor turns
    them into sbatch's --time, --mem, --cpus-per-task and --gpus; a local run does not limit on them."""

    def resource(key):
        def get(wildcards, threads):
            return job_resource(rule_name, getattr(wildcards, "method", None), key, threads)

        return get

    return {"runtime": resource("runtime"), "mem_mb": resource("mem_mb"),
            "cpus_per_task": resource("cpus"), "gpu": resource("gpu")}
