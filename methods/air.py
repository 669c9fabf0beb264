"""AiR: registration as translation, with parallel patch Transformers of several patch sizes (MAPT).

Wang and Delingette (arXiv:2105.02282) register 64 x 64 patches cut from the images at their own resolution.
Both patches are cut into non-overlapping p^d blocks: one image's block tokens go through a Transformer encoder
(the memory), the other image's tokens are the decoder's queries, which cross-attend to it; each decoder output
becomes a tanh-bounded displacement (normalised units, [-1, 1] spans the patch). Branches with block sizes 8, 16
and 32 run in parallel (the multi-scale attention parallel Transformer, MAPT): their coarse grids are upsampled
(bicubic) to the finest one (8 x 8, one value an 8-voxel block) and mixed with learnable weights
``w1 v1 + w2 v2 + (1 - w1 - w2) v3`` (initialised 0.7, 0.2); the mixed control grid is interpolated to the
patch with cubic (Catmull-Rom) interpolation on corner-aligned positions (control values 63 / 7 = 9 voxels
apart, as the code's ``bicubic_interp_2d``) and the moving patch is warped bilinearly, 0 outside it (the code's
sampler clamps its corner indices, and the clamped weights cancel outside the patch). Each branch: a linear
block embedding and a learned positional embedding (N(0, 1) initialised) shared by both images, a post-norm
``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` of depth 1 (d_model 128, feed-forward 2048, ReLU, no
dropout) with 128, 64 and 32 heads. The loss is the similarity of the warped patch alone (no regulariser:
smoothness comes from the coarse grid, the tanh bound and the interpolation).

Here the network sees ``tile_size``^d tiles at the dataset's resolution: a whole image is registered tile by tile
(:func:`register_by_tiles`), and training draws one of those tiles a pair (the same corner in both images). The released
code (github.com/MatheoZihaoWang/AIR_Transformer_Image_Registration) is followed where it runs;
``Method.deviations`` lists every departure from it and from the paper, spec/methods/air.md what could not be
checked. 2D and 3D share the code (3D blocks are p^3, the cubic interpolations tensor products).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.method import TrainingStage
from regbench.blocks.losses import global_ncc, gradient_smoothness, mse, robust_loss
from regbench.blocks.patches import blend, crop, output_corners
from regbench.blocks.spatial import warp

_COMMON = {
    "tile_size": 64,                # the network's input: tile_size^d voxels at the dataset's resolution (code: 64)
    "tile_stride": 32,              # voxels between the tiles that register a whole image (overlap 64 - 32)
    "tiles_per_pass": 32,           # tiles a forward pass when registering (memory only)
    "patch_sizes": [8, 16, 32],     # one parallel Transformer a block size, finest first
    "fusion_weights": [0.7, 0.2],   # initial w1, w2 (learned); the last branch gets 1 - w1 - w2
    "query_image": "fixed",         # decoder queries: "fixed" (released code) or "moving" (the paper's wording)
    "depth": 1,                     # encoder and decoder layers per branch
    "similarity": "robust",         # "robust" (code's default path), "mse" (_jaco variant), "ncc" (global)
    "robust_alpha": 0.5,
    "robust_scale": 0.3,            # intensity units (images in [0, 1])
    "smoothness_weight": 0.0,       # diffusion on the mixed control grid; 0 in the code's default path
    "padding_mode": "zeros",        # outside the training tile: 0, as the code's sampler
}


class Method(RegistrationMethod):
    name = "air"
    citation = ("Z. Wang, H. Delingette. Attention for Image Registration (AiR): an unsupervised Transformer "
                "approach. arXiv:2105.02282, 2021 (revised 2023).")
    # No regulariser in the code's default path (smoothness_weight 0): the rate alone.
    search_space = {"lr": SearchRange(1e-5, 1e-2, "log")}
    recipes = {
        # The released code's config.py and main_brain.py: 64 x 64 patches, d_model 128, heads 128/64/32,
        # Adam 1e-4 halved every 200 steps (StepLR(200, 0.5)), one patch pair a step, 10,000 iterations.
        "paper": {
            **_COMMON,
            "dim": 128,
            "heads": [128, 64, 32],
            "feedforward": 2048,
            "zero_head": False,         # PyTorch's default initialisation of the output layer (the code)
            "iterations": 10_000,
            "batch_size": 1,
            "lr": 1e-4,
            "lr_step": 200,             # StepLR(200, 0.5)
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176 slices): every branch and the same loss on a lighter
        # network (d_model 32, feed-forward 128, heads 4/2/1: the spec's light configuration halved), the output
        # layer started at zero (the identity), 16 tile pairs a step at a constant lr 1e-3 (some 36 ms a step of
        # one core, 30 s in all). On the val split (13 pairs; seeds 0 and 1) the network matches no registration
        # (Dice 0.63) for some 500 steps, then learns: 0.68 after 800 steps, 0.69 after 900. The spec's d_model
        # 64 with 8 tiles a step needed some 1,200 steps to leave 0.63.
        "quick": {
            **_COMMON,
            "dim": 32,
            "heads": [4, 2, 1],
            "feedforward": 128,
            "zero_head": True,          # start from the identity
            "iterations": 800,
            "batch_size": 16,
            "lr": 1e-3,
            "lr_step": 0,               # constant rate
            "checkpoint_every": 800,
            "log_every": 10,
        },
    }
    deviations = (
        Deviation("Decoder queries are the fixed image's blocks, the encoder reads the moving image "
                  "(query_image 'fixed')",
                  "the released code does so (its moving image enters the argument named img_fix), which puts the "
                  "output tokens on the fixed grid as backward warping wants; the paper's wording (fixed image to "
                  "the encoder, moving image as queries) is query_image 'moving'"),
        Deviation("A whole image is registered by overlapping 64-voxel tiles 32 voxels apart, their fields blended "
                  "with a raised-cosine window",
                  "the code registers and scores each 64 x 64 patch on its own; regbench scores whole images, so "
                  "each voxel takes the tiles that cover it, weighted toward their centres (no step where a tile "
                  "ends), an axis shorter than a tile padded with 0 at its end"),
        Deviation("Training tiles are the registration's tiles (64 voxels, 32 apart), one drawn a pair a step, at "
                  "the same corner in both images",
                  "the code's patch extraction (patchlization_for_training, data/loader.py) is missing from its "
                  "repository, so how it cut training patches cannot be checked; on the val split, tiles drawn "
                  "anywhere left the quick run at no registration for longer"),
        Deviation("No pre-alignment of a pair and the dataset's [0, 1] intensities",
                  "the code's missing loader aligns each pair ('alginment') and normalises the patches before "
                  "training; neither step can be checked"),
        Deviation("The default loss RobustLOSS(0.5)(warped, fixed, 0.3) is read as Barron's general robust loss, "
                  "alpha 0.5, scale 0.3 in [0, 1] intensity units, averaged over voxels",
                  "its definition (utils/constrains.py) is missing from the repository and the paper's loss "
                  "section could not be consulted (UNVERIFIED)"),
        Deviation("Sampling maps [-1, 1] to the first and last voxel centres and fades to 0 over the voxel past "
                  "the border",
                  "the code maps [-1, 1] to [0, W] (its identity stretches the patch by W / (W - 1) and samples "
                  "its last row and column as 0) and drops to 0 at once past the last voxel; a difference within "
                  "one voxel, not reproduced"),
        Deviation("Displacement channels in array-axis order",
                  "the code's channel 0 is x (width); the head is learned, so only the naming differs",
                  changes_results=False),
        Deviation("3D: p^3 blocks, 64^3 tiles and tensor-product cubic interpolations",
                  "the paper and its code are 2D; regbench runs the same network on volumes"),
        Deviation("similarity 'mse' leaves out the _jaco variant's folding penalty",
                  "the code computes that penalty in NumPy on a detached field, so it has no gradient",
                  recipes=(), changes_results=False),
        Deviation("similarity 'ncc' scores one direction",
                  "the _cycle variant also predicts the reverse field and scores it (bidirectional global NCC, "
                  "block sizes 2/4/8, depths 1/2/4, dropout 0.1)",
                  recipes=()),
        Deviation("smoothness_weight > 0 adds a diffusion term on the mixed control grid (normalised units)",
                  "the code's default path has none; it computes Grad(v) in a commented-out line",
                  recipes=()),
        Deviation("The output layer starts at zero (zero_head): an untrained network is the identity",
                  "with PyTorch's default initialisation (the code, paper recipe) it warps by a random field of "
                  "up to half a tile, which a short run does not undo",
                  recipes=("quick",)),
        Deviation("A constant learning rate 1e-3 (lr_step 0)",
                  "the code steps StepLR(200, 0.5) every iteration, which takes 1e-4 below 1e-8 by about 3,000 of "
                  "its 10,000 iterations (the paper recipe does the same); a short run needs a steady rate",
                  recipes=("quick",)),
    )

    def training_stages(self, net: nn.Module, recipe: dict) -> list:
        """One stage; with ``lr_step`` the rate halves every ``lr_step`` steps (the code's StepLR)."""
        iterations, step = int(recipe["iterations"]), int(recipe["lr_step"])
        decay = (list(range(step, iterations, step)), 0.5) if step > 0 else None
        return [TrainingStage("all", iterations, list(net.parameters()), lr_decay=decay)]

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return AiRNet(ndim, recipe["tile_size"], recipe["patch_sizes"], recipe["dim"], recipe["heads"],
                      recipe["feedforward"], recipe["depth"], recipe["fusion_weights"], recipe["query_image"],
                      recipe["zero_head"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = training_tiles(batch["fixed"], batch["moving"], net.tile_size, recipe["tile_stride"])
        out = net(fixed, moving)
        warped = warp(moving, out.displacement, padding_mode=recipe["padding_mode"])
        terms = {"similarity": (1.0, _similarity(recipe)(fixed, warped))}
        if recipe["smoothness_weight"] > 0:
            terms["smoothness"] = (recipe["smoothness_weight"], gradient_smoothness(out.control))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return register_by_tiles(net, fixed, moving, recipe["tile_stride"], recipe["tiles_per_pass"])


def _similarity(recipe: dict):
    kind = recipe["similarity"]
    if kind == "robust":
        return lambda fixed, warped: robust_loss(fixed, warped, recipe["robust_alpha"], recipe["robust_scale"])
    if kind == "mse":
        return mse
    if kind == "ncc":
        return global_ncc
    raise ValueError(f"air: similarity must be 'robust', 'mse' or 'ncc', got {kind!r}")


def pad_to_tile(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` with 0 appended along every spatial axis shorter than ``size``."""
    pads = []
    for n in reversed(image.shape[2:]):  # F.pad takes the last axis first
        pads += [0, max(0, size - n)]
    return F.pad(image, pads) if any(pads) else image


def training_tiles(fixed: torch.Tensor, moving: torch.Tensor, size: int,
                   stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile a pair, drawn (torch's generator) among the tiles that register the image (:func:`register_by_tiles`)
    and cut at the same corner in both images."""
    fixed, moving = pad_to_tile(fixed, size), pad_to_tile(moving, size)
    corners = output_corners(fixed.shape[2:], size, stride)
    picks = torch.randint(len(corners), (fixed.shape[0],)).tolist()
    return (torch.cat([crop(x[b:b + 1], corners[i], size) for b, i in enumerate(picks)]) for x in (fixed, moving))


def register_by_tiles(net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, stride: int,
                      tiles_per_pass: int = 32) -> torch.Tensor:
    """The displacement (``B x ndim x *spatial``, voxels) of whole images registered tile by tile.

    Tiles of ``net.tile_size`` voxels start every ``stride`` voxels along each axis, the last one flush with the
    far border (an axis shorter than a tile is padded with 0 at its end, as the sampler sees outside the image);
    each tile's field is predicted from that tile of both images alone, and overlapping fields are blended with
    :func:`regbench.blocks.patches.blend` (weights falling toward a tile's inner edges, flat at the image's border).
    """
    size, shape = net.tile_size, fixed.shape[2:]
    fixed, moving = pad_to_tile(fixed, size), pad_to_tile(moving, size)
    padded = fixed.shape[2:]
    corners = output_corners(padded, size, stride)
    fields = []
    for b in range(fixed.shape[0]):
        tiles = []
        for start in range(0, len(corners), tiles_per_pass):
            chunk = corners[start:start + tiles_per_pass]
            pair = [torch.cat([crop(x[b:b + 1], c, size) for c in chunk]) for x in (fixed, moving)]
            tiles.append(net(*pair).displacement)
        fields.append(blend(torch.cat(tiles), corners, padded))
    return torch.cat(fields)[(slice(None), slice(None), *(slice(0, n) for n in shape))]


class Prediction(NamedTuple):
    displacement: torch.Tensor   # B x ndim x *tile, voxels
    control: torch.Tensor        # the mixed control grid, B x ndim x *(tile_size / p_min), normalised units
    branches: list               # each branch's own grid, before upsampling


class PatchTransformer(nn.Module):
    """One MAPT branch: p^d patches -> shared embedding + learned positions -> encoder / decoder -> tanh(Linear).

    ``forward(memory_image, query_image)`` returns ``B x ndim x *grid`` (grid = input size / p per axis),
    one displacement a query patch, in normalised units (each component in (-1, 1)).
    """

    def __init__(self, ndim: int, grid: Sequence[int], patch: int, dim: int, heads: int, feedforward: int,
                 depth: int = 1, zero_head: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"air: d_model {dim} is not divisible by {heads} heads")
        self.ndim, self.patch, self.grid = ndim, int(patch), tuple(int(g) for g in grid)
        self.embedding = nn.Linear(self.patch ** ndim, dim)
        self.positions = nn.Parameter(torch.randn(1, math.prod(self.grid), dim))
        layer = dict(d_model=dim, nhead=heads, dim_feedforward=feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), depth, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), depth)
        self.head = nn.Linear(dim, ndim)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 1 x *(grid * p)`` -> ``B x N x dim``: patches in array order, each flattened in array order."""
        batch, p, d = image.shape[0], self.patch, self.ndim
        split = image.reshape(batch, *[n for g in self.grid for n in (g, p)])
        order = [0] + [1 + 2 * k for k in range(d)] + [2 + 2 * k for k in range(d)]
        patches = split.permute(order).reshape(batch, math.prod(self.grid), p ** d)
        return self.embedding(patches) + self.positions

    def forward(self, memory_image: torch.Tensor, query_image: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(self.tokens(memory_image))
        out = torch.tanh(self.head(self.decoder(self.tokens(query_image), memory)))
        return out.transpose(1, 2).reshape(out.shape[0], self.ndim, *self.grid)


class AiRNet(nn.Module):
    """Parallel patch Transformers on a ``tile_size``^d tile, fused on the finest grid, cubic-interpolated to a
    voxel displacement of the tile."""

    def __init__(self, ndim: int, tile_size: int = 64, patch_sizes=(8, 16, 32), dim: int = 128,
                 heads=(128, 64, 32), feedforward: int = 2048, depth: int = 1, fusion_weights=(0.7, 0.2),
                 query_image: str = "fixed", zero_head: bool = False):
        super().__init__()
        patch_sizes, heads = [int(p) for p in patch_sizes], [int(h) for h in heads]
        if not patch_sizes or patch_sizes != sorted(set(patch_sizes)) or patch_sizes[0] < 1:
            raise ValueError(f"air: patch_sizes must be distinct positive sizes, finest first, got {patch_sizes}")
        if any(tile_size % p for p in patch_sizes):
            raise ValueError(f"air: tile_size {tile_size} must be a multiple of every patch size {patch_sizes}")
        if len(heads) != len(patch_sizes) or len(fusion_weights) != len(patch_sizes) - 1:
            raise ValueError(f"air: need one head count per patch size ({len(patch_sizes)}) and one fusion weight "
                             f"fewer, got heads {heads} and fusion_weights {list(fusion_weights)}")
        if query_image not in ("fixed", "moving"):
            raise ValueError(f"air: query_image must be 'fixed' or 'moving', got {query_image!r}")
        self.ndim, self.tile_size, self.query_image = ndim, int(tile_size), query_image
        self.grid = (self.tile_size // patch_sizes[0],) * ndim
        self.branches = nn.ModuleList(
            PatchTransformer(ndim, (self.tile_size // p,) * ndim, p, dim, h, feedforward, depth, zero_head)
            for p, h in zip(patch_sizes, heads))
        self.fusion = nn.Parameter(torch.tensor([float(w) for w in fusion_weights]))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> Prediction:
        tile = (self.tile_size,) * self.ndim
        if fixed.shape != moving.shape or fixed.ndim != self.ndim + 2 or fixed.shape[1] != 1:
            raise ValueError(f"air: fixed and moving must both be B x 1 x *spatial with {self.ndim} spatial axes, "
                             f"got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        if tuple(fixed.shape[2:]) != tile:
            raise ValueError(f"air: the network takes {'x'.join(map(str, tile))} tiles, got "
                             f"{tuple(fixed.shape[2:])}; register whole images with register_by_tiles")
        memory, query = (moving, fixed) if self.query_image == "fixed" else (fixed, moving)
        fields = [branch(memory, query) for branch in self.branches]
        weights = torch.cat([self.fusion, 1 - self.fusion.sum(0, keepdim=True)])
        control = sum(w * cubic_resize(v, self.grid, a=-0.75, align_corners=False) for w, v in zip(weights, fields))
        dense = cubic_resize(control, tile, a=-0.5, align_corners=True)
        return Prediction(dense * (self.tile_size - 1) / 2, control, fields)  # [-1, 1] spans the tile


def cubic_weights(size_out: int, size_in: int, a: float = -0.5, align_corners: bool = True,
                  dtype=torch.float32, device=None) -> torch.Tensor:
    """``size_out x size_in`` matrix of cubic-convolution interpolation (Keys' kernel, parameter ``a``).

    ``a = -0.5`` is Catmull-Rom, ``a = -0.75`` PyTorch's bicubic. Output sample i sits at input position
    ``i (size_in - 1) / (size_out - 1)`` (``align_corners``) or ``(i + 1/2) size_in / size_out - 1/2``; taps
    beyond the input are clamped to its edge samples (replicate), as ``F.interpolate(mode="bicubic")`` does.
    """
    matrix = _cubic_matrix(int(size_out), int(size_in), float(a), bool(align_corners))
    return matrix.to(dtype=dtype, device=device, copy=True)  # the cached matrix stays unchanged


@functools.lru_cache(maxsize=64)
def _cubic_matrix(size_out: int, size_in: int, a: float, align_corners: bool) -> torch.Tensor:
    i = torch.arange(size_out, dtype=torch.float64)
    if align_corners:
        x = i * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        x = (i + 0.5) * size_in / size_out - 0.5
    floor = torch.floor(x)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for tap in (-1, 0, 1, 2):
        s = (x - (floor + tap)).abs()
        w = torch.where(s <= 1, ((a + 2) * s - (a + 3)) * s * s + 1, ((a * s - 5 * a) * s + 8 * a) * s - 4 * a)
        index = (floor + tap).clamp(0, size_in - 1).long()
        matrix.index_put_((torch.arange(size_out), index), w, accumulate=True)
    return matrix


def cubic_resize(x: torch.Tensor, size: Sequence[int], a: float = -0.5, align_corners: bool = True) -> torch.Tensor:
    """Separable cubic interpolation of ``B x C x *spatial`` onto ``size`` (any number of spatial axes)."""
    if len(size) != x.ndim - 2:
        raise ValueError(f"size {tuple(size)} has {len(size)} axes, the input {x.ndim - 2}")
    for axis, n in enumerate(size):
        if x.shape[2 + axis] != n:
            matrix = cubic_weights(int(n), x.shape[2 + axis], a, align_corners, x.dtype, x.device)
            x = torch.matmul(x.movedim(2 + axis, -1), matrix.T).movedim(-1, 2 + axis)
    return x
