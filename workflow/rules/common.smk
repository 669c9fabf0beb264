import json
import sys

from regbench import plugins
from regbench.workflow.config import ConfigError

#: the CLI of the Python that runs snakemake (works without an activated environment)
REGBENCH = f"{sys.executable} -m regbench"


def settings_json(wildcards):
    """The job's settings (config hash = provenance), passed to the CLI as one JSON argument."""
    method = getattr(wildcards, "method", None)
    return json.dumps(job_settings(CONFIG, wildcards.dataset, method), sort_keys=True)


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    method="[A-Za-z0-9_]+",


#: What a job asks a cluster for when the config's `resources:` section does not say (a config without one,
#: e.g. a real 3D dataset with the papers' recipes: generous upper bounds, a job that ends early frees its slot).
#: runtime in minutes, mem_mb in MB, gpu a count; cpus defaults to the rule's threads.
RESOURCE_DEFAULTS = {
    "default": {"runtime": 60, "mem_mb": 8000, "gpu": 0},
    "prepare": {"runtime": 240, "mem_mb": 16000},
    "syn_supervision": {"runtime": 1440, "mem_mb": 16000},
    "train": {"runtime": 2880, "mem_mb": 32000, "gpu": 1},
    "register": {"runtime": 720, "mem_mb": 16000},
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
