"""Network building blocks shared by the methods: the U-Net family and the flow head.

Everything is ndim-generic: the same class builds the 2D and the 3D network (``ndim`` picks
``Conv2d``/``Conv3d`` and friends), so a method registers slices and volumes through one code path.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv", "ConvBlock", "UNet", "flow_head"]

DOWNSAMPLING = ("maxpool", "strided")


def conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Module:
    """A 'same'-padded convolution (for odd ``kernel_size``) in ``ndim`` dimensions."""
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
    layer = getattr(nn, f"Conv{ndim}d")
    return layer(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def concat_channels(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, dim=1)``, channels-last when any input is (a feature map of a channels-last network).

    torch.cat keeps a layout only when every input has it, and a skip built from one-channel images (a
    one-channel tensor is in both layouts, their concatenation in the default one) makes it fall back to the
    default layout: every convolution after it would copy its input to channels-last, forward and backward.
    The values are torch.cat's."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensors[0].ndim)
    if layout is None or not any(t.is_contiguous(memory_format=layout) and not t.is_contiguous() for t in tensors):
        return torch.cat(list(tensors), dim=1)
    return torch.cat([t.contiguous(memory_format=layout) for t in tensors], dim=1)


class ConvBlock(nn.Sequential):
    """Convolution (3 x 3 by default) followed by LeakyReLU.

    The activation works in place: a convolution's backward needs its input, not its output.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: int = 1,
                 kernel_size: int = 3, negative_slope: float = 0.2):
        super().__init__(conv(ndim, in_channels, out_channels, kernel_size, stride),
                         nn.LeakyReLU(negative_slope, inplace=True))


def _groups(features, what: str) -> list[list[int]]:
    """Accept ``[16, 32]`` (one conv a level) or ``[[16, 16], [32]]`` (several); return lists."""
    groups = []
    for entry in features:
        group = [entry] if isinstance(entry, int) else list(entry)
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in group):
            raise ValueError(f"{what}: channel counts must be positive integers, got {features!r}")
        groups.append(group)
    return groups


class UNet(nn.Module):
    """A configurable U-Net: convolutions + LeakyReLU, x2 downsampling, nearest x2 upsampling, skips.

    ``encoder`` lists one level per downsampling, coarsening by 2 each time; a level is an int (one
    conv) or a list of ints (several). ``downsampling`` says how a level halves the resolution:

    - ``"maxpool"``: the level's stride-1 convs, then a 2 x max pool (voxelmorph's PyTorch code);
    - ``"strided"``: the level's first conv has stride 2 (the VoxelMorph papers' Keras network).

    ``decoder`` lists groups of convs from the coarsest resolution up: group 0 runs on the encoder's
    output (1 / 2^L of the input for L levels); before each later group the features are upsampled x2
    (nearest) and concatenated with the skip of that resolution, the encoder's last feature map there
    (for ``"strided"`` the skip at full resolution is the input itself). ``L + 1`` groups end at full
    resolution; fewer groups end coarser (``output_level`` says how many halvings). A decoder group
    may be empty (``[]``): the features are then only upsampled and concatenated.

    voxelmorph's VoxelMorph-2 in this form: ``encoder=[16, 32, 32, 32]`` and
    ``decoder=[[32], [32], [32], [32], [32, 16, 16]]`` (max pool) or
    ``[[32], [32], [32], [32, 32], [16, 16]]`` (strided).

    Sizes need not be multiples of 2^L: each upsampling goes to the size of the skip it meets.
    Input ``B x in_channels x *spatial``; output ``B x out_channels x *spatial / 2^output_level``.
    """

    def __init__(self, ndim: int, in_channels: int, encoder: Sequence = (16, 32, 32, 32),
                 decoder: Sequence = ((32,), (32,), (32,), (32,), (32, 16, 16)),
                 downsampling: str = "maxpool", negative_slope: float = 0.2):
        super().__init__()
        if downsampling not in DOWNSAMPLING:
            raise ValueError(f"downsampling must be one of {DOWNSAMPLING}, got {downsampling!r}")
        encoder_groups = _groups(encoder, "encoder")
        decoder_groups = _groups(decoder, "decoder")
        if not encoder_groups or not all(encoder_groups):
            raise ValueError(f"encoder: every level needs at least one conv, got {encoder!r}")
        if not 1 <= len(decoder_groups) <= len(encoder_groups) + 1:
            raise ValueError(f"decoder needs 1 to {len(encoder_groups) + 1} groups (one per resolution from the "
                             f"coarsest up), got {len(decoder_groups)}")
        self.ndim, self.downsampling = ndim, downsampling
        self.output_level = len(encoder_groups) + 1 - len(decoder_groups)

        self.encoder = nn.ModuleList()
        skip_channels, channels = [], in_channels
        for group in encoder_groups:
            if downsampling == "strided":
                skip_channels.append(channels)
            layers = []
            for index, features in enumerate(group):
                stride = 2 if downsampling == "strided" and index == 0 else 1
                layers.append(ConvBlock(ndim, channels, features, stride, negative_slope=negative_slope))
                channels = features
            self.encoder.append(nn.Sequential(*layers))
            if downsampling == "maxpool":
                skip_channels.append(channels)
        self._pool = getattr(F, f"max_pool{ndim}d") if downsampling == "maxpool" else None

        self.decoder = nn.ModuleList()
        for index, group in enumerate(decoder_groups):
            if index > 0:
                channels += skip_channels[-index]
            layers = []
            for features in group:
                layers.append(ConvBlock(ndim, channels, features, negative_slope=negative_slope))
                channels = features
            self.decoder.append(nn.Sequential(*layers))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected a B x C x *spatial input with {self.ndim} spatial axes, got {tuple(x.shape)}")
        skips = []
        for level in self.encoder:
            if self._pool is None:
                skips.append(x)
                x = level(x)
            else:
                x = level(x)
                skips.append(x)
                x = self._pool(x, 2)
        for index, group in enumerate(self.decoder):
            if index > 0:
                skip = skips[-index]
                x = concat_channels([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip])
            x = group(x)
        return x


def flow_head(in_channels: int, ndim: int, kernel_size: int = 3, std: float = 1e-5) -> nn.Module:
    """The convolution from features to an ``ndim``-channel field, initialised near zero.

    Weights ~ Normal(0, ``std``) and bias 0 (voxelmorph: 1e-5), so an untrained network predicts an
    almost-identity transform and the first gradient steps are not thrown off by a random warp.
    """
    layer = conv(ndim, in_channels, ndim, kernel_size)
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        layer.bias.zero_()
    return layer
