"""The Qwen-Image family (Qwen-Image, Qwen-Image-Edit; its VAE is fine-tuned from the Wan 2.1 video VAE): blocks,
frozen encoder and asymmetric decoder, on one frame as 2D convolutions (its key map: ldm/modules/qwenimage/keys.py).

Parameter names are diffusers' AutoencoderKLQwenImage's, so that its folders load by key copy (the Wan
single-file layout is renamed by one table). An image is one frame: diffusers' causal 3D convolutions pad two
frames of zeros before the first, so on a first frame a kernel (O, I, 3, kh, kw) multiplies zeros with its first
two temporal taps and the frame's output is the 2D convolution with its last temporal slice [:, :, -1]
(keys.py to_frame). The temporal resampling convs (`time_conv`) never run on a first frame (diffusers'
feature cache skips them), so this module has none. RMS norm is per pixel: the up path needs no whole-image
statistics (a tiled decode runs each tile's up path at once). tests/test_bases.py proves the one-frame decode and
encode equal diffusers', tests/test_qwenimage.py the tiled decode equal the untiled one.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .keys import X1_WIDTH, diffusers_form
from ...latent_norm import LatentNorm
from ..common import AsymmetricAutoencoder, Block, Blend, BranchDecoder, ConditionEncoder, latent_convs

# diffusers' AutoencoderKLQwenImage defaults: the released model's per-channel latent statistics
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def base_dim(ch: int) -> int:
    """The family's channel width for a preset width `ch` (x1 128 -> 96, x1.5 192 -> 144, x2 256 -> 192)."""
    if ch % 4:
        raise ValueError(f"qwenimage: ch must be a multiple of 4 (its base_dim is ch x 96 / 128), got {ch}")
    return ch * X1_WIDTH // 128


class RMSNorm(Block):
    """x / ||x|| over channels x sqrt(C) x gamma (diffusers' QwenImageRMS_norm): per pixel, no statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)  # the norm in fp32, as diffusers
        return F.normalize(x.float() if low else x, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(Block):
    """(RMS norm, SiLU, 3x3 conv) x2 plus a 1x1 `conv_shortcut` where the widths differ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + self.conv_shortcut(x)


class AttentionBlock(Block):
    """Single-head self-attention over all pixels, one 1x1 conv for q, k, v (`to_qkv`) and one out (`proj`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(-1, -2)  # (B, 1, HW, 3C)
        q, k, v = (t.contiguous() for t in qkv.chunk(3, dim=-1))  # contiguous: SDPA's fused kernels
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))


class Resample(Block):
    """`resample.1` is the conv: up (nearest x2, 3x3 conv halving the width) or down (pad right and bottom,
    3x3 stride-2 conv), as diffusers' QwenImageResample on a first frame."""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    """ResidualBlock, attention, ResidualBlock at the lowest resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """Image (B,3,H,W) -> moments (B, out_channels, H/8, W/8); `down_blocks` is one flat list, as diffusers'."""

    def __init__(self, dim: int, out_channels: int, dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv_in = nn.Conv2d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(dim_mult) - 1:
                blocks.append(Resample(c_out, up=False))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))


class UpBlock(nn.Module):
    """num_res_blocks + 1 ResidualBlocks, then (but at full resolution) an upsampler halving the width."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                      for j in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(out_dim, up=True)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class AsymmetricDecoder(BranchDecoder):
    """Qwen-Image's decoder of any width, with an optional masked-image branch (`encoder`, as the SD family's).

    z (B, z_channels, h, w) -> image (B, 3, 8h, 8w); `up_blocks.0` is the lowest resolution. With `masked_image`
    and `mask` (1 = hole) the branch's features replace the decoder's in the known region at each up block's
    input and before the output head: widths (base_dim, 1,2,4,4) d, d, 2d, 2d, 4d at H, H, H/2, H/4, H/8.
    """

    whole_image_norms = False  # RMS norm is per pixel: tiles need no whole-image statistics

    def __init__(self, dim: int, dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 z_channels: int = 16, use_condition: bool = True, gradient_checkpointing: bool = False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.upsample_factor = 2 ** (len(dim_mult) - 1)
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv_in = nn.Conv2d(z_channels, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks, inputs, c = [], [], dims[0]
        for k, c_out in enumerate(dims[1:]):
            upsample = k != len(dim_mult) - 1
            inputs.append(c)
            blocks.append(UpBlock(c, c_out, num_res_blocks, upsample))
            c = c_out // 2 if upsample else c_out
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        # feature 0 before the head, feature n the input of up_blocks.(L - n): full resolution first
        self.encoder = ConditionEncoder([c, *reversed(inputs)]) if use_condition else None
        self.blend = Blend()

    def mid_path(self, z: torch.Tensor) -> torch.Tensor:
        """z -> the mid block's output (B, 4d, h, w): the attention, over the whole latent."""
        return self._run(self.mid_block, self.conv_in(z))

    def up_path(self, h: torch.Tensor, feats: Optional[list] = None, mask: Optional[torch.Tensor] = None):
        """Mid-block output -> image; convolutions and RMS norms only (ldm/modules/tiling.py runs it per tile)."""
        levels = len(self.up_blocks)
        for k, block in enumerate(self.up_blocks):
            if feats is not None:
                h = self.blend(h, feats[levels - k], mask)  # up_blocks.k input: (B, C_k, H/2^(L-1-k), ...)
            h = self._run(block, h)
        if feats is not None:
            h = self.blend(h, feats[0], mask)
        return self.conv_out(F.silu(self.norm_out(h)))


class AsymmetricAutoencoderKLQwenImage(AsymmetricAutoencoder):
    """The Qwen-Image VAE's frozen encoder and an asymmetric decoder; see AsymmetricAutoencoder.

    `ch` and `encoder_ch` are preset widths (128 = x1), built at base_dim = ch * 96 / 128; decode clamps to
    [-1, 1] as diffusers' AutoencoderKLQwenImage.decode.
    """

    family = "qwenimage"
    default_latent_norm = LatentNorm.from_mean_std(LATENTS_MEAN, LATENTS_STD).as_config()

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 use_condition: bool = True, gradient_checkpointing: bool = False,
                 encoder_ch: int = 128, encoder_ch_mult: Sequence[int] = (1, 2, 4, 4),
                 encoder_num_res_blocks: int = 2, z_channels: int = 16, embed_dim: int = 16,
                 use_quant_conv: bool = True, latent_norm: Optional[dict] = None, base: Optional[str] = None,
                 family: str = "qwenimage"):
        super().__init__(dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                              use_condition=use_condition, encoder_ch=encoder_ch,
                              encoder_ch_mult=list(encoder_ch_mult),
                              encoder_num_res_blocks=encoder_num_res_blocks, z_channels=z_channels,
                              embed_dim=embed_dim, use_quant_conv=use_quant_conv,
                              latent_norm=latent_norm, base=base, family=family))
        self.encoder = Encoder(base_dim(encoder_ch), 2 * z_channels, encoder_ch_mult, encoder_num_res_blocks)
        self.quant_conv, self.post_quant_conv = latent_convs(z_channels, embed_dim, use_quant_conv)
        self.decoder = AsymmetricDecoder(base_dim(ch), ch_mult, num_res_blocks, z_channels, use_condition,
                                         gradient_checkpointing)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Clamped to [-1, 1], as diffusers'. In training the gradient passes as through the identity: the losses
        still pull an out-of-range pixel back, and the adaptive GAN weight (conv_out's gradient from the
        output's) stays exact. x - x.detach() is exactly 0: the value is the clamp's."""
        clamped = x.detach().clamp(-1, 1)
        return clamped + (x - x.detach()) if x.requires_grad else clamped

    def diffusers_form(self) -> tuple[dict, dict]:
        """(config.json, weights) of diffusers' AutoencoderKLQwenImage: the branch-off decoder of the encoder's
        widths only (ldm/modules/qwenimage/keys.py diffusers_form says why)."""
        return diffusers_form(self.config, self.state_dict())

    @staticmethod
    def width_must(mults: str) -> str:
        """What a width must be (config checks, ldm/training/checks.py)."""
        return "a multiple of 4 (Qwen-Image's base_dim is ch x 96 / 128: 128 = x1)"

    @staticmethod
    def width_ok(ch: int, mults) -> bool:
        return ch % 4 == 0
