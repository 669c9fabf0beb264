"""One training loop for every learned method.

The method supplies the network and its named loss terms; the loop sums ``weight * value``, steps
Adam, logs every term to ``train_log.csv``, checkpoints every ``checkpoint_every`` iterations and
resumes from the last checkpoint when rerun; with ``model_selection: val_dice`` it keeps the checkpoint that
scores best on the val pairs (the score is the caller's: :mod:`regbench.evaluation.selection`). Pairs depend only
on (seed, iteration) (:func:`regbench.data.prepared.training_batch`, read ahead by a DataLoader's workers), and the
RNG state is checkpointed, so a resumed run on CPU ends with the weights of an uninterrupted one.
"""
from __future__ import annotations

import bisect
import itertools
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from regbench.data.loader import batch_loader, worker_count
from regbench.data.prepared import PreparedDataset, to_device
from regbench.io import atomic_path, write_csv, write_json
from regbench.method import RegistrationMethod, parameter_count
from regbench.runtime import (autocast, in_memory_format, memory_format, peak_memory_mb, reset_peak_memory,
                              seed_everything, synchronize, training_precision)
from regbench.training.supervision import training_batches


#: A recipe's ``model_selection``: keep the last network, or the best by ``checkpoint_score`` on the val pairs.
SELECTIONS = ("last", "val_dice")


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite."""


def weighted_loss(method: RegistrationMethod, net: torch.nn.Module, batch: dict, recipe: dict[str, Any],
                  device: torch.device, precision: str = "fp32") -> tuple[dict, torch.Tensor]:
    """The method's named loss terms on ``batch`` (``{name: (weight, value)}``) and ``sum(weight * value)``
    in float32, under the training precision's autocast."""
    with autocast(device, precision):
        terms = method.loss_terms(net, batch, recipe)
        total = sum(weight * value.float() for weight, value in terms.values())
    return terms, total


def train_only(net: torch.nn.Module, parameters) -> None:
    """Freeze every parameter of ``net`` outside ``parameters`` (a training stage's), unfreeze those."""
    active = {id(p) for p in parameters}
    for parameter in net.parameters():
        parameter.requires_grad_(id(parameter) in active)


def adam(parameters, lr: float, options: dict | None = None) -> torch.optim.Adam:
    """torch's Adam over ``parameters`` at rate ``lr``, with a stage's extra options (``TrainingStage.adam``): the one
    optimiser of training, instance optimisation and the plan's calibration.

    The multi-tensor (``foreach``) update: on a CPU, the same numbers to the bit as torch's default loop over tensors
    and a faster step (the pyramid's 210 tensors: 3.7 against 6.3 ms); the default on a GPU. Not the fused kernel:
    faster still, but its other rounding order sends a training on another trajectory."""
    return torch.optim.Adam(parameters, lr=lr, **{"foreach": True, **(options or {})})


def optimiser_step(total: torch.Tensor, optimiser: torch.optim.Optimizer, scaler=None) -> None:
    """Back-propagate ``total`` and step (through the gradient scaler in fp16)."""
    optimiser.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
        optimiser.step()
    else:
        scaler.scale(total).backward()
        scaler.step(optimiser)
        scaler.update()


def train(method: RegistrationMethod, recipe: dict[str, Any], dataset: PreparedDataset, out_dir,
          *, seed: int = 0, device: str | torch.device = "cpu", provenance: dict | None = None,
          progress: bool = False, mixed_precision: bool = False, supervision_folder=None,
          data_workers: int | str = "auto", checkpoint_score: Callable[..., float] | None = None) -> dict[str, Any]:
    """Train ``method`` with ``recipe`` on the training split; write model.pt, train_log.csv, train.json.

    train.json records the wall-clock training time and the median time per optimiser step (both
    synchronised with the GPU), the peak memory (:func:`regbench.runtime.peak_memory_mb`) and the
    precision used (``mixed_precision`` applies on CUDA to methods that allow it). A method with a working grid
    (``RegistrationMethod.working_grid``) trains on batches resampled onto it; train.json records the grid.
    With the recipe's ``model_selection: val_dice``, ``checkpoint_score`` (``(net, precision) -> val Dice``:
    :func:`regbench.evaluation.selection.val_scorer`) scores the network at every checkpoint and the last one;
    model.pt is the best (a NaN score loses to any number), and train.json's ``model_selection`` lists every score
    and the iteration kept.
    Batches come from a DataLoader with ``data_workers`` processes (:func:`regbench.data.loader.worker_count`).
    """
    selection = recipe.get("model_selection", "last")
    if selection not in SELECTIONS:
        raise ValueError(f"{method.name}: model_selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "val_dice" and checkpoint_score is None:
        raise ValueError(f"{method.name}: model_selection val_dice needs its val score, checkpoint_score "
                         f"(regbench.evaluation.selection.val_scorer)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    precision = training_precision(device, mixed_precision, method.allows_mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    seed_everything(seed)
    reset_peak_memory(device)
    layout = memory_format(device, dataset.ndim, method.channels_last)
    net = method.build(dataset.ndim, recipe).to(device, memory_format=layout)
    adapter = method.grid_adapter(dataset.shape, dataset.spacing, recipe)  # the paper's grid, where it has one
    stages = method.training_stages(net, recipe)
    # with a classical tool's fields if the method needs them (results/<ds>/syn_supervision unless given)
    next_batch = training_batches(method, dataset, out_dir, recipe, supervision_folder)
    ends = list(itertools.accumulate(stage.iterations for stage in stages))
    iterations = ends[-1]
    checkpoint_every = int(recipe.get("checkpoint_every", 100))
    # val_dice: [{"iteration", "val_dice"}] of every network scored, and the best one's weights (on the CPU)
    scored, best = [], None
    log_every = int(recipe.get("log_every", 10))

    def stage_of(iteration: int) -> int:
        return bisect.bisect_right(ends, iteration)

    def begin(index: int) -> torch.optim.Optimizer:
        """Freeze every parameter outside the stage; a fresh Adam over the stage's parameters."""
        stage = stages[index]
        train_only(net, stage.parameters)
        method.start_stage(net, index, recipe)
        return adam(stage.parameters, stage.lr if stage.lr is not None else recipe["lr"], stage.adam)

    checkpoint_path = out_dir / "checkpoint.pt"
    start, log_rows, elapsed = 0, [], 0.0
    saved_optimiser = None
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if state["recipe"] == recipe and state["seed"] == seed:
            net.load_state_dict(state["net"])
            saved_optimiser = (state["stage"], state["optimiser"])
            torch.set_rng_state(state["rng"])
            start, log_rows, elapsed = state["iteration"], state["log"], state["elapsed_s"]
            scored, best = state.get("scored", []), state.get("best")
    current = stage_of(start) if start < iterations else len(stages) - 1
    optimiser = begin(current)
    if saved_optimiser is not None and saved_optimiser[0] == current:  # a checkpoint at a stage's start has none
        optimiser.load_state_dict(saved_optimiser[1])

    def save_checkpoint(iteration: int) -> None:
        with atomic_path(checkpoint_path) as tmp:
            torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(), "stage": current,
                        "rng": torch.get_rng_state(), "iteration": iteration, "log": log_rows,
                        "elapsed_s": elapsed, "recipe": recipe, "seed": seed, "scored": scored, "best": best}, tmp)

    def score_network(iteration: int) -> None:
        """model_selection val_dice: score the network after ``iteration`` steps; keep it if it is the best yet."""
        nonlocal best
        if selection != "val_dice":
            return
        score = checkpoint_score(net, precision)
        scored.append({"iteration": iteration, "val_dice": score})
        if best is None or score > best["val_dice"] or (math.isnan(best["val_dice"]) and not math.isnan(score)):
            best = {"iteration": iteration, "val_dice": score,
                    "net": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}

    net.train()
    pin, workers = device.type == "cuda", worker_count(data_workers, device)
    batches = iter(batch_loader(next_batch, range(start, iterations), int(recipe["batch_size"]), seed,
                                workers=workers, pin_memory=pin))
    bar = _progress(range(start, iterations), progress, method.name)
    started = time.perf_counter() - elapsed
    step_times = []
    for iteration in bar:
        step_start = time.perf_counter()
        if stage_of(iteration) != current:
            current = stage_of(iteration)
            optimiser = begin(current)
        step_in_stage = iteration - (ends[current] - stages[current].iterations)
        _set_learning_rate(optimiser, stages[current], recipe, step_in_stage)
        batch = in_memory_format(adapter.batch(to_device(next(batches), device, non_blocking=pin)), layout,
                                 dataset.ndim)
        terms, total = weighted_loss(method, net, batch, recipe, device, precision)
        for name, (weight, value) in terms.items():
            if not torch.isfinite(value).all():
                kept = (f"the last good checkpoint is kept at {checkpoint_path}" if checkpoint_path.exists()
                        else "no checkpoint was written before it")
                raise TrainingDiverged(f"{method.name}: loss term {name!r} is {value.item()} at iteration {iteration}; "
                                       + kept)
        optimiser_step(total, optimiser, scaler)
        synchronize(device)
        step_times.append(time.perf_counter() - step_start)
        if iteration % log_every == 0 or iteration == iterations - 1:
            row = {"iteration": iteration, "stage": stages[current].name, "loss": float(total.detach())}
            row.update({name: float(value.detach()) for name, (_, value) in terms.items()})
            log_rows.append(row)
            if progress:
                bar.set_postfix(loss=f"{float(total.detach()):.4f}")
        if (iteration + 1) % checkpoint_every == 0 and iteration + 1 < iterations:
            score_network(iteration + 1)
            elapsed = time.perf_counter() - started
            save_checkpoint(iteration + 1)
    if not scored or scored[-1]["iteration"] < iterations:  # the last network (unless a resumed run scored it)
        score_network(iterations)
    if best is not None and best["iteration"] < iterations:
        net.load_state_dict(best["net"])
    synchronize(device)
    elapsed = time.perf_counter() - started

    summary = {
        "method": method.name, "iterations": iterations, "train_time_s": elapsed,
        "resumed_from": start,  # 0, or the iteration of the checkpoint this run went on from
        "step_time_s": statistics.median(step_times) if step_times else math.nan,
        "peak_mem_mb": peak_memory_mb(device), "precision": precision,
        "parameters": parameter_count(net), "device": str(device), "data_workers": workers, "seed": seed, "recipe": recipe, **adapter.record(),
        "final_loss": log_rows[-1]["loss"] if log_rows else math.nan,
        "model_selection": {"criterion": selection, "kept_iteration": best["iteration"] if best else iterations,
                            "scores": scored},
        "provenance": provenance or {},
    }
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save({"net": net.state_dict(), "recipe": recipe, "ndim": dataset.ndim, "method": method.name}, tmp)
    write_csv(out_dir / "train_log.csv", pd.DataFrame(log_rows))
    write_json(out_dir / "train.json", summary)
    checkpoint_path.unlink(missing_ok=True)
    train_only(net, net.parameters())
    return summary


def _set_learning_rate(optimiser: torch.optim.Optimizer, stage, recipe: dict, step: int) -> None:
    """The stage's rate after its decay milestones (a function of the step alone, so resuming is exact)."""
    if stage.lr_decay is None:
        return
    milestones, gamma = stage.lr_decay
    rate = (stage.lr if stage.lr is not None else recipe["lr"]) * gamma ** bisect.bisect_right(sorted(milestones), step)
    for group in optimiser.param_groups:
        group["lr"] = rate


def load_trained(method: RegistrationMethod, model_path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """The network saved by :func:`train`, in eval mode, with its recipe."""
    state = torch.load(model_path, map_location=device, weights_only=False)
    net = method.build(state["ndim"], state["recipe"]).to(device)
    net.load_state_dict(state["net"])
    net.eval()
    return net, state["recipe"]


def _progress(iterable, enabled: bool, name: str):
    if not enabled:
        return _Quiet(iterable)
    from tqdm import tqdm

    return tqdm(iterable, desc=f"train {name}", mininterval=5.0)


class _Quiet:
    def __init__(self, iterable):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def set_postfix(self, **_):
        pass
