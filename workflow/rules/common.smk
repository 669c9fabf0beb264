import json
import sys

#: the CLI of the Python that runs snakemake (works without an activated environment)
REGBENCH = f"{sys.executable} -m regbench"


def settings_json(wildcards):
    """The job's settings (config hash = provenance), passed to the CLI as one JSON argument."""
    method = getattr(wildcards, "method", None)
    return json.dumps(job_settings(CONFIG, wildcards.dataset, method), sort_keys=True)


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    method="[A-Za-z0-9_]+",
