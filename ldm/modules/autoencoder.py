"""The asymmetric KL-f8 autoencoder: frozen SD encoder, heavy decoder with a masked-image branch."""
from typing import Optional, Sequence

import torch
from torch import nn

from ..latent_norm import LatentNorm, plain
from ..tiling import tiled_decode
from .vae import AsymmetricDecoder, DiagonalGaussianDistribution, Encoder

SD_LATENT_NORM = {"patch_size": 1, "shift": [0.0], "scale": [0.18215]}  # SD 1.x's scaling_factor

# Widths of DESIGN.md; `ch` is channel width, not parameter count.
PRESETS = {
    "x1": dict(ch=128, num_res_blocks=2),
    "x1.5": dict(ch=192, num_res_blocks=3),
    "x2": dict(ch=256, num_res_blocks=5),
}


class AsymmetricAutoencoderKL(nn.Module):
    """encode(x) -> posterior; decode(z, image, mask) -> image. Parameter names follow the ldm layout.

    Images are in [-1, 1], (B,3,H,W) with H, W multiples of 8; latents (B,embed_dim,H/8,W/8) without the
    base's latent normalisation (the diffusion pipeline applies it: ldm/latent_norm.py, `self.latent_norm`).
    Masks are (B,1,H,W), 1 = hole, 0 = known. A base (configs/bases/) sets z_channels = embed_dim,
    use_quant_conv (false: no 1x1 convs around the latent, as SD3 and FLUX.1), latent_norm and its name;
    latent_norm and the name are carried into checkpoints and exports, never used here.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 use_condition: bool = True, gradient_checkpointing: bool = False,
                 encoder_ch: int = 128, encoder_ch_mult: Sequence[int] = (1, 2, 4, 4),
                 encoder_num_res_blocks: int = 2, z_channels: int = 4, embed_dim: int = 4,
                 use_quant_conv: bool = True, latent_norm: Optional[dict] = None, base: Optional[str] = None):
        super().__init__()
        if not use_quant_conv and embed_dim != z_channels:
            raise ValueError(f"use_quant_conv=False needs embed_dim == z_channels, got {embed_dim} and {z_channels}")
        latent_norm = plain(latent_norm) if latent_norm is not None else SD_LATENT_NORM  # None: SD's, as the widths
        self.latent_norm = LatentNorm.from_config(latent_norm)
        self.config = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           use_condition=use_condition, encoder_ch=encoder_ch,
                           encoder_ch_mult=list(encoder_ch_mult),
                           encoder_num_res_blocks=encoder_num_res_blocks, z_channels=z_channels,
                           embed_dim=embed_dim, use_quant_conv=use_quant_conv,
                           latent_norm=latent_norm, base=base)
        self.encoder = Encoder(encoder_ch, encoder_ch_mult, encoder_num_res_blocks, z_channels=z_channels)
        # without quant convs the encoder's moments (B, 2*z, h, w) are the posterior and z goes straight in
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1) if use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1) if use_quant_conv else nn.Identity()
        self.decoder = AsymmetricDecoder(ch, ch_mult, num_res_blocks, z_channels=z_channels,
                                         use_condition=use_condition,
                                         gradient_checkpointing=gradient_checkpointing)
        self.downsample_factor = 2 ** (len(encoder_ch_mult) - 1)

    def freeze_all_but_decoder(self) -> "AsymmetricAutoencoderKL":
        """Only the decoder trains (DESIGN.md): encoder, quant_conv and post_quant_conv keep the SD weights."""
        self.requires_grad_(False)
        self.decoder.requires_grad_(True)
        return self

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """(B,3,H,W) in [-1,1] -> posterior over (B, embed_dim, H/8, W/8)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode: image must be (B,3,H,W), got shape {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode: image H and W must be multiples of {f}, got {tuple(x.shape[-2:])}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None, check: bool = True, tile: Optional[int] = None,
               tile_overlap: int = 8, slice_batch: bool = False) -> torch.Tensor:
        """Latent (B,embed_dim,h,w) -> image (B,3,8h,8w).

        Pass `image` and `mask` (batch B or 1, broadcast) to use the masked-image branch, or neither for a
        plain decode (text-to-image). A decoder built with use_condition=False ignores them.
        `check=False` skips the value check of the mask (it syncs with the device; training turns it off).
        `tile`: decode in latent tiles of that side with `tile_overlap` latent pixels of context, with
        whole-image GroupNorm statistics (ldm/tiling.py; inference only). `slice_batch`: one sample at a time.
        """
        if (image is None) != (mask is None):
            raise ValueError("decode: pass both image and mask (mask=ones for pure reconstruction), "
                             "or neither for a plain decode")
        if image is not None:
            image, mask = self._check_condition(z, image, mask, check)
        if slice_batch and z.shape[0] > 1:
            return torch.cat([self.decode(z[i:i + 1], *(t[i:i + 1] if t is not None else None for t in (image, mask)),
                                          check=False, tile=tile, tile_overlap=tile_overlap)
                              for i in range(z.shape[0])])
        h = self.post_quant_conv(z)
        args = (h,) if image is None or not self.decoder.use_condition else (h, (1 - mask) * image, mask)
        if tile is not None:
            return tiled_decode(self.decoder, *args, tile=tile, overlap=tile_overlap)
        return self.decoder(*args)

    def _check_condition(self, z, image, mask, check_values):
        """Validate shapes (and, optionally, mask values); broadcast batch-1 image/mask to z's batch."""
        f = self.downsample_factor
        b, size = z.shape[0], (z.shape[-2] * f, z.shape[-1] * f)
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != size:
            raise ValueError(f"decode: image must be (B,3,{size[0]},{size[1]}) for latents of shape "
                             f"{tuple(z.shape)}, got {tuple(image.shape)}")
        if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != size:
            raise ValueError(f"decode: mask must be (B,1,{size[0]},{size[1]}) for latents of shape "
                             f"{tuple(z.shape)}, got {tuple(mask.shape)}")
        for name, t in (("image", image), ("mask", mask)):
            if t.shape[0] not in (1, b):
                raise ValueError(f"decode: {name} batch {t.shape[0]} does not match latent batch {b}")
        if check_values and mask.numel() and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(f"decode: mask values must lie in [0, 1] (1 = hole), got "
                             f"[{mask.min().item():g}, {mask.max().item():g}]")
        return image.expand(b, -1, -1, -1), mask.to(image.dtype).expand(b, -1, -1, -1)
