"""Bad configs stop before any work starts, with one message that names the mistake."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from regbench.workflow.config import ConfigError, check_config, job_settings

ROOT = Path(__file__).resolve().parents[1]


def default_config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


CONFIG_DIR = ROOT / "config"   # lock files of tuned values are named relative to the config's folder


def test_an_instance_optimised_row_runs_its_method_s_recipe_and_trained_runs():
    from regbench.workflow.config import result_rows

    config = check_config({**default_config(), "instance_optimisation": {"methods": ["voxelmorph"], "steps": 20}},
                          config_dir=CONFIG_DIR)
    assert result_rows(config)[-1] == "voxelmorph+io" and result_rows(config)[:-1] == list(config["methods"])
    row, method = (job_settings(config, "embedded2d", m, seed=2) for m in ("voxelmorph+io", "voxelmorph"))
    assert row["method"] == "voxelmorph" and row["row"] == "voxelmorph+io" and row["recipe"] == method["recipe"]
    # the rate defaults to the method's own, as tuned (the lock's value, not the recipe's 1e-3)
    assert row["instance_optimisation"] == {"steps": 20, "lr": pytest.approx(method["recipe"]["lr"])}
    assert method["recipe"]["lr"] != 1e-3 and "instance_optimisation" not in method


def test_default_config_resolves():
    config = check_config(default_config(), config_dir=CONFIG_DIR)
    settings = job_settings(config, "embedded2d", "voxelmorph")
    assert settings["recipe_name"] == "quick"
    assert settings["recipe"]["iterations"] > 0
    # the default run trains with the values its lock file chose on val
    assert settings["tuned"]["file"] == "tuned/embedded2d.yaml"
    chosen = yaml.safe_load((CONFIG_DIR / "tuned" / "embedded2d.yaml").read_text())["methods"]["voxelmorph"]["chosen"]
    assert chosen and settings["tuned"]["values"] == chosen and settings["tuned"]["overridden"] == []
    assert {key: settings["recipe"][key] for key in chosen} == chosen
    assert settings["recipe"]["lr"] != 1e-3          # the lock's rate replaced the quick recipe's


def test_instance_optimisation_takes_the_config_s_rate_when_it_gives_one():
    """``instance_optimisation: {lr: 0.01}`` replaces the (tuned) rate of the method's recipe for the +io row only."""
    config = check_config({**default_config(), "instance_optimisation": {"methods": ["voxelmorph"], "steps": 7,
                                                                         "lr": 0.01}}, config_dir=CONFIG_DIR)
    row = job_settings(config, "embedded2d", "voxelmorph+io")
    assert row["instance_optimisation"] == {"steps": 7, "lr": 0.01} and row["recipe"]["lr"] != 0.01


def test_seeds_default_to_the_seed_and_deterministic_methods_run_the_first_one_only():
    """``seeds`` unset: [seed]. With seeds [3, 1, 2] a learned method (voxelmorph) and elastix (it samples) run all
    three; identity and syn (deterministic) run seed 3 alone."""
    from regbench.workflow.config import method_seeds

    config = check_config({"datasets": {"embedded2d": {}}, "methods": {"identity": {}}, "seed": 5})
    assert config["seeds"] == [5]
    config = check_config({**default_config(), "seeds": [3, 1, 2]}, config_dir=CONFIG_DIR)
    assert [method_seeds(config, m) for m in ("voxelmorph", "elastix", "identity", "syn", "voxelmorph+io")] == \
        [[3, 1, 2], [3, 1, 2], [3], [3], [3, 1, 2]]


def test_the_default_config_evaluates_embedded2d_s_runs_on_embedded2d_shift_with_embedded2d_s_tuned_values():
    """A run registers the target with its own recipe: a classical method with the values tuned on the training
    dataset's val split (spec/protocol.md: choices are made where the model is trained)."""
    from regbench.workflow.config import dataset_options, evaluation_targets

    config = check_config(default_config(), config_dir=CONFIG_DIR)
    assert evaluation_targets(config, "embedded2d") == ["embedded2d_shift"]
    assert dataset_options(config, "embedded2d_shift") == {}
    for method in ("syn", "elastix", "voxelmorph"):
        home = job_settings(config, "embedded2d", method, seed=1)
        elsewhere = job_settings(config, "embedded2d", method, seed=1, evaluated_on="embedded2d_shift")
        assert elsewhere["recipe"] == home["recipe"] and elsewhere["tuned"] == home["tuned"]
        assert elsewhere["evaluated_on"] == "embedded2d_shift" and elsewhere["evaluated_on_options"]["seed"] == 1
    # the target is prepared with its own options, not under 'datasets'
    assert job_settings(config, "embedded2d_shift")["dataset_options"]["bias"] == 0.5


SHIPPED_CONFIGS = sorted(p for p in (ROOT / "config").glob("*.yaml") if p.name != "schema.yaml")


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_the_schema_and_resolves(path):
    from snakemake.utils import validate

    config = yaml.safe_load(path.read_text())
    validate(config, str(ROOT / "config" / "schema.yaml"))
    resolved = check_config(config, str(path), config_dir=CONFIG_DIR)
    for dataset_id in resolved["datasets"]:
        for method_id in resolved["methods"]:
            settings = job_settings(resolved, dataset_id, method_id)
            assert (settings["dataset"], settings["method"]) == (dataset_id, method_id)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["methods"].update(voxelmorf={}), "unknown method 'voxelmorf'"),
    (lambda c: c["datasets"].update(oasis3={}), "unknown dataset 'oasis3'"),
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"iteratons": 5}}), "unknown recipe key 'iteratons'"),
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"iterations": "many"}}), "'iterations' must be int"),
    (lambda c: c["methods"].update(voxelmorph={"recipe": "fast"}), "no recipe 'fast'"),
    (lambda c: c["datasets"].update(embedded2d={"no_such_option": 1}), "unknown option 'no_such_option'"),
    (lambda c: c.update(evaluate_on={"embedded2d": ["embedded3d"]}),
     r"evaluate_on > embedded2d: 'embedded3d' is 3D, 'embedded2d' is 2D"),
    (lambda c: c.update(evaluate_on={"embedded2d": ["oasis_2d"]}), r"evaluate_on > embedded2d: unknown dataset 'oasis_2d'"),
    (lambda c: c.update(evaluate_on={"embedded2d": ["embedded2d"]}), r"lists 'embedded2d' itself"),
    (lambda c: c.update(evaluate_on={"oasis2d": ["embedded2d_shift"]}), r"evaluate_on > oasis2d: 'oasis2d' is not under"),
    (lambda c: c.update(evaluate_on={"embedded2d": {"embedded2d_shift": {"n_tset": 2}}}),
     r"evaluate_on > embedded2d: dataset 'embedded2d_shift': unknown option 'n_tset'"),
    (lambda c: c.update(datasets={"embedded2d": {}, "embedded2d_shift": {"n_test": 3}},
                        evaluate_on={"embedded2d": {"embedded2d_shift": {"n_test": 2}}}),
     r"'embedded2d_shift' has other options under 'datasets'; give them in one place"),
    (lambda c: c.update(datasets={"embedded2d": {}, "oasis2d": {}},
                        evaluate_on={"embedded2d": {"embedded2d_shift": {"n_test": 2}},
                                     "oasis2d": {"embedded2d_shift": {"n_test": 3}}}),
     r"evaluate_on > oasis2d: 'embedded2d_shift' has other options under another evaluate_on entry"),
    # the training loop's own keys: a run needs a step count >= 0, a batch, a positive rate
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"iterations": -1}}),
     r"method 'voxelmorph': recipe key 'iterations' must be >= 0, got -1"),
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"batch_size": 0}}),
     r"method 'voxelmorph': recipe key 'batch_size' must be >= 1, got 0"),
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"log_every": 0}}), r"'log_every' must be >= 1, got 0"),
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"lr": 0.0}}), r"recipe key 'lr' must be > 0, got 0.0"),
    (lambda c: c["methods"].update(voxelmorph={"overrides": {"lr": float("nan")}}), r"'lr' must be > 0, got nan"),
    (lambda c: c.update(instance_optimisation={"methods": ["transmorph"]}),
     r"instance_optimisation > methods: 'transmorph' is not under 'methods'"),
    (lambda c: c.update(instance_optimisation={"methods": ["birnet"]}), r"'birnet' learns from a teacher's fields"),
    (lambda c: c.update(instance_optimisation={"methods": ["syn"]}), r"'syn' does not train"),
])
def test_bad_names_and_values_are_named(change, message):
    config = default_config()
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config, config_dir=CONFIG_DIR)


def test_the_training_keys_smallest_values_are_accepted():
    """The bounds are inclusive: 0 iterations, a batch of 1, logging and checkpointing every step are a valid run."""
    config = default_config()
    config["methods"]["voxelmorph"] = {"overrides": {"iterations": 0, "batch_size": 1, "checkpoint_every": 1,
                                                     "log_every": 1, "lr": 1e-12}}
    resolved = check_config(config, config_dir=CONFIG_DIR)
    recipe = job_settings(resolved, "embedded2d", "voxelmorph")["recipe"]
    assert (recipe["iterations"], recipe["batch_size"], recipe["lr"]) == (0, 1, 1e-12)


@pytest.mark.parametrize("text, message", [
    ("datasets: {embedded2d: {}}\nmethods: {identity: {}}\nseed: zero\n", "'zero' is not of type 'integer'"),
    ("datasets: {embedded2d: {}}\nmethods: {identity: {}}\nthreads: 2\n", "'threads' was unexpected"),
    ("datasets: {embedded2d: {}}\nmethods: {nope: {}}\n", "unknown method 'nope'"),
    ("datasets: {embedded2d: {}}\nmethods: {identity: {}}\nevaluate_on: {embedded2d: [embedded3d]}\n",
     "evaluate_on > embedded2d: 'embedded3d' is 3D, 'embedded2d' is 2D"),
])
def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(config)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


BENCHMARK_CONFIGS = [p for p in SHIPPED_CONFIGS if p.name not in ("embedded3d.yaml",)]


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=lambda p: p.name)
def test_every_benchmark_config_runs_every_method(path):
    """The default run and each real dataset's config rank all eleven papers and the classical baselines."""
    from regbench.plugins import method_ids

    every = set(method_ids()) - {"external"}   # external scores the user's own files
    assert set(yaml.safe_load(path.read_text())["methods"]) == every


@pytest.mark.parametrize("path", [p for p in SHIPPED_CONFIGS if p.name != "config.yaml"], ids=lambda p: p.name)
def test_every_shipped_config_dry_runs_without_its_data(path, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "prepare" in result.stdout and "train" in result.stdout
