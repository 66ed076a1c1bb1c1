"""The SD family's networks: the blocks of the SD KL-f8 autoencoder, its encoder and the asymmetric decoder.

Module names follow the official ldm checkpoints (`down.i.block.j`, `mid.attn_1`, `up.i.upsample`, ...)
so that official weights load by key copy; renamings to the diffusers layout live in `ldm/formats/convert.py`.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..common import Block, Blend, BranchDecoder, ConditionEncoder


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(Block):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) x2, 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(Block):
    """Single-head spatial self-attention with 1x1-conv projections (the SD mid-block attention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head over all channels, as SD. Contiguous: with a strided last dim
        # SDPA falls back to its math kernel, O(HW^2) memory (2.3 GiB at a 1024 px decode, 32 GiB at 2048 px)
        q, k, v = (p(y).reshape(b, 1, c, h * w).transpose(-1, -2).contiguous() for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Upsample(Block):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(Block):
    """3x3 stride-2 conv after an asymmetric (right, bottom) zero pad, as SD."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """The SD KL-f8 encoder: image (B,3,H,W) -> moments (B, 2*z_channels, H/8, W/8)."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 4, double_z: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = MidBlock(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AsymmetricDecoder(BranchDecoder):
    """SD decoder of any width, with an optional masked-image conditional branch (`encoder`).

    z (B, z_channels, h, w) -> image (B, 3, 8h, 8w). With `use_condition`, `masked_image` (B,3,8h,8w) and
    `mask` (B,1,8h,8w; 1 = hole) replace the decoder features in the known region at five points:
    the inputs of up.3, up.2, up.1, up.0 and the output of up.0. Without them it is a plain decoder.
    """

    whole_image_norms = True  # GroupNorm: a tiled decode normalises with the whole image's statistics

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 out_channels: int = 3, z_channels: int = 4, use_condition: bool = True,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.upsample_factor = 2 ** (len(ch_mult) - 1)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        up = []
        for i in reversed(range(len(ch_mult))):  # built lowest resolution first, stored up[0] = full res
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)
        # named `encoder` like the official checkpoints (diffusers: `condition_encoder`); its input is the
        # masked image, which has the output's channels. One feature per injection point: up.0's output, then
        # the inputs of up.0 .. up.3 (the mid block's output); (1,2,4,4): ch, 2ch, 4ch, 4ch, 4ch, as the official
        widths = [ch * m for m in ch_mult] + [ch * ch_mult[-1]]
        self.encoder = ConditionEncoder(widths, in_channels=out_channels) if use_condition else None
        self.blend = Blend()

    @staticmethod
    def _up_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
        for block in level.block:
            h = block(h)
        if hasattr(level, "upsample"):
            h = level.upsample(h)
        return h

    def mid_path(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_channels, h, w) -> the mid block's output (B, C, h, w): the attention, over the whole latent."""
        return self._run(self.mid, self.conv_in(z))

    def up_path(self, h: torch.Tensor, feats: Optional[list] = None, mask: Optional[torch.Tensor] = None):
        """Mid-block output (B, C, h, w) -> image (B, 3, 8h, 8w); `feats` (the branch's) and `mask` or neither.
        Spatially local (convolutions and GroupNorms only): ldm/modules/tiling.py runs it tile by tile."""
        conditioned = feats is not None
        for i in reversed(range(len(self.up))):
            if conditioned:
                h = self.blend(h, feats[i + 1], mask)  # up.i input: (B, C_i, H/2^i, W/2^i)
            h = self._run(self._up_level, self.up[i], h)
        if conditioned:
            h = self.blend(h, feats[0], mask)  # (B, ch, H, W): the branch's first layer
        return self.conv_out(F.silu(self.norm_out(h)))
