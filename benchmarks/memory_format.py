"""Time every learned method's training step in torch's default layout and in channels-last, on one CPU thread.

The training loop keeps images and conv weights channels-last on CPU (:func:`regbench.runtime.memory_format`)
unless a method sets ``channels_last = False``; this script measures both layouts for every method, to say which. Per method of the config: its recipe as the run resolves it (tuned values included),
the dataset's grid, a synthetic batch of it (:func:`regbench.workflow.plan.synthetic_batch`), the loop's own
step (:func:`regbench.training.loop.weighted_loss`, :func:`~regbench.training.loop.optimiser_step`) on the
first training stage. The two layouts' steps alternate after a warm-up, so that a change in the machine's
load hits both alike; the medians and their ratio are printed, with the first step's losses in both layouts
(the same to rounding). With --readme, the ratios go into the README between ``<!-- memory-format -->``
markers, with the commit that produced them.

    python benchmarks/memory_format.py [--config config/config.yaml] [--repeats 15] [--methods a,b] [--readme README.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from regbench import plugins
from regbench.data.prepared import to_device
from regbench.runtime import git_commit, in_memory_format
from regbench.training.loop import adam, optimiser_step, train_only, weighted_loss
from regbench.workflow.config import check_config, job_settings
from regbench.workflow.plan import dataset_grid, synthetic_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_figures import write_between_markers  # noqa: E402


def step_in_layout(method, recipe, grid, layout):
    """A callable doing one training step of ``method``'s first stage with everything in ``layout``."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    net = method.build(grid["ndim"], recipe).to(memory_format=layout)
    adapter = method.grid_adapter(grid["shape"], grid["spacing"], recipe)
    stage = method.training_stages(net, recipe)[0]
    train_only(net, stage.parameters)
    method.start_stage(net, 0, recipe)
    batch = in_memory_format(adapter.batch(to_device(synthetic_batch(grid, int(recipe["batch_size"]),
                                                                     method.needs_supervision), cpu)),
                             layout, grid["ndim"])
    optimiser = adam(stage.parameters, 1e-6, stage.adam)
    net.train()
    losses = []

    def step():
        torch.manual_seed(1)  # the same random draws (augmentation, sampling) in both layouts
        _, total = weighted_loss(method, net, batch, recipe, cpu)
        losses.append(float(total.detach()))
        optimiser_step(total, optimiser)

    return step, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--methods", help="comma-separated method ids (default: every learned method of the config)")
    parser.add_argument("--readme", type=Path, help="write the table into this README's memory-format block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    configfile = Path(args.config)
    config = check_config(yaml.safe_load(configfile.read_text()) or {}, source=str(configfile),
                          schema=root / "config" / "schema.yaml", config_dir=configfile.resolve().parent)
    lines = ["| method | default layout, s a step | channels-last, s a step | ratio | first loss (default / channels-last) |",
             "|---|---|---|---|---|"]
    ratios = []
    for dataset_id in config["datasets"]:
        grid = dataset_grid(config, dataset_id)
        for method_id in config["methods"]:
            method = plugins.load_method(method_id)
            if not method.trainable or (args.methods and method_id not in args.methods.split(",")):
                continue
            recipe = job_settings(config, dataset_id, method_id)["recipe"]
            dims = torch.channels_last if grid["ndim"] == 2 else torch.channels_last_3d
            default, default_losses = step_in_layout(method, recipe, grid, torch.contiguous_format)
            last, last_losses = step_in_layout(method, recipe, grid, dims)
            default(), last()  # warm-up (and the first losses)
            times = {"default": [], "last": []}
            for _ in range(args.repeats):
                for name, step in (("default", default), ("last", last)):
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            a, b = statistics.median(times["default"]), statistics.median(times["last"])
            line = (f"| {method_id} | {a:.3f} | {b:.3f} | {b / a:.2f} | "
                    f"{default_losses[0]:.6g} / {last_losses[0]:.6g} |")
            print(line, flush=True)
            lines.append(line)
            ratios.append(f"{method_id} {b / a:.2f}")
    print("\n".join(lines))
    if args.readme:
        text = (f"channels-last / default step time, one thread, {dataset_id} {'x'.join(map(str, grid['shape']))}, "
                f"median of {args.repeats}: {'; '.join(ratios)} (commit `{git_commit()[:12]}`)")
        write_between_markers(args.readme, "memory-format", text, inline=True)


if __name__ == "__main__":
    main()
