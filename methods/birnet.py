"""BIRNet: a patch FCN dual-supervised by a registration tool's deformations and by the image difference.

Fan, Cao, Yap and Shen (MedIA 2019) train a U-Net-like fully convolutional network on patches: an input
patch of 64^3 voxels (64^2 in 2D) gives the displacement of the central 24^3, since every convolution is
valid (unpadded). The input has several channels ("multi-source"): the template T, the subject S,
their difference map T - S and gradient maps. Skip connections pass through extra convolutions ("gap
filling") that bridge low-level encoder and high-level decoder features. The loss is "dual":

- ground-truth guidance, hierarchical: the decoder gives displacements at three resolutions (24^3,
  14^3 and 9^3 for a 64^3 input), each compared (squared L2) with the registration tool's deformation
  sampled at that resolution and expressed in that resolution's voxels;
- image-dissimilarity guidance: the squared difference between T and the subject warped by the
  finest output, which keeps the network from copying the tool's errors.

There is no smoothness term: the ground-truth term regularises. At inference, input patches overlapping
by 40 voxels are cut at a stride of the output size, and the output patches are stitched (averaged where
they overlap, for a smaller ``inference_stride``) into the whole displacement. With valid convolutions a
tile's output is what the network would give on the whole image, so tiles cut at a stride that is a
multiple of 4 (the pooling factor) agree exactly where they overlap; other strides average tiles of
different pooling phases.

No official code exists, and only the abstract and third-party notes of the paper could be read (see
spec/methods/birnet.md): the tool, the layers, the gap filling, the gradient maps, the lower-resolution ground
truth, the patch sampling and every loss weight, width and schedule are regbench's reading, each a deviation in
``Method.deviations`` (and a recipe key where that is cheap). The output voxel centres follow from the layer
arithmetic: input positions 20 + t (full), 18.5 + 2t (half), 15.5 + 4t (quarter) of a 64 patch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.losses import mse
from regbench.blocks.patches import (centre_crop, crop, foreground_corners, output_corners, pad_for_patches,
                                     random_corners, sample_at, stitch)
from regbench.blocks.spatial import identity_grid

#: voxels before the full output's corner where each resolution's ground-truth blocks start: output voxel
#: t of the half (quarter) resolution averages the 2^d (4^d) voxels from corner - 2 + 2t (corner - 6 + 4t),
#: centred at input 18.5 + 2t (15.5 + 4t) of a 64 patch whose full output starts at input 20
_LEVEL_OFFSET = {1: 0, 2: 2, 4: 6}

_COMMON = {
    "patch_size": 64,                 # input patch (voxels per axis); the output is patch_size - 40
    "gradient_maps": "magnitude",     # "magnitude" (|grad T|, |grad S|) or "axes" (every partial derivative)
    "bn_momentum": 0.01,              # batch norm's running statistics: the last ~100 steps' mean
    "gt_weight_full": 1.0,            # alpha at 24^3: squared distance to the tool's displacement
    "gt_weight_half": 1.0,            # alpha at 14^3 (half-resolution voxels)
    "gt_weight_quarter": 1.0,         # alpha at 9^3 (quarter-resolution voxels)
    "dissimilarity_weight": 100.0,    # beta: mean (T - S o phi)^2 on the full output
    "patch_sampling": "uniform",      # training patches anywhere in the image ("foreground": centred in the brain)
    "inference_stride": 24,           # output tiles side by side (input patches overlap by 40)
    "inference_batch": 16,            # patches per forward pass when registering
}


class Method(RegistrationMethod):
    name = "birnet"
    citation = ("J. Fan, X. Cao, P.-T. Yap, D. Shen. BIRNet: Brain image registration using dual-supervised "
                "fully convolutional networks. Medical Image Analysis 54:193-206, 2019. arXiv:1802.04692.")
    needs_supervision = True
    # The image-dissimilarity weight against the supervised fields (regbench's reading: 100) and the rate.
    search_space = {"dissimilarity_weight": SearchRange(10.0, 1000.0, "log"), "lr": SearchRange(1e-5, 1e-2, "log")}
    recipes = {
        # The paper's patch sizes and loss structure; widths, weights and the schedule are UNVERIFIED.
        "paper": {
            **_COMMON,
            "widths": [64, 128, 256],
            "gap_fill_convs": 2,          # valid 3^d convs on each skip connection (0: a plain U-Net skip)
            "patches_per_pair": 8,
            "supervision_pairs": 400,     # SyN-registered training pairs (regbench.training.supervision)
            "iterations": 50_000,
            "batch_size": 2,
            "lr": 1e-4,
            "log_every": 100,
            "checkpoint_every": 1000,
        },
        # The default CPU run (embedded2d, 176 x 176): an eighth of the widths, one gap-filling conv,
        # 8 patches a step, 100 SyN pairs, a 10x step size: about 24 s of one CPU thread (0.031 s a step).
        # 750 steps: the val curve (13 pairs, seeds 0/1, the tuned values of 1500 steps) is flat past them,
        # 0.678/0.653, 0.690/0.665, 0.696/0.637 after 750, 1125, 1500 (benchmarks/budget_curve.py).
        "quick": {
            **_COMMON,
            "widths": [8, 16, 32],
            "gap_fill_convs": 1,
            "patches_per_pair": 4,
            "supervision_pairs": 100,
            "iterations": 750,
            "batch_size": 2,
            "lr": 1e-3,
            "log_every": 10,
            "checkpoint_every": 250,
        },
    }

    #: No official code: every entry is regbench's reading of the abstract and third-party notes (UNVERIFIED).
    deviations = (
        Deviation("Ground truth: ANTs SyN, as regbench's syn baseline runs it",
                  "The paper's tool is unverified (the spec recalls SyN); the fields are computed offline by "
                  "regbench.training.supervision with the syn recipe of the config (supervision_pairs pairs)."),
        Deviation("Training pairs: the fixed and moving images of any training pair, not subjects to a template",
                  "The paper registered subjects S to one template T; the benchmark registers pairs, so T is the "
                  "fixed and S the moving image."),
        Deviation("Layers: two valid 3^d convs a level with BatchNorm and ReLU, 2x max pooling, 2x transposed "
                  "convs", "The spec's reconstruction from the patch sizes 64 -> 24 with side outputs 14 and 9 "
                  "(64, 60, 30, 26, 13, 9, 18, 14, 28, 24); the paper's exact layers are unverified."),
        Deviation("Gap filling: gap_fill_convs valid 3^d convs (BatchNorm, ReLU) on each skip, before its centre "
                  "crop", "The paper's gap-filling design is unverified; 2 a skip in the paper recipe, 1 in the "
                  "quick one."),
        Deviation("Output heads: 1^d convs to ndim channels, initialised near zero (std 1e-5)",
                  "The paper's heads and their initialisation are unverified; near zero starts from the identity."),
        Deviation("Gradient maps: the gradient magnitude of T and of S (central differences), 5 input channels",
                  "Which gradients the paper uses is unverified; gradient_maps 'axes' gives every partial "
                  "derivative of both (3 + 2 ndim channels)."),
        Deviation("Lower-resolution ground truth: the tool's displacement averaged over the 2^d (4^d) voxels of an "
                  "output voxel, divided by 2 (4)", "The paper's procedure is unverified; the average is centred "
                  "exactly on the half (quarter) resolution voxel and expressed in its units."),
        Deviation("Dissimilarity: the mean squared difference over the full output patch, the subject sampled "
                  "from the whole image (linear, zeros outside)", "The paper's exact form is unverified; "
                  "displacements may reach past the input patch."),
        Deviation("No smoothness term", "None is reported in what could be read (unverified): the ground-truth "
                  "term regularises."),
        Deviation("Loss weights: 1 for each ground-truth level, 100 for the image term",
                  "The paper's alpha and beta are unverified. Intensities in [0, 1] make the squared image error "
                  "about a thousand times smaller than the displacement's (voxels^2); at 100 it is about a tenth "
                  "of the loss at the start."),
        Deviation("Widths (64, 128, 256) a level", "The paper's widths are unverified: a 3D U-Net's.",
                  recipes=("paper",)),
        Deviation("BatchNorm's running statistics with momentum 0.01 (PyTorch's default 0.1)",
                  "The paper's normalisation is unverified; with a few patches a step, statistics averaged over "
                  "the last ~100 steps rather than ~10 keep the last steps' patches from swaying evaluation."),
        Deviation("Training patches: output patches drawn uniformly inside the image, 8 a pair (4 in the quick "
                  "recipe)", "The paper's sampling is unverified; patch_sampling 'foreground' centres them on the "
                  "fixed image's brain."),
        Deviation("Optimiser: Adam at 1e-4, 50k iterations of 2 pairs",
                  "The paper's optimiser, rate, iterations and batch are unverified.", recipes=("paper",)),
    )

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return BIRNetFCN(ndim, input_channel_count(ndim, recipe["gradient_maps"]), recipe["widths"],
                         recipe["gap_fill_convs"], recipe["patch_size"], recipe["bn_momentum"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        if "supervision" not in batch:
            raise ValueError("birnet: the batch has no 'supervision' (the SyN displacements of the training pairs, "
                             "rule syn_supervision)")
        fixed, moving, truth = batch["fixed"], batch["moving"], batch["supervision"]
        size, out = net.patch_size, net.out_size
        patches, truths, corners = [], [], []
        inputs = pad_for_patches(input_channels(fixed, moving, recipe["gradient_maps"]), size, out)
        # the quarter level averages the truth over 6 voxels past the output patch: continue the border
        truth = F.pad(truth, [_LEVEL_OFFSET[4]] * 2 * net.ndim, mode="replicate")
        for b in range(fixed.shape[0]):
            for corner in patch_corners(fixed[b, 0], out, recipe["patches_per_pair"], recipe["patch_sampling"]):
                patches.append(crop(inputs[b:b + 1], corner, size))
                truths.append(crop(truth[b:b + 1], corner, out + 2 * _LEVEL_OFFSET[4]))
                corners.append((b, corner))
        prediction = net(torch.cat(patches))
        targets = level_targets(torch.cat(truths), out)
        terms = {
            f"gt_{level}": (recipe[f"gt_weight_{level}"], squared_distance(getattr(prediction, level), target))
            for level, target in targets.items()
        }
        warped, template = warp_output_patches(fixed, moving, prediction.full, corners)
        terms["dissimilarity"] = (recipe["dissimilarity_weight"], mse(template, warped))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        size, out = net.patch_size, net.out_size
        shape = fixed.shape[2:]
        inputs = pad_for_patches(input_channels(fixed, moving, recipe["gradient_maps"]), size, out)
        corners = output_corners(shape, out, recipe["inference_stride"])
        chunk = max(1, int(recipe["inference_batch"]))
        fields = []
        with torch.no_grad():
            for b in range(fixed.shape[0]):
                tiles = []
                for start in range(0, len(corners), chunk):
                    patches = torch.cat([crop(inputs[b:b + 1], c, size) for c in corners[start:start + chunk]])
                    tiles.append(net(patches).full)
                fields.append(stitch(torch.cat(tiles), corners, shape))
        return torch.cat(fields)


# --------------------------------------------------------------------------------------------- inputs


def patch_corners(fixed: torch.Tensor, out: int, count: int, sampling: str) -> list[list[int]]:
    """Output corners of the training patches of one pair (torch's global generator: seeded and
    checkpointed by the training loop). "uniform": anywhere inside the image; "foreground": the output
    patch centred on a voxel where the fixed image is nonzero (the brain of a skull-stripped image)."""
    if sampling == "uniform":
        return random_corners(fixed.shape, out, count).tolist()
    if sampling == "foreground":
        return foreground_corners(fixed > 0, out, count).tolist()
    raise ValueError(f"birnet: patch_sampling must be 'uniform' or 'foreground', got {sampling!r}")



def input_channel_count(ndim: int, gradient_maps: str) -> int:
    if gradient_maps == "magnitude":
        return 5
    if gradient_maps == "axes":
        return 3 + 2 * ndim
    raise ValueError(f"birnet: gradient_maps must be 'magnitude' or 'axes', got {gradient_maps!r}")


def input_channels(fixed: torch.Tensor, moving: torch.Tensor, gradient_maps: str = "magnitude") -> torch.Tensor:
    """The multi-source input ``B x C x *spatial``: T, S, T - S, then the gradient maps of T and of S
    (central differences, one-sided at the border): their magnitudes, or every partial derivative."""
    if fixed.shape != moving.shape or fixed.shape[1] != 1:
        raise ValueError(f"birnet registers single-channel images of one shape: fixed {tuple(fixed.shape)}, "
                         f"moving {tuple(moving.shape)}")
    input_channel_count(fixed.ndim - 2, gradient_maps)  # validates the name
    dims = tuple(range(2, fixed.ndim))
    maps = []
    for image in (fixed, moving):
        partials = torch.gradient(image, dim=dims)
        if gradient_maps == "magnitude":
            maps.append(torch.sqrt(sum(p.square() for p in partials)))
        else:
            maps.extend(partials)
    return torch.cat([fixed, moving, fixed - moving, *maps], dim=1)


# --------------------------------------------------------------------------------------------- losses


def level_targets(truth: torch.Tensor, out: int) -> dict[str, torch.Tensor]:
    """The tool's displacement at the three output resolutions, each in that resolution's voxels.

    ``truth``: ``N x ndim x *(out + 12)``, the displacement over each output patch and 6 voxels around
    it. Full: its centre ``out``; half: the mean over 2^d blocks of its centre ``out + 4``, / 2; quarter:
    the mean over 4^d blocks of all of it, / 4 (sizes 24, 14 and 9 for ``out`` 24).
    """
    pool = getattr(F, f"avg_pool{truth.ndim - 2}d")
    half = centre_crop(truth, out + 2 * _LEVEL_OFFSET[2])
    return {"full": centre_crop(truth, out), "half": pool(half, 2) / 2, "quarter": pool(truth, 4) / 4}


def squared_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_p ||prediction(p) - target(p)||^2``: the squared Euclidean distance (summed over the ndim
    components, voxels^2) averaged over patches and voxels."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return (prediction - target).square().sum(1).mean()


def warp_output_patches(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
                        corners: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(S o phi, T) on each output patch: the moving image of the patch's pair sampled at ``corner + t +
    u(t)`` (whole image, so u may reach past the input patch) and the fixed image's output patch.

    ``displacement``: ``N x ndim x *out``; ``corners``: ``N`` pairs ``(batch index, corner)``.
    """
    out = displacement.shape[2:]
    grid = identity_grid(out, displacement.device, displacement.dtype)
    warped, template = [], []
    for (b, corner), u in zip(corners, displacement):
        offset = torch.tensor(corner, device=u.device, dtype=u.dtype).view(-1, *([1] * len(out)))
        warped.append(sample_at(moving[b:b + 1], (grid + offset + u)[None]))
        template.append(crop(fixed[b:b + 1], corner, out))
    return torch.cat(warped), torch.cat(template)


# --------------------------------------------------------------------------------------------- network


class Prediction(NamedTuple):
    full: torch.Tensor      # N x ndim x *out (24): the displacement, in voxels
    half: torch.Tensor      # N x ndim x *(out / 2 + 2) (14): in half-resolution voxels
    quarter: torch.Tensor   # N x ndim x *(out / 4 + 3) (9): in quarter-resolution voxels


def _block(ndim: int, channels_in: int, channels_out: int, momentum: float) -> list[nn.Module]:
    """A valid 3^d convolution, batch norm (running statistics updated with ``momentum``), ReLU (two
    voxels shorter along each axis)."""
    return [getattr(nn, f"Conv{ndim}d")(channels_in, channels_out, 3),
            getattr(nn, f"BatchNorm{ndim}d")(channels_out, momentum=momentum), nn.ReLU(inplace=True)]


def _double(ndim: int, channels_in: int, channels_out: int, momentum: float) -> nn.Sequential:
    return nn.Sequential(*_block(ndim, channels_in, channels_out, momentum),
                         *_block(ndim, channels_out, channels_out, momentum))


def _head(ndim: int, channels: int) -> nn.Module:
    layer = getattr(nn, f"Conv{ndim}d")(channels, ndim, 1)
    nn.init.normal_(layer.weight, 0.0, 1e-5)
    nn.init.zeros_(layer.bias)
    return layer


def patch_sizes(patch_size: int) -> tuple[int, int, int]:
    """(full, half, quarter) output sizes of the valid-convolution network for an input ``patch_size``."""
    first = patch_size - 4
    second = first // 2 - 4
    quarter = second // 2 - 4
    if first % 2 or second % 2 or quarter < 1:
        raise ValueError(f"birnet: patch_size {patch_size} does not halve exactly through the network "
                         "(64, 72, 80, ... do: patch_size - 4 must be a multiple of 8, at least 48)")
    half = 2 * quarter - 4
    return 2 * half - 4, half, quarter


class BIRNetFCN(nn.Module):
    """Valid-convolution U-Net: ``N x C x *patch`` -> displacements at the full, half and quarter output.

    Encoder: two convs, pool, two convs, pool, two convs (quarter output). Decoder: up-conv, concat the
    gap-filled, centre-cropped skip, two convs (half output), the same again (full output).
    """

    def __init__(self, ndim: int, in_channels: int, widths=(16, 32, 64), gap_fill_convs: int = 2,
                 patch_size: int = 64, bn_momentum: float = 0.1):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"birnet: widths lists the channels of the three levels, got {widths!r}")
        self.out_size, self.half_size, self.quarter_size = patch_sizes(patch_size)
        if not 0 <= gap_fill_convs <= 4:
            raise ValueError(f"birnet: gap_fill_convs must be 0 to 4 (the skip at half resolution is 8 voxels "
                             f"larger than the decoder there), got {gap_fill_convs}")
        self.ndim, self.patch_size = ndim, patch_size
        w1, w2, w3 = widths
        transposed = getattr(nn, f"ConvTranspose{ndim}d")
        self.pool = getattr(nn, f"MaxPool{ndim}d")(2)
        m = bn_momentum
        self.encoder1 = _double(ndim, in_channels, w1, m)
        self.encoder2, self.encoder3 = _double(ndim, w1, w2, m), _double(ndim, w2, w3, m)
        self.gap1 = nn.Sequential(*[layer for _ in range(gap_fill_convs) for layer in _block(ndim, w1, w1, m)])
        self.gap2 = nn.Sequential(*[layer for _ in range(gap_fill_convs) for layer in _block(ndim, w2, w2, m)])
        self.up2, self.up1 = transposed(w3, w2, 2, stride=2), transposed(w2, w1, 2, stride=2)
        self.decoder2, self.decoder1 = _double(ndim, 2 * w2, w2, m), _double(ndim, 2 * w1, w1, m)
        self.head_quarter, self.head_half, self.head_full = _head(ndim, w3), _head(ndim, w2), _head(ndim, w1)

    def forward(self, x: torch.Tensor) -> Prediction:
        if x.ndim != self.ndim + 2 or any(s != self.patch_size for s in x.shape[2:]):
            raise ValueError(f"birnet expects N x C x {' x '.join([str(self.patch_size)] * self.ndim)} patches, "
                             f"got {tuple(x.shape)}")
        skip1 = self.encoder1(x)                               # 60
        skip2 = self.encoder2(self.pool(skip1))                # 26
        bottom = self.encoder3(self.pool(skip2))               # 9
        up = self.up2(bottom)                                  # 18
        half = self.decoder2(torch.cat([up, centre_crop(self.gap2(skip2), up.shape[2:])], 1))  # 14
        up = self.up1(half)                                    # 28
        full = self.decoder1(torch.cat([up, centre_crop(self.gap1(skip1), up.shape[2:])], 1))  # 24
        return Prediction(self.head_full(full), self.head_half(half), self.head_quarter(bottom))
