"""regbench: prepare -> train -> register and evaluate -> aggregate -> report.

Run from the repository root: snakemake --cores all [--configfile config/<name>.yaml]
"""
from snakemake.utils import min_version

min_version("9.0")


# The default benchmark unless a --configfile is given (a given one replaces it, it is not merged into it).
if not workflow.config_settings.configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


import os

from regbench.workflow.config import check_config, job_settings, is_trainable, result_rows

CONFIG_FILES = [str(f) for f in workflow.config_settings.configfiles] or [f"{workflow.basedir}/config/config.yaml"]
# lock files of tuned values are named relative to the config file's folder
CONFIG_DIR = os.path.dirname(os.path.abspath(CONFIG_FILES[0]))
# the schema (config/schema.yaml), then every id, recipe key and type against the plugins, then the lock files:
# one error line
CONFIG = check_config(config, source=" + ".join(CONFIG_FILES), schema=f"{workflow.basedir}/config/schema.yaml",
                      config_dir=CONFIG_DIR)
DATASETS = list(CONFIG["datasets"])
# the leaderboard's rows: every method, then each instance-optimised one (<method>+io, trained by its method's runs)
METHODS = result_rows(CONFIG)
DATA = CONFIG["data_dir"]
RESULTS = CONFIG["results_dir"]


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/tune.smk"


rule all:
    input:
        expand(f"{RESULTS}/{{dataset}}/leaderboard.csv", dataset=DATASETS),
        f"{RESULTS}/leaderboard.md",
        f"{RESULTS}/report/index.html",
        generalization_tables(),
