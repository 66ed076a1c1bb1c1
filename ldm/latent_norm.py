"""A base's latent normalisation: what its diffusion model sees of a VAE latent z, per channel.

    latents = (patchify(z, p) - shift) * scale        z = unpatchify(latents / scale + shift, p)

`shift` and `scale` hold one value (every channel) or one per channel of the p x p-patchified latent
(C * p * p; patch channel c * p * p + dy * p + dx, as FLUX.2's pipelines patchify). The families' own terms:
- SD 1.x, SDXL, SD3, FLUX.1 (and Chroma, Z-Image): p = 1, scale = scaling_factor, shift = shift_factor;
- Qwen-Image: p = 1, shift = latents_mean, scale = 1 / latents_std (16 values each);
- FLUX.2: p = 2, shift = bn.running_mean, scale = 1 / sqrt(bn.running_var + batch_norm_eps) (128 values).
The autoencoder never applies it: checkpoints and exports carry it (model.autoencoder.latent_norm), so that a
reader can tell what a decoder decodes, and inpainting and evaluation turn a pipeline's latents into z with it.
In a config, a null shift or scale means "as the VAE file (model.vae_ckpt) states"; a file that states none
leaves it null, which is the identity.
"""
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from einops import rearrange


def _values(v, default: float) -> tuple:
    if v is None:
        return (default,)
    return (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)  # a number, or a sequence


@dataclass(frozen=True)
class LatentNorm:
    """latents = (patchify(z) - shift) * scale; one value each, or one per patchified channel."""

    shift: tuple = (0.0,)
    scale: tuple = (1.0,)
    patch_size: int = 1

    @classmethod
    def from_config(cls, cfg: Optional[Mapping]) -> "LatentNorm":
        """From model.autoencoder.latent_norm ({patch_size, shift, scale}; a null field: the identity's)."""
        cfg = cfg or {}
        return cls(_values(cfg.get("shift"), 0.0), _values(cfg.get("scale"), 1.0), int(cfg.get("patch_size") or 1))

    @classmethod
    def from_factors(cls, scaling_factor: float, shift_factor: Optional[float] = 0.0) -> "LatentNorm":
        """SD's and FLUX.1's scalar factors: latents = (z - shift_factor) * scaling_factor."""
        return cls((float(shift_factor or 0.0),), (float(scaling_factor),))

    @classmethod
    def from_mean_std(cls, mean: Sequence[float], std: Sequence[float], patch_size: int = 1) -> "LatentNorm":
        """latents = (z - mean) / std, per channel (Qwen-Image's latents_mean, latents_std)."""
        return cls(_values(list(mean), 0.0), tuple(1.0 / float(s) for s in std), patch_size)

    @classmethod
    def from_batch_norm(cls, running_mean, running_var, eps: float, patch_size: int) -> "LatentNorm":
        """A frozen BatchNorm over the patchified latent (FLUX.2's vae.bn), in float64."""
        mean = torch.as_tensor(running_mean, dtype=torch.float64).flatten().tolist()
        var = torch.as_tensor(running_var, dtype=torch.float64).flatten().tolist()
        return cls(tuple(mean), tuple(1.0 / math.sqrt(v + eps) for v in var), patch_size)

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping) -> Optional["LatentNorm"]:
        """What a diffusers VAE config.json states (factors, or latents_mean / latents_std), or None."""
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            return cls.from_mean_std(cfg["latents_mean"], cfg["latents_std"])
        if cfg.get("scaling_factor") is not None:
            return cls.from_factors(cfg["scaling_factor"], cfg.get("shift_factor"))
        return None

    def as_config(self) -> dict:
        return {"patch_size": self.patch_size, "shift": list(self.shift), "scale": list(self.scale)}

    @property
    def channels(self) -> Optional[int]:
        """The patchified latent's channel count the statistics are for (None: one value each)."""
        n = max(len(self.shift), len(self.scale))
        return None if n == 1 else n

    def _stats(self, x: torch.Tensor):
        c = x.shape[1]
        for name, v in (("shift", self.shift), ("scale", self.scale)):
            if len(v) not in (1, c):
                raise ValueError(f"latent_norm.{name} has {len(v)} values, the latents {c} channels "
                                 f"(shape {tuple(x.shape)})")
        as_t = lambda v: torch.tensor(v, dtype=torch.float64).to(x.device, x.dtype).view(1, -1, 1, 1)  # noqa: E731
        return as_t(self.shift), as_t(self.scale)

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent z (B, C, h, w) -> what the diffusion model sees (B, C p^2, h/p, w/p)."""
        p = self.patch_size
        x = rearrange(z, "b c (h p) (w q) -> b (c p q) h w", p=p, q=p) if p > 1 else z
        shift, scale = self._stats(x)
        return (x - shift) * scale

    def from_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse: a diffusion model's latents (B, C p^2, h/p, w/p) -> the z our decoder takes."""
        shift, scale = self._stats(latents)
        z = latents / scale + shift
        p = self.patch_size
        return rearrange(z, "b (c p q) h w -> b c (h p) (w q)", p=p, q=p) if p > 1 else z

    def describe(self) -> str:
        if self.channels is None:
            patches = f" over {self.patch_size}x{self.patch_size} patches" if self.patch_size > 1 else ""
            return f"scaling_factor {self.scale[0]:g}, shift_factor {self.shift[0]:g}{patches}"
        patches = f" of {self.patch_size}x{self.patch_size} patches" if self.patch_size > 1 else ""
        return f"per-channel latent statistics ({self.channels} channels{patches})"


def agree(a: Optional[Mapping], b: Optional[Mapping], tol: float = 1e-6) -> bool:
    """Whether two latent_norm configs agree on what both state (a null shift or scale states nothing)."""
    a, b = a or {}, b or {}
    if int(a.get("patch_size") or 1) != int(b.get("patch_size") or 1):
        return False
    for key in ("shift", "scale"):
        if a.get(key) is None or b.get(key) is None:
            continue
        x, y = _values(a[key], 0.0), _values(b[key], 0.0)
        if len(x) != len(y) or any(abs(u - v) > tol * max(1.0, abs(u), abs(v)) for u, v in zip(x, y)):
            return False
    return True


def plain(cfg: Optional[Mapping]) -> Optional[dict]:
    """A latent_norm config as plain values ({patch_size, shift, scale}, lists or null), or None."""
    if cfg is None:
        return None
    as_list = lambda v: None if v is None else list(_values(v, 0.0))  # noqa: E731
    return {"patch_size": int(cfg.get("patch_size") or 1), "shift": as_list(cfg.get("shift")),
            "scale": as_list(cfg.get("scale"))}


def fill(configured: Optional[Mapping], stated: Optional[Mapping]) -> Optional[dict]:
    """The configured latent_norm with its null fields taken from what a VAE file states."""
    out, stated = plain(configured), plain(stated)
    if out is None or stated is None:
        return out or stated
    for key in ("shift", "scale"):
        if out[key] is None:
            out[key] = stated[key]
    return out


def upgrade(kw: dict) -> dict:
    """Autoencoder kwargs saved before latent_norm (scaling_factor, shift_factor) -> today's keys."""
    if "scaling_factor" not in kw and "shift_factor" not in kw:
        return kw
    kw = dict(kw)
    scale, shift = kw.pop("scaling_factor", 0.18215), kw.pop("shift_factor", 0.0)
    kw.setdefault("latent_norm", LatentNorm.from_factors(scale, shift).as_config())
    return kw
