"""What every autoencoder family shares: the posterior, the masked-image branch, and the interface the training
step, tiling, export and the scripts use (`AsymmetricAutoencoder`), whatever the family behind it.

A family (ldm/modules/families.py) subclasses AsymmetricAutoencoder and sets its networks: `encoder` (image ->
moments), `quant_conv`, `post_quant_conv`, `decoder`. The decoder takes (z, masked_image, mask) or z alone, has
`use_condition`, `conv_out` (a Conv2d producing the image: the adaptive GAN weight's layer), and for
ldm/modules/tiling.py `upsample_factor`, `whole_image_norms` (whether its up path needs whole-image statistics when
tiled), `mid_path(z)`, `branch(masked_image)` and `up_path(h, feats, mask)`.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..latent_norm import LatentNorm, plain
from .tiling import OVERLAP, tiled_decode


class CheckpointError(ValueError):
    """A checkpoint is unreadable, foreign or does not fit the model; the message names the file."""


def diffusers_version() -> str:
    """The installed diffusers' version for an export's config.json (absent: the folder is still valid for it)."""
    try:
        from importlib.metadata import version
        return version("diffusers")
    except Exception:
        return "0.21.0"


def identity_quant_convs(z_channels: int) -> dict:
    """quant_conv (2z -> 2z) and post_quant_conv (z -> z) as exact identity 1x1 convs (weight I, bias 0):
    how a diffusers class that always has both holds a VAE without them (SD3, FLUX.1)."""
    def eye(n):
        return {"weight": torch.eye(n)[:, :, None, None], "bias": torch.zeros(n)}
    return {f"{name}.{k}": v for name, n in (("quant_conv", 2 * z_channels), ("post_quant_conv", z_channels))
            for k, v in eye(n).items()}


class Block(nn.Module):
    """A network block that model.compile compiles whole (ldm/models/asym_decoder.py compile_blocks)."""


class DiagonalGaussianDistribution:
    """Posterior q(z|x) from the encoder's moments (B, 2C, h, w): mean and log-variance halves."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class ConditionEncoder(nn.Module):
    """The masked-image branch: plain convs, ReLU between, features kept pre-ReLU.

    `widths[n]` is the width of feature n, one per decoder injection point: feature 0 (full resolution) is
    blended before the decoder's output head, feature n >= 1 into the input of the decoder level n - 1 levels
    above full resolution. Layers 0 and 1 are 3x3 convs at full resolution, each later one a 4x4 stride-2 conv:
    for an (B,3,H,W) input, features at H, H, H/2, H/4, ... (SD, ch_mult (1,2,4,4): ch, 2ch, 4ch, 4ch, 4ch).
    """

    def __init__(self, widths: Sequence[int], in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for n, c_out in enumerate(widths):
            if n < 2:
                layers.append(nn.Conv2d(c_in, c_out, 3, stride=1, padding=1))
            else:
                layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
            c_in = c_out
        self.layers = nn.ModuleList(layers)

    def forward(self, masked_image: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], masked_image
        for n, layer in enumerate(self.layers):
            x = layer(x)
            feats.append(x)  # pre-ReLU, as the official checkpoints were trained
            if n < len(self.layers) - 1:
                x = F.relu(x)
        return feats


class Blend(Block):
    """Mask-gated replacement h*m + f*(1-m): holes (m=1) keep the latent path, known pixels the branch.
    A module (no weights) so that model.compile can compile it (its elementwise ops fuse)."""

    def forward(self, h: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(mask, size=h.shape[-2:], mode="nearest").to(h.dtype)
        return h * m + feat.to(h.dtype) * (1 - m)


class BranchDecoder(nn.Module):
    """What every family's decoder shares: z -> up_path(mid_path(z), branch(masked_image), mask), the branch being
    `encoder` (a ConditionEncoder, None without use_condition), each part under gradient checkpointing when asked.
    A family's decoder builds its layers and defines mid_path and up_path (ldm/modules/tiling.py runs the three apart)."""

    gradient_checkpointing: bool = False

    @property
    def use_condition(self) -> bool:
        return self.encoder is not None

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, z: torch.Tensor, masked_image: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (masked_image is None) != (mask is None):
            raise ValueError("AsymmetricDecoder: pass both masked_image and mask, or neither")
        conditioned = masked_image is not None
        if conditioned and not self.use_condition:
            raise ValueError("AsymmetricDecoder: built with use_condition=False but given a mask")
        return self.up_path(self.mid_path(z), self.branch(masked_image) if conditioned else None, mask)

    def branch(self, masked_image: torch.Tensor) -> list:
        """The masked-image branch's features, full resolution first (ConditionEncoder)."""
        return self._run(self.encoder, masked_image)


def latent_convs(z_channels: int, embed_dim: int, use_quant_conv: bool) -> tuple[nn.Module, nn.Module]:
    """(quant_conv, post_quant_conv): 1x1 convs around the latent, or identities for a VAE without them (SD3,
    FLUX.1), whose encoder's moments (B, 2 z, h, w) are the posterior and whose z goes straight in."""
    if not use_quant_conv:
        if embed_dim != z_channels:
            raise ValueError(f"use_quant_conv=False needs embed_dim == z_channels, got {embed_dim} and {z_channels}")
        return nn.Identity(), nn.Identity()
    return nn.Conv2d(2 * z_channels, 2 * embed_dim, 1), nn.Conv2d(embed_dim, z_channels, 1)


class AsymmetricAutoencoder(nn.Module):
    """encode(x) -> posterior; decode(z, image, mask) -> image: a frozen encoder and a trainable decoder with a
    masked-image branch. Subclasses (one per family) build `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.

    Images are in [-1, 1], (B,3,H,W) with H, W multiples of `downsample_factor`; latents (B,embed_dim,H/f,W/f)
    without the base's latent normalisation (the diffusion pipeline applies it: ldm/latent_norm.py,
    `self.latent_norm`). Masks are (B,1,H,W), 1 = hole, 0 = known. `config` holds the constructor's arguments
    (checkpoints and exports carry it; ldm/modules/families.py builds the model back from it).
    """

    family: str = ""  # the family's name in model.autoencoder.family
    default_latent_norm: dict = {}  # the family's latent normalisation where the config gives none

    def __init__(self, config: dict):
        super().__init__()
        if config.get("family", self.family) != self.family:
            raise ValueError(f"{type(self).__name__} is family {self.family!r}, got family={config['family']!r}")
        norm = plain(config.get("latent_norm")) if config.get("latent_norm") is not None else self.default_latent_norm
        self.config = {**config, "latent_norm": norm, "family": self.family}
        self.latent_norm = LatentNorm.from_config(norm)
        self.downsample_factor = 2 ** (len(config["encoder_ch_mult"]) - 1)

    def freeze_all_but_decoder(self) -> "AsymmetricAutoencoder":
        """Only the decoder trains (DESIGN.md): encoder, quant_conv and post_quant_conv keep the VAE's weights."""
        self.requires_grad_(False)
        self.decoder.requires_grad_(True)
        return self

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """(B,3,H,W) in [-1,1] -> posterior over (B, embed_dim, H/f, W/f)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode: image must be (B,3,H,W), got shape {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode: image H and W must be multiples of {f}, got {tuple(x.shape[-2:])}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None, check: bool = True, tile: Optional[int] = None,
               tile_overlap: int = OVERLAP, slice_batch: bool = False) -> torch.Tensor:
        """Latent (B,embed_dim,h,w) -> image (B,3,fh,fw).

        Pass `image` and `mask` (batch B or 1, broadcast) to use the masked-image branch, or neither for a
        plain decode (text-to-image). A decoder built with use_condition=False ignores them.
        `check=False` skips the value check of the mask (it syncs with the device; training turns it off).
        `tile`: decode in latent tiles of that side with `tile_overlap` latent pixels of context, with
        whole-image statistics where the family's norms need them (ldm/modules/tiling.py; inference only).
        `slice_batch`: one sample at a time.
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
            return self.output(tiled_decode(self.decoder, *args, tile=tile, overlap=tile_overlap))
        return self.output(self.decoder(*args))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output as decode returns it (a family may clamp it)."""
        return x

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
