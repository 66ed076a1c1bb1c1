"""Evaluation metrics for masked reconstruction: per-region PSNR/SSIM/LPIPS, pre_error, the known region's colour
difference (CIEDE2000), the seam at the mask's edge, sample grids.

Conventions (DESIGN.md): images (B,3,H,W) in [-1,1], so data_range = 2; masks (B,1,H,W) in {0,1}
with 1 = hole (generated) and 0 = known (kept). The all-ones mask is pure reconstruction: it has no
known pixels, so every known-region value is NaN for that sample.

Every metric here is per sample, shape (B,). A region with no pixels in a sample gives NaN (never 0
or inf), so aggregate with `nanmean_dict`. Plain functions of tensors: no Lightning, no trainer state.
"""

import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.utils import make_grid

from .files import atomic_write

DATA_RANGE = 2.0  # images in [-1, 1]
MAX_PSNR_DB = 100.0  # PSNR cap: MSE is floored at DATA_RANGE^2 * 10^(-MAX_PSNR_DB / 10)
AREA_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0)  # hole-fraction buckets, LaMa-style

REGIONS = ("whole", "known", "hole")


def _check_inputs(recon, image, mask):
    """Raise on mismatched shapes; return the mask binarised to the images' float dtype."""
    if recon.shape != image.shape or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"recon {tuple(recon.shape)} and image {tuple(image.shape)} must both be (B,3,H,W)")
    b, _, h, w = image.shape
    if tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(f"mask {tuple(mask.shape)} must be (B,1,H,W) = {(b, 1, h, w)}")
    # > 0.5: robust to masks that went through interpolation or uint8 round trips
    return (mask > 0.5).to(image.dtype)


def paste_back(recon, image, mask):
    """Recon in the hole (mask = 1), the original image in the known region (mask = 0)."""
    m = _check_inputs(recon, image, mask)
    return recon * m + image * (1 - m)


def feather_radius(height: int) -> int:
    """The feather of `feather_back` in pixels: 4 px at 256 px, scaled with the image (1 px at 64)."""
    return max(1, height // 64)


def feather_back(recon, image, mask, radius=None):
    """The paste-back inpainting tools do (a blurred mask): the mask dilated by `radius` px then blurred by a
    Gaussian (sigma radius/2) truncated at `radius`, so the hole stays all recon and the known region turns to
    the original over 2 x `radius` px outside it; never the original inside the hole (in evaluation that would be
    the ground truth)."""
    m = _check_inputs(recon, image, mask)
    r = feather_radius(image.shape[-2]) if radius is None else radius
    if r < 1:
        return paste_back(recon, image, mask)
    soft = torch.nn.functional.max_pool2d(m, 2 * r + 1, stride=1, padding=r)  # dilated by r
    x = torch.arange(-r, r + 1, dtype=m.dtype, device=m.device)
    g = torch.exp(-0.5 * (x / (r / 2)) ** 2)
    g = g / g.sum()
    soft = torch.nn.functional.pad(soft, (r, r, r, r), mode="replicate")
    soft = torch.nn.functional.conv2d(torch.nn.functional.conv2d(soft, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    soft = torch.maximum(soft, m)  # exactly 1 in the hole, whatever the rounding
    return recon * soft + image * (1 - soft)


def seam_band(mask, radius):
    """(B,1,H,W) in {0,1}: the pixels within `radius` px of the mask's edge, on both sides of it (the mask dilated
    minus the mask eroded, by a (2 radius + 1)-px square); empty for an all-ones or all-zeros mask."""
    k = 2 * radius + 1
    dilated = torch.nn.functional.max_pool2d(mask, k, stride=1, padding=radius)  # the pool pads with -inf
    eroded = 1 - torch.nn.functional.max_pool2d(1 - mask, k, stride=1, padding=radius)
    return dilated - eroded


def seam_error(recon, image, mask, radius=None):
    """(B,) mean gradient error on the band around the mask's edge (seam_band, `radius` default feather_radius):
    |d(recon - image)| of the horizontal and vertical forward differences, averaged, over the band's pixels and
    the channels, on the [-1,1] scale. 0 for a seamless output; an edge the output adds (a step where the hole
    meets the known region) or loses (blurred) raises it. NaN where the mask has no edge."""
    m = _check_inputs(recon, image, mask)
    band = seam_band(m.float(), feather_radius(image.shape[-2]) if radius is None else radius)
    diff = (recon - image).float()
    grad = torch.zeros_like(diff)
    grad[..., :, :-1] += (diff[..., :, 1:] - diff[..., :, :-1]).abs() / 2  # 0 past the last column / row
    grad[..., :-1, :] += (diff[..., 1:, :] - diff[..., :-1, :]).abs() / 2
    return _region_mean(grad, band)


def ciede2000(recon, image):
    """(B,H,W) float64 CIEDE2000 colour difference per pixel (scikit-image: sRGB -> CIELAB, D65), images in
    [-1,1] (clamped)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    def lab(x):
        return rgb2lab(_to01(x.detach().double()).permute(0, 2, 3, 1).cpu().numpy(), channel_axis=-1)
    return torch.from_numpy(deltaE_ciede2000(lab(image), lab(recon), channel_axis=-1))


def _region_weights(mask):
    """{region: (B,1,H,W) weight in {0,1}} for whole, known and hole."""
    return {"whole": torch.ones_like(mask), "known": 1 - mask, "hole": mask}


def _region_mean(values, weight):
    """Mean of (B,C,H,W) `values` over the pixels where weight = 1, all channels; NaN if none."""
    channels = values.shape[1]
    total = (values * weight).flatten(1).sum(1)  # (B,)
    count = weight.flatten(1).sum(1) * channels  # (B,): weight broadcasts over channels
    nan = torch.full_like(total, float("nan"))
    return torch.where(count > 0, total / count.clamp(min=1), nan)


def _psnr(mse):
    """PSNR in dB on the [-1,1] scale, capped at MAX_PSNR_DB so identical images give no inf."""
    floor = DATA_RANGE**2 * 10 ** (-MAX_PSNR_DB / 10)
    return 10 * torch.log10(DATA_RANGE**2 / mse.clamp(min=floor))  # NaN (empty region) stays NaN


def _ssim_map(recon, image):
    """(B,3,H,W) SSIM map (gaussian 11x11, sigma 1.5, reflect-padded so it keeps H, W)."""
    _, full = structural_similarity_index_measure(
        recon, image, data_range=DATA_RANGE, reduction="none", return_full_image=True
    )
    return full


def _lpips_regions(recon, image, mask, weights, perceptual):
    """{lpips_<region>: (B,)}; each compares `image` with a composite differing only in that region."""
    composites = {
        "whole": recon,
        "known": recon * (1 - mask) + image * mask,  # original in the hole, recon in the known part
        "hole": recon * mask + image * (1 - mask),  # = paste_back: recon only in the hole
    }
    out = {}
    for region, composite in composites.items():
        dist = perceptual(composite, image).reshape(-1).float()  # (B,), prediction first
        empty = weights[region].flatten(1).sum(1) == 0
        out[f"lpips_{region}"] = dist.masked_fill(empty, float("nan"))
    return out


@torch.no_grad()
def region_metrics(recon, image, mask, perceptual=None):
    """Per-sample (B,) metrics of `recon` against `image` over the whole image, known region and hole.

    Keys (each a float32 tensor of shape (B,), NaN where the region has no pixels):
      psnr_<region>  10*log10(2^2 / MSE over the region's pixels, all channels), in dB, capped at 100.
      ssim_<region>  mean of the SSIM map (data_range 2) over the region's pixels, all channels.
      lpips_<region> only with `perceptual` ((x, y) -> (B,) LPIPS of [-1,1] images, called as
                     perceptual(composite, image)): whole compares recon itself; known compares
                     recon*(1-mask) + image*mask; hole compares recon*mask + image*(1-mask). Each
                     composite differs from `image` only in its region, so the network still sees
                     full-image context.
      pre_error      the paper's "pre_error": mean squared error over the known region on the [0,1]
                     pixel scale, i.e. MSE_[-1,1] / 4 (official eval.py loads PNGs as /255). The
                     official script sums instead of averaging, which would give ~1e2 per 224 px image,
                     not the reported ~1e-2 (vanilla) -> ~1e-5; a mean matches those orders. Uncapped
                     (0 for a perfect paste-back); when psnr_known is below the cap,
                     psnr_known = -10*log10(pre_error).
      de2000_known   mean CIEDE2000 colour difference (ciede2000) over the known region's pixels: the
                     colour shift users see where the image should be kept (0 unchanged; ~1 is about the
                     smallest difference people notice, ~2-3 visible side by side).
      seam           gradient error on the band of feather_radius px around the mask's edge (seam_error).
      mask_area      hole fraction of the sample, in [0, 1].
    For pasted-back metrics call this on paste_back(recon, image, mask).
    """
    mask = _check_inputs(recon, image, mask)
    recon, image = recon.float(), image.float()
    weights = _region_weights(mask.float())
    sq_err = (recon - image) ** 2  # (B,3,H,W)
    ssim_map = _ssim_map(recon, image)  # (B,3,H,W)

    out = {}
    for region, weight in weights.items():
        out[f"psnr_{region}"] = _psnr(_region_mean(sq_err, weight))
        out[f"ssim_{region}"] = _region_mean(ssim_map, weight)
    if perceptual is not None:
        out.update(_lpips_regions(recon, image, weights["hole"], weights, perceptual))
    out["pre_error"] = _region_mean(sq_err, weights["known"]) / DATA_RANGE**2  # [0,1]-scale MSE
    out["de2000_known"] = _region_mean(ciede2000(recon, image).to(recon)[:, None], weights["known"])
    out["seam"] = seam_error(recon, image, mask)
    out["mask_area"] = weights["hole"].flatten(1).mean(1)
    return out


def concat_dicts(batches):
    """Concatenate a list of {key: (B_i,) tensor} into {key: (sum B_i,) tensor}; keys must agree."""
    if not batches:
        raise ValueError("no batches to concatenate")
    keys = set(batches[0])
    for i, batch in enumerate(batches):
        if set(batch) != keys:
            raise ValueError(f"batch {i} has keys {sorted(batch)}, expected {sorted(keys)}")
    return {k: torch.cat([b[k].detach().reshape(-1).float().cpu() for b in batches]) for k in batches[0]}


def nanmean_dict(batches):
    """Average per-sample metrics over all batches ignoring NaN: {key: float}; all-NaN -> nan."""
    return {k: torch.nanmean(v).item() for k, v in concat_dicts(batches).items()}


def bucket_labels(edges=AREA_EDGES):
    """One label per bucket, in order: '10-20%' for the bucket [0.1, 0.2)."""
    return [f"{round(lo * 100):g}-{round(hi * 100):g}%" for lo, hi in zip(edges[:-1], edges[1:])]


def area_buckets(mask_area, edges=AREA_EDGES):
    """Bucket label per sample for hole fractions `mask_area` (B,).

    Buckets are [edges[i], edges[i+1]) except the last, which also holds its right edge, so the
    all-ones mask (area 1.0) lands in "60-100%" with the default edges (0, .1, .2, .3, .4, .5, .6, 1).
    An area outside [edges[0], edges[-1]] raises.
    """
    area = torch.as_tensor(mask_area).reshape(-1)
    if area.numel() and (area.min() < edges[0] or area.max() > edges[-1]):
        raise ValueError(f"mask areas must lie in [{edges[0]}, {edges[-1]}], got {area.tolist()}")
    # inner edges in the area's own dtype, so a float32 area of 0.7 matches an edge of 0.7
    inner = torch.tensor(edges[1:-1], dtype=area.dtype if area.is_floating_point() else torch.float64)
    index = torch.bucketize(area.to(inner.dtype), inner, right=True)  # i: edges[i] <= a < edges[i+1]
    labels = bucket_labels(edges)
    return [labels[i] for i in index.tolist()]


def nanmean_by_bucket(batches, edges=AREA_EDGES):
    """{bucket label: {key: nan-mean, ..., "n": sample count}} over samples grouped by mask_area; empty buckets
    are left out."""
    metrics = concat_dicts(batches)
    labels = area_buckets(metrics["mask_area"], edges)
    out = {}
    for label in bucket_labels(edges):
        keep = torch.tensor([lab == label for lab in labels], dtype=torch.bool)
        if keep.any():
            out[label] = {**{k: torch.nanmean(v[keep]).item() for k, v in metrics.items()},
                          "n": float(keep.sum())}
    return out


def _to01(x):
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def grid_panels(image, mask, outputs, error_gain=4.0):
    """Columns of a comparison grid, each (n,3,H,W) in [0,1]: image, masked image (holes grey), then per output
    the output and |output - image| * error_gain on the [0,1] scale (known-region drift shows there).

    image and each output (n,3,H,W) in [-1,1]; mask (n,1,H,W) with 1 = hole.
    """
    panels = [_to01(image), _to01(image) * (1 - mask) + 0.5 * mask]
    for out in outputs:
        panels += [_to01(out), ((out - image).abs() / 2 * error_gain).clamp(0, 1)]
    return panels


def panel_grid(panels):
    """uint8 (3,H',W') of a list of (n,3,H,W) columns in [0,1]: a row per sample, a column per panel."""
    tiles = torch.stack(panels, dim=1).flatten(0, 1)  # (n*columns, 3, H, W), sample-major
    grid = make_grid(tiles, nrow=len(panels), padding=2, pad_value=1.0)  # (3, H', W') in [0,1]
    return (grid * 255).round().to(torch.uint8)


LABEL_HEIGHT = 12  # pixels of the header row that names a grid's columns


def label_columns(grid, labels, padding=2):
    """uint8 (3, LABEL_HEIGHT + H, W): `grid` (from panel_grid) under a white row naming its columns."""
    _, _, width = grid.shape
    header = Image.new("RGB", (width, LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(header)
    column = (width - padding) / len(labels)
    for i, label in enumerate(labels):
        while label and draw.textlength(label) > column - 2:  # cut to its column at small tile sizes
            label = label[:-1]
        draw.text((padding + i * column + 1, 0), label, fill="black")  # PIL's built-in font, ~6 px a letter
        if i:
            draw.line([(padding + i * column - 1, 0), (padding + i * column - 1, LABEL_HEIGHT)], fill="grey")
    header = torch.from_numpy(np.array(header)).permute(2, 0, 1)  # (3, LABEL_HEIGHT, W)
    return torch.cat([header, grid], dim=1)


@torch.no_grad()
def sample_grid(image, recon, mask, max_images=8, error_gain=4.0):
    """uint8 (3, LABEL_HEIGHT + H', W') grid under a row of column names; rows = samples, columns = image,
    masked image (holes grey), mask (white = hole), reconstruction, reconstruction pasted back,
    |recon - image| * error_gain.

    The error map uses the raw reconstruction (so known-region drift shows), on the [0,1] scale.
    """
    m = _check_inputs(recon, image, mask)
    n = min(max_images, image.shape[0])
    image, recon, m = (t[:n].detach().float().cpu() for t in (image, recon, m))
    image01, masked, recon01, error = grid_panels(image, m, [recon], error_gain)
    pasted = _to01(recon * m + image * (1 - m))
    grid = panel_grid([image01, masked, m.expand(-1, 3, -1, -1), recon01, pasted, error])
    return label_columns(grid, ["image", "masked", "mask", "recon", "pasted", f"error x{error_gain:g}"])


def save_grid(grid, path):
    """Write a uint8 (3,H,W) image, whole or not at all, with the permissions the umask gives (ldm.files.atomic_write),
    in the format its extension names (PNG when none)."""
    array = grid.detach().cpu().permute(1, 2, 0).contiguous().numpy()  # (H, W, 3) uint8
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=kind))
