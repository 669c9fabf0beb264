"""Time one VoxelMorph-2 training step: regbench's implementation against voxelmorph's own.

A step is what the training loop does once: the network on (moving, fixed), the warp, local NCC
(window 9) + 1.0 * Grad-l2, backward, one Adam step (lr 1e-4). Every implementation gets the same input
tensors, threads and batch; after a warm-up their timed steps alternate (A, B, C, A, B, C, ...) so that
a change in the machine's load hits all of them alike. Medians are printed, and the ratio
regbench / official for the two networks with the same layers (below 1: regbench is faster).

The official side is whichever ``voxelmorph`` is importable:

- voxelmorph >= 0.3 (``voxelmorph.nn.models.VxmPairwise`` on neurite's ``BasicUNet``; losses from
  ``neurite.nn.modules``). Its network cannot be set to VoxelMorph-2: built as close as it goes (encoder
  [16, 32, 32, 32], decoder [32, 32, 32, 32] + one conv at full size, LeakyReLU 0.2, nearest upsampling, no
  integration), it lacks VoxelMorph-2's two full-resolution 16-channel convs and ends with a 1 x 1 conv to
  ndim channels and a 3 x 3 ndim -> ndim flow conv. So the ratio is taken against regbench with the same
  layers (decoder [32, 32, 32, 32, 32], 3 x 3 flow conv: a few hundred parameters apart); regbench's
  VoxelMorph-2 is timed too.
- voxelmorph 0.2 (``voxelmorph.torch.networks.VxmDense``, VXM_BACKEND=pytorch): VoxelMorph-2 layer for layer
  (spec/methods/voxelmorph.md), timed against regbench's max-pool VoxelMorph-2 (the same parameter count).
  Its NCC puts its kernel on "cuda" and its Grad is 3D only; where they cannot run, neurite's (>= 0.3) or
  else regbench's stand in, as the output says.

Without voxelmorph, only regbench's figures are printed.

    python benchmarks/voxelmorph_step.py                         # 2D 160x176 and 3D 80x96x112, batch 1
    python benchmarks/voxelmorph_step.py --shape 160x176 --repeats 30 --strided
    VXM_BACKEND=pytorch PYTHONPATH=/path/to/voxelmorph-0.2 python benchmarks/voxelmorph_step.py
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
from pathlib import Path

import torch

VM2 = ([16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16])
#: regbench's layers closest to voxelmorph >= 0.3's VxmPairwise built with VoxelMorph-2's features
PAIRWISE_LIKE = ([16, 32, 32, 32], [32, 32, 32, 32, 32])


def regbench_step(shape, batch, features=VM2, downsampling="maxpool"):
    """One training step through regbench's own path: the plugin's network and loss_terms."""
    from regbench.method import parameter_count
    from regbench.plugins import load_method
    from regbench.training.loop import adam

    method = load_method("voxelmorph")
    recipe = method.recipe("paper", {"features": [list(features[0]), list(features[1])], "lr": 1e-4,
                                     "downsampling": downsampling, "similarity": "ncc", "ncc_window": 9,
                                     "smoothness_weight": 1.0, "diffeomorphic": False, "dice_weight": 0.0})
    net = method.build(len(shape), recipe)
    optimiser = adam(net.parameters(), recipe["lr"])

    def step():
        terms = method.loss_terms(net, batch, recipe)
        total = sum(weight * value for weight, value in terms.values())
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()

    name = "VoxelMorph-2" if features == VM2 else f"decoder {features[1]}"
    return step, parameter_count(net), f"regbench {name} ({downsampling})"


def official_step(shape, batch):
    """``(step, parameters, label, notes, regbench features to compare with)``, or a reason it cannot run."""
    os.environ.setdefault("VXM_BACKEND", "pytorch")  # voxelmorph 0.2 defaults to TensorFlow
    if not hasattr(inspect, "getargspec"):  # voxelmorph 0.2 predates Python 3.11
        inspect.getargspec = lambda func: inspect.getfullargspec(func)[:4]
    try:
        import voxelmorph as vxm
    except ImportError as err:
        return None, f"voxelmorph is not installed ({err})"
    moving, fixed = batch["moving"], batch["fixed"]
    ndim = len(shape)
    notes = []
    try:
        import neurite as ne

        neurite_ncc, neurite_grad = ne.nn.modules.NCC(window_size=9), ne.nn.modules.SpatialGradient("l2")
    except (ImportError, AttributeError):
        neurite_ncc = neurite_grad = None

    if hasattr(vxm, "nn") and hasattr(vxm.nn, "models") and hasattr(vxm.nn.models, "VxmPairwise"):
        net = vxm.nn.models.VxmPairwise(
            ndim, 1, 1, nb_features=[VM2[0], VM2[1][:4]], activations=torch.nn.LeakyReLU(0.2),
            integration_steps=0, unet_kwargs={"upsample_mode": "nearest"})
        label, compare_with = f"voxelmorph {vxm.__version__} VxmPairwise (maxpool)", PAIRWISE_LIKE

        def loss():
            field, warped = net(moving, fixed, return_warped_source=True)
            return -neurite_ncc(fixed, warped).mean() + 1.0 * neurite_grad(field)
    elif hasattr(vxm, "networks") and hasattr(vxm.networks, "VxmDense"):
        net = vxm.networks.VxmDense(list(shape), nb_unet_features=[VM2[0], VM2[1]], int_steps=0)
        label, compare_with = f"voxelmorph {vxm.__version__} VxmDense VoxelMorph-2 (maxpool)", VM2
        if moving.is_cuda:
            ncc = vxm.losses.NCC([9] * ndim).loss
        elif neurite_ncc is not None:
            ncc = lambda f, w: -neurite_ncc(f, w).mean()  # noqa: E731
            notes.append("NCC from neurite (voxelmorph 0.2's NCC puts its kernel on CUDA)")
        else:
            from regbench.blocks.losses import local_ncc as ncc

            notes.append("NCC from regbench (voxelmorph 0.2's NCC puts its kernel on CUDA)")
        if ndim == 3:
            grad = lambda u: vxm.losses.Grad("l2").loss(None, u)  # noqa: E731
        elif neurite_grad is not None:
            grad = neurite_grad
            notes.append("Grad from neurite (voxelmorph 0.2's Grad is 3D only)")
        else:
            from regbench.blocks.losses import gradient_smoothness as grad

            notes.append("Grad from regbench (voxelmorph 0.2's Grad is 3D only)")

        def loss():
            warped, field = net(moving, fixed)
            return ncc(fixed, warped) + 1.0 * grad(field)
    else:
        return None, f"voxelmorph {getattr(vxm, '__version__', '?')} has neither VxmPairwise nor VxmDense"
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        total = loss()
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()

    parameters = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return (step, parameters, label, notes, compare_with), None


def time_steps(steps: dict, warmup: int, repeats: int) -> dict:
    """Median seconds a step for each named step function, repeats interleaved."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(shape, batch_size: int, warmup: int, repeats: int, strided: bool) -> list[float]:
    torch.manual_seed(0)
    batch = {"moving": torch.rand(batch_size, 1, *shape), "fixed": torch.rand(batch_size, 1, *shape)}
    print(f"\n== {len(shape)}D {'x'.join(map(str, shape))}, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"{warmup} warm-up + {repeats} timed steps each (median) ==")
    official, why_not = official_step(shape, batch)
    steps, parameters, pairs = {}, {}, []

    def add(step, count, label):
        steps[label], parameters[label] = step, count
        return label

    mine = add(*regbench_step(shape, batch))
    if official is None:
        print(f"official implementation: not timed, {why_not}")
    else:
        step, count, label, notes, compare_with = official
        theirs = add(step, count, label)
        if compare_with != VM2:
            mine = add(*regbench_step(shape, batch, compare_with))
        pairs.append((mine, theirs))
        for note in notes:
            print(f"note: {note}")
    if strided:
        add(*regbench_step(shape, batch, VM2, "strided"))
    for name, seconds in time_steps(steps, warmup, repeats).items():
        steps[name] = seconds
        print(f"{name:<60} {seconds * 1e3:9.1f} ms/step {parameters[name]:>8} parameters")
    ratios = []
    for mine, theirs in pairs:
        ratios.append(steps[mine] / steps[theirs])
        print(f"ratio regbench / official (same layers): {ratios[-1]:.3f}")
    return ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="e.g. 160x176 or 80x96x112 (repeatable; default: both)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 in 2D, 5 in 3D")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strided", action="store_true",
                        help="also time regbench's strided VoxelMorph-2 (the recipes' network)")
    parser.add_argument("--readme", type=Path, help="write the ratios into this README (<!-- voxelmorph-step -->)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    figures = []
    for text in args.shape or ["160x176", "80x96x112"]:
        shape = tuple(int(s) for s in text.lower().split("x"))
        ratios = run(shape, args.batch, args.warmup, args.repeats or (20 if len(shape) == 2 else 5), args.strided)
        figures += [f"{r:.2f} in {len(shape)}D {text}" for r in ratios]
    if args.readme:
        from readme_figures import write_between_markers

        from regbench.runtime import git_commit

        if figures:
            import voxelmorph
            text = "; ".join(figures) + f" (voxelmorph {voxelmorph.__version__}, {args.threads} threads)"
        else:
            text = "not measured: voxelmorph is not installed"
        commit = git_commit(Path(__file__).resolve().parents[1])
        write_between_markers(args.readme, "voxelmorph-step", f"{text} (commit `{commit[:12]}`)", inline=True)
        print(f"wrote the figures into {args.readme}")


if __name__ == "__main__":
    main()
