"""Tiled decoding: memory bounded by the tile, the output equal to the untiled decode's.

The decoder's conv_in and mid block (with the one global operation, the self-attention) run once over the
whole latent: at 1/8 of the side and 4ch channels they hold 1/16 of one full-resolution activation, and
scaled_dot_product_attention's flash/memory-efficient kernels keep the attention O(tokens). The up path,
convolutions and GroupNorms only, then runs in latent tiles: cores that partition the latent, each widened by
`overlap` latent pixels of context, with its own crop of the masked image and the mask for the branch, its
output cropped back to the core. The core crops partition the image, so there is no blend: where the context
covers the receptive field the tiles agree in the overlap.

Per-tile GroupNorm statistics shift colours between tiles, so every GroupNorm normalises with the whole image's
statistics, exactly: all tiles advance in lockstep, GroupNorm by GroupNorm. Each tile's pass over the up path is
a generator that stops at every GroupNorm with the norm's input; the driver sums each tile core's per-group
mean and mean square, parks the tile's tensors on `store` (host memory when decoding on a GPU), and once every
tile has reached that norm, normalises each with the combined statistics and resumes it. The compute device
holds one tile's activations at a time; `store` holds every tile's live state between two norms (the norm's
input, the residual, the branch features): about three activations of the image at full resolution.
(Re-estimating the statistics in repeated passes instead, each with the previous pass's, fixes one GroupNorm
per pass: ~25 passes for x1.)
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


TILE_ABOVE = 1024  # the scripts decode in tiles above this side (px) unless told otherwise
DEFAULT_TILE = 64  # latent px: 512 px tiles


def auto_tile(tile: Optional[int], side: int) -> Optional[int]:
    """The scripts' --tile: None = DEFAULT_TILE above TILE_ABOVE px (else untiled), 0 = never, N = N."""
    if tile is None:
        return DEFAULT_TILE if side > TILE_ABOVE else None
    if tile < 0:
        raise ValueError(f"--tile must be >= 0 (latent px; 0 = never), got {tile}")
    return tile or None


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """[(core start, core end, padded start, padded end)] along one latent side: ceil(size/tile) cores of
    near-equal length (any size, not only multiples of the tile), each widened by overlap, clipped."""
    n = math.ceil(size / tile)
    cuts = [round(i * size / n) for i in range(n + 1)]
    return [(a, b, max(0, a - overlap), min(size, b + overlap)) for a, b in zip(cuts, cuts[1:])]


class _Stats:
    """Whole-image GroupNorm statistics summed over tile cores: per norm, per (sample, group), the pixel count
    and the sums of the cores' means and mean squares, weighted by their sizes (float64)."""

    def __init__(self):
        self.sums = {}  # norm -> (count, sum (B,G), sum of squares (B,G))

    def add(self, norm: nn.GroupNorm, core: torch.Tensor) -> None:
        b, g = core.shape[0], norm.num_groups
        var, mean = torch.var_mean(core.reshape(b, g, -1).float(), dim=-1, correction=0)  # (B, G)
        mean, var, n = mean.double(), var.double(), core[0, 0].numel() * (core.shape[1] // g)
        count, s1, s2 = self.sums.get(norm, (0, 0.0, 0.0))
        self.sums[norm] = (count + n, s1 + n * mean, s2 + n * (var + mean * mean))

    def whole(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        count, s1, s2 = self.sums[norm]
        mean = s1 / count
        return mean, (s2 / count - mean * mean).clamp_min(0)


def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x (B,C,h',w') with the given per-(sample, group) mean and variance (B,G)."""
    per_channel = x.shape[1] // norm.num_groups
    rstd = (var + norm.eps).rsqrt().repeat_interleave(per_channel, dim=1)  # (B, C)
    scale = rstd * (norm.weight.double() if norm.weight is not None else 1.0)
    shift = (norm.bias.double() if norm.bias is not None else 0.0) - mean.repeat_interleave(per_channel, 1) * scale
    # one multiply-add in the activation's dtype, as GroupNorm's affine step
    return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])


def _park(x, device):
    return x.to(device, non_blocking=True) if x is not None else None


# The tile programs hand each GroupNorm input over in a one-element list (a "box") and drop their own
# reference, so that the driver can move it to the store while the other tiles run.
def _resnet(block, box, unpark):
    """ResnetBlock.forward (eval: dropout is the identity) of box[0] as a generator; box[0] stays the residual."""
    a = yield block.norm1, box
    box2 = [block.conv1(F.silu(a))]
    del a
    a = yield block.norm2, box2
    a = block.conv2(F.silu(a))
    x = unpark(box[0])
    return (block.nin_shortcut(x) if hasattr(block, "nin_shortcut") else x) + a


def _tile_program(decoder, h, masked_image, mask, store):
    """AsymmetricDecoder.up_path of one tile (h: its crop of the mid-block output) as a generator of
    (GroupNorm, boxed input) that receives the normalised input; returns the tile's image. The branch features
    wait on the store until their blend."""
    device = h.device
    unpark = lambda t: _park(t, device)  # noqa: E731
    feats = [_park(f, store) for f in decoder.encoder(masked_image)] if mask is not None else None
    for i in reversed(range(len(decoder.up))):
        if feats is not None:
            h = decoder.blend(h, unpark(feats[i + 1]), mask)  # up.i input
            feats[i + 1] = None
        level = decoder.up[i]
        for block in level.block:
            box = [h]
            del h
            h = yield from _resnet(block, box, unpark)
        if hasattr(level, "upsample"):
            h = level.upsample(h)
    if feats is not None:
        h = decoder.blend(h, unpark(feats[0]), mask)
    box = [h]
    del h
    h = yield decoder.norm_out, box
    return decoder.conv_out(F.silu(h))


@torch.no_grad()
def tiled_decode(decoder, z: torch.Tensor, masked_image: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, tile: int = 64, overlap: int = 8,
                 store: Optional[torch.device] = None) -> torch.Tensor:
    """AsymmetricDecoder forward (z (B,C,h,w) after post_quant_conv -> (B,3,8h,8w)) in latent tiles of core
    side `tile` with `overlap` latent pixels of context; tile states wait on `store` (default: the CPU)."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tiled_decode: tile must be >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    if (masked_image is None) != (mask is None):
        raise ValueError("tiled_decode: pass both masked_image and mask, or neither")
    store = torch.device("cpu") if store is None else store
    h = decoder.mid(decoder.conv_in(z))  # (B, 4ch, h, w): whole latent, exact attention
    f = 2 ** (len(decoder.up) - 1)
    tiles, programs = [], []
    for cy0, cy1, py0, py1 in spans(z.shape[-2], tile, overlap):
        for cx0, cx1, px0, px1 in spans(z.shape[-1], tile, overlap):
            rows, cols = slice(py0 * f, py1 * f), slice(px0 * f, px1 * f)
            crops = (masked_image[..., rows, cols], mask[..., rows, cols]) if mask is not None else (None, None)
            tiles.append(((cy0, cy1, cx0, cx1), (cy0 - py0, cy1 - py0, cx0 - px0, cx1 - px0), py1 - py0))
            programs.append(_tile_program(decoder, h[..., py0:py1, px0:px1], *crops, store))
    del h
    out, sent = None, [None] * len(programs)
    while programs[0] is not None:
        stats, waiting = _Stats(), []
        for t, (program, (_, (y0, y1, x0, x1), side)) in enumerate(zip(programs, tiles)):
            try:
                norm, box = program.send(sent[t])
            except StopIteration as done:  # all tiles finish together: the same program
                out = _place(out, done.value, tiles[t], f, z.shape[-2:])
                programs[t] = None
                continue
            sent[t], device = None, box[0].device
            s = box[0].shape[-2] // side  # this activation's scale over the latent: 1, 2, 4, 8
            stats.add(norm, box[0][..., y0 * s:y1 * s, x0 * s:x1 * s])
            box[0] = _park(box[0], store)
            waiting.append((norm, box, device))
        for t, (norm, box, device) in enumerate(waiting):
            sent[t] = _normalise(norm, _park(box[0], device), *stats.whole(norm))
    return out


def _place(out, y, tile, f, latent_size):
    """Write tile output y's core into out (B,3,8h,8w), allocated at the first tile."""
    (cy0, cy1, cx0, cx1), (y0, y1, x0, x1), _ = tile
    if out is None:
        out = y.new_empty(*y.shape[:2], latent_size[0] * f, latent_size[1] * f)
    out[..., cy0 * f:cy1 * f, cx0 * f:cx1 * f] = y[..., y0 * f:y1 * f, x0 * f:x1 * f]
    return out
