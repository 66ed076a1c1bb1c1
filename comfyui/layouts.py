"""ComfyUI's tensors <-> ours, and the conditioned decode the node runs (torch only: no ComfyUI import).

ComfyUI: IMAGE (B, H, W, C) in [0, 1]; MASK (B, H, W) or (H, W), 1 = to inpaint; LATENT["samples"] the VAE's
raw latent: (B, C, h, w) for the SD family and FLUX.1, (B, 16, 1, h, w) for Qwen-Image (Wan 2.1's video
layout, one frame), and for FLUX.2 (B, 128, H/16, W/16): the 2x2-patchified z with the VAE's batch norm applied.
Ours: images (B, 3, H, W) in [-1, 1], masks (B, 1, H, W), 1 = hole; z (B, C, H/f, W/f) without any norm.
"""
import torch


def latent_to_z(decoder, samples: torch.Tensor, name: str = "the decoder") -> torch.Tensor:
    """A LATENT's samples -> the z `decoder.decode` takes, (B, C, h, w); a latent of another base is refused."""
    if samples.ndim == 5:  # Qwen-Image, Wan's (B, C, T, h, w): one frame
        if samples.shape[2] != 1:
            raise ValueError(f"the LATENT holds {samples.shape[2]} frames (shape {tuple(samples.shape)}); "
                             "this decoder decodes images, one frame")
        samples = samples[:, :, 0]
    if samples.ndim != 4:
        raise ValueError(f"the LATENT's samples have shape {tuple(samples.shape)}, not (B, C, h, w)")
    channels, norm = decoder.config["embed_dim"], decoder.latent_norm
    p = norm.patch_size
    if samples.shape[1] == channels:
        return samples
    if p > 1 and samples.shape[1] == channels * p * p:  # FLUX.2: undo the batch norm, then the patches
        return norm.from_diffusion(samples)
    takes = f"{channels}" + (f" (or {channels * p * p}: its {p}x{p}-patchified latent)" if p > 1 else "")
    raise ValueError(f"the LATENT has {samples.shape[1]} channels, but {name} (base {base_of(decoder)}) takes "
                     f"{takes}: a latent of another base")


def base_of(decoder) -> str:
    """The base a decoder decodes, as its config states it (run checkpoints do) or as its layout reads."""
    cfg = decoder.config
    if cfg.get("base"):
        return str(cfg["base"])
    norm, c = decoder.latent_norm, cfg["embed_dim"]
    if cfg.get("family", "sd") != "sd":
        return f"{cfg['family']}, {c} channels"
    if norm.patch_size > 1:
        return f"flux2-like, {c} channels in {norm.patch_size}x{norm.patch_size} patches"
    scale = norm.scale[0] if norm.channels is None else None
    known = {(4, 0.18215): "sd1", (4, 0.13025): "sdxl", (16, 1.5305): "sd3", (16, 0.3611): "flux"}
    for (channels, s), name in known.items():
        if c == channels and scale is not None and abs(scale - s) < 1e-6:
            return name
    return f"sd family, {c} channels"


def _mask_to_ours(mask: torch.Tensor, size: tuple) -> torch.Tensor:
    """ComfyUI MASK (B, H, W) or (H, W) -> (B, 1, H, W); it must be the image's size."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"the MASK has shape {tuple(mask.shape)}, not (B, H, W)")
    if tuple(mask.shape[-2:]) != tuple(size):
        raise ValueError(f"the MASK is {mask.shape[-1]}x{mask.shape[-2]} pixels but the IMAGE is "
                         f"{size[1]}x{size[0]}: give the mask of that image")
    return mask[:, None].float().clamp(0, 1)


def _batch(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] not in (1, b):
        raise ValueError(f"the {what} has a batch of {t.shape[0]}, the LATENT {b}")
    return t.expand(b, *t.shape[1:])


def decode(decoder, samples, image, mask, tile: int = 0, paste: bool = False, name: str = "the decoder"):
    """LATENT samples + IMAGE + MASK -> IMAGE (B, H, W, 3) at the image's size: the decoder's conditioned decode
    of the latent's area (VAEEncode's centred crop), the image's own pixels around it; `paste` puts the
    image's own pixels back where the mask is 0 (blended by its value); `tile` > 0 decodes in latent tiles."""
    z = latent_to_z(decoder, samples, name)
    f, (H, W) = decoder.downsample_factor, image.shape[1:3]
    h, w = z.shape[-2] * f, z.shape[-1] * f
    if not (h <= H < h + f and w <= W < w + f):
        raise ValueError(f"the LATENT decodes to {w}x{h} pixels but the IMAGE is {W}x{H}: give the image "
                         "that was encoded (or sampled at its size)")
    device, b = z.device, z.shape[0]
    m = _batch(_mask_to_ours(mask, (H, W)), b, "MASK").to(device)
    rgb = _batch(image[..., :3].movedim(-1, 1).float(), b, "IMAGE").to(device)  # (B, 3, H, W) in [0, 1]
    top, left = (H - h) // 2, (W - w) // 2
    crop = lambda t: t[..., top:top + h, left:left + w]  # noqa: E731
    out = decoder.decode(z.float(), crop(rgb) * 2 - 1, crop(m), tile=tile or None)
    out = ((out + 1) / 2).clamp(0, 1)
    if paste:
        out = out * crop(m) + crop(rgb) * (1 - crop(m))
    full = rgb.clone()
    full[..., top:top + h, left:left + w] = out
    return full.movedim(1, -1)  # (B, H, W, 3)
