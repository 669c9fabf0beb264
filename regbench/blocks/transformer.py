"""Vision-transformer blocks on token grids, 2D and 3D from the same code.

A token grid is an image of feature vectors flattened to ``B x N x C`` (``N`` = the product of the
grid's ``*shape``, in array order, as ``x.flatten(2).transpose(1, 2)`` gives it); the blocks that need
the neighbourhood (the depth-wise convolution of the feed-forward, a spatial-reduction attention) take
the grid's shape along and fold the tokens back into ``B x C x *shape``.

- :class:`ConvPatchEmbedding`: overlapping convolutional patch embedding (PVT-v2, C2FViT): a strided
  convolution with kernel larger than its stride, then GELU, then the tokens.
- :class:`Attention`: multi-head self-attention, optionally with PVT's spatial reduction of keys and values.
- :class:`FeedForward`: the MLP of a block, plain (ViT) or with a depth-wise convolution (PVT-v2).
- :class:`TransformerBlock` (pre-norm; the norm may be the identity) and :class:`TransformerEncoder`,
  a stack of blocks.
- :func:`init_transformer_weights`: the PVT / timm initialisation (truncated normal 0.02 for linear
  layers, He-normal on fan-out for convolutions).

Dropout and stochastic depth are left out: none of the registration papers using these blocks trains with them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "tokens_to_grid",
    "grid_to_tokens",
    "ConvPatchEmbedding",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "TransformerEncoder",
    "init_transformer_weights",
]

NORMS = ("identity", "layernorm")


def tokens_to_grid(tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``B x N x C`` tokens -> ``B x C x *shape`` feature map (``N`` must equal the product of ``shape``)."""
    batch, count, channels = tokens.shape
    if count != math.prod(shape):
        raise ValueError(f"{count} tokens do not fill a grid of shape {tuple(shape)}")
    return tokens.transpose(1, 2).reshape(batch, channels, *shape)


def grid_to_tokens(features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``B x C x *shape`` feature map -> (``B x N x C`` tokens, ``shape``)."""
    return features.flatten(2).transpose(1, 2), tuple(features.shape[2:])


def _conv_layer(ndim: int):
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
    return getattr(nn, f"Conv{ndim}d")


class ConvPatchEmbedding(nn.Module):
    """Overlapping patch embedding: Conv(kernel ``k``, stride ``s``, padding ``k // 2``) -> GELU -> tokens.

    Input ``B x in_channels x *spatial``; output ``(B x N x dim tokens, grid shape)`` with grid size
    ``floor((S - 1) / s) + 1`` per axis (odd ``k``). C2FViT's embedding (no norm, GELU after the
    convolution); PVT-v2 puts a LayerNorm there instead (``activation=False`` and a norm of your own).
    """

    def __init__(self, ndim: int, in_channels: int, dim: int, kernel_size: int, stride: int,
                 activation: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0 or stride < 1:
            raise ValueError(f"kernel_size must be odd and positive and stride positive, got {kernel_size}, {stride}")
        self.ndim = ndim
        self.proj = _conv_layer(ndim)(in_channels, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected B x C x *spatial with {self.ndim} spatial axes, got {tuple(x.shape)}")
        tokens, shape = grid_to_tokens(self.proj(x))
        return self.act(tokens), shape


class Attention(nn.Module):
    """Multi-head self-attention over ``B x N x dim`` tokens, ``softmax(q k^T / sqrt(d_head)) v``.

    ``q`` and ``(k, v)`` come from separate linear maps (bias: ``qkv_bias``), the heads are merged by
    a linear projection with bias (PVT). With ``reduction`` r > 1 keys and values come from the token
    grid shrunk by a stride-r convolution and a LayerNorm (PVT's spatial-reduction attention); r = 1
    is full global attention.
    """

    def __init__(self, ndim: int, dim: int, heads: int, qkv_bias: bool = False, reduction: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.reduction = reduction
        if reduction > 1:
            self.sr = _conv_layer(ndim)(dim, dim, reduction, stride=reduction)
            self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        batch, count, dim = tokens.shape
        head_dim = dim // self.heads
        q = self.q(tokens).reshape(batch, count, self.heads, head_dim).transpose(1, 2)
        source = tokens
        if self.reduction > 1:
            source = self.norm(grid_to_tokens(self.sr(tokens_to_grid(tokens, shape)))[0])
        kv = self.kv(source).reshape(batch, -1, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale 1 / sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


class FeedForward(nn.Module):
    """A block's MLP: ``Linear(dim, hidden) -> GELU [-> depth-wise conv 3^d -> GELU] -> Linear(hidden, dim)``.

    With ``depthwise=True`` the hidden tokens are folded back into their grid for a depth-wise 3^d
    convolution without bias, in C2FViT's order (GELU before and after the convolution; PVT-v2 has
    no GELU before it). ``depthwise=False`` is the plain ViT MLP.
    """

    def __init__(self, ndim: int, dim: int, hidden: int, depthwise: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act1 = nn.GELU()
        self.dwconv = _conv_layer(ndim)(hidden, hidden, 3, padding=1, groups=hidden, bias=False) if depthwise else None
        self.act2 = nn.GELU() if depthwise else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        x = self.act1(self.fc1(tokens))
        if self.dwconv is not None:
            x = grid_to_tokens(self.dwconv(tokens_to_grid(x, shape)))[0]
        return self.fc2(self.act2(x))


def _norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.Identity()


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x <- x + Attn(N(x))``, then ``x <- x + MLP(N(x))``; ``N`` LayerNorm or identity."""

    def __init__(self, ndim: int, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 norm: str = "layernorm", reduction: int = 1, depthwise: bool = True):
        super().__init__()
        self.norm1 = _norm(norm, dim)
        self.attn = Attention(ndim, dim, heads, qkv_bias, reduction)
        self.norm2 = _norm(norm, dim)
        self.mlp = FeedForward(ndim, dim, int(dim * mlp_ratio), depthwise)

    def forward(self, tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), shape)
        return tokens + self.mlp(self.norm2(tokens), shape)


class TransformerEncoder(nn.Module):
    """``depth`` :class:`TransformerBlock` s in a row, on ``B x N x dim`` tokens of a grid of shape ``shape``."""

    def __init__(self, ndim: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, norm: str = "layernorm", reduction: int = 1, depthwise: bool = True):
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.blocks = nn.ModuleList(TransformerBlock(ndim, dim, heads, mlp_ratio, qkv_bias, norm, reduction, depthwise)
                                    for _ in range(depth))

    def forward(self, tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, shape)
        return tokens


def init_transformer_weights(module: nn.Module) -> None:
    """PVT's initialisation, for ``net.apply``: linear weights ~ truncated normal (std 0.02, cut at +-2),
    biases 0; LayerNorm 1 and 0; convolutions ~ Normal(0, sqrt(2 / fan_out)) with
    ``fan_out = prod(kernel) * out_channels / groups``, biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
