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
mean and mean square and parks the tile's tensors on a store; once every tile has reached that norm, it resumes
the tiles one at a time, each with its input fetched back and normalised with the combined statistics. The
compute device holds one tile's activations at a time. The store holds every tile's live state between two
norms (the norm's input, the residual, the branch features), overlaps included: at its peak, in tiles of 64,
8.5 / 12.7 / 19.0 / 25.4 GiB for vanilla / x1 / x1.5 / x2 at 2048 px (counted on the meta device; docs/decoding.md).
Decoding on a GPU it is host memory; on a CPU it is files in a temporary folder (each read back once or twice
per norm; the kernel's page cache serves what fits), so that the process holds one tile's state, not the
image's. (Re-estimating the statistics in repeated passes instead, each with the previous pass's, fixes one
GroupNorm per pass: ~25 passes for x1.) A decoder whose norms are per pixel (the Qwen-Image family's RMS norm:
`whole_image_norms` False) needs no statistics beyond the attention's: each tile runs its up path at once.
"""
import math
import numbers
import os
import tempfile
import weakref
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


TILE_ABOVE = 1024  # the scripts decode in tiles above this side (px) unless told otherwise
DEFAULT_TILE = 64  # latent px: 512 px tiles
OVERLAP = 8  # latent px of context around each tile (decode's tile_overlap, the scripts')


def auto_tile(tile: Optional[int], side: int) -> Optional[int]:
    """The scripts' --tile: None = DEFAULT_TILE above TILE_ABOVE px (else untiled), 0 = never, N = N."""
    if tile is None:
        return DEFAULT_TILE if side > TILE_ABOVE else None
    if tile != 0:
        check_tile(tile, OVERLAP, "--tile")
    return tile or None


def check_tile(tile, overlap, name="tile") -> None:
    """A tile is an int larger than its overlap (True would be 1-pixel tiles, each widened by the overlap)."""
    def integer(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not integer(overlap) or overlap < 0:
        raise ValueError(f"tile_overlap must be an int >= 0 (latent px), got {overlap!r}")
    if not integer(tile) or tile <= overlap:
        raise ValueError(f"{name} must be an int larger than the overlap ({overlap} latent px), got {tile!r}")


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


class _Memory:
    """Tile states in a device's memory (a GPU decode's: the host's)."""

    def __init__(self, device: torch.device):
        self.device = device

    def park(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    @staticmethod
    def fetch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
        return x.to(device, non_blocking=True)

    def close(self) -> None:
        pass


class _OnDisk:
    """A parked tensor's file; removed once nothing refers to it (a residual is fetched twice: its norm, its add)."""

    def __init__(self, path: Path, shape: torch.Size, dtype: torch.dtype):
        self.path, self.shape, self.dtype = path, shape, dtype
        weakref.finalize(self, path.unlink, missing_ok=True)


class _Files:
    """Tile states in files of a temporary folder under `folder`, raw bytes in C order; removed on close."""

    def __init__(self, folder: Union[str, os.PathLike]):
        if not os.path.isdir(folder):
            raise ValueError(f"tiled_decode: store {str(folder)!r} is not a folder (a torch.device keeps the "
                             "tile states in its memory)")
        self.folder = folder
        self._dir = tempfile.TemporaryDirectory(prefix="tiled-decode-", dir=folder, ignore_cleanup_errors=True)
        self._count = 0

    def park(self, x: torch.Tensor) -> _OnDisk:
        x = x.detach().to("cpu").contiguous()
        self._count += 1
        parked = _OnDisk(Path(self._dir.name) / f"{self._count}.bin", x.shape, x.dtype)
        try:
            with open(parked.path, "wb") as f:
                f.write(x.view(-1).view(torch.uint8).numpy())
        except OSError as err:  # a full disk: say where, and that its files go (close, on the way out)
            parked.path.unlink(missing_ok=True)
            raise OSError(err.errno, f"tiled_decode: {err.strerror} in the tile store {self.folder} (its files are "
                                     f"removed; give TMPDIR or store= a folder with room)") from None
        return parked

    @staticmethod
    def fetch(parked: _OnDisk, device: torch.device) -> torch.Tensor:
        x = torch.empty(parked.shape, dtype=parked.dtype)
        with open(parked.path, "rb") as f:
            if f.readinto(x.view(-1).view(torch.uint8).numpy()) != x.numel() * x.element_size():
                raise RuntimeError(f"tiled_decode: {parked.path} is shorter than the tile state it held")
        return x.to(device)

    def close(self) -> None:
        self._dir.cleanup()  # errors ignored: never in place of the decode's own


def open_store(store, device: torch.device):
    """Where tile states wait between two norms: None = host memory for an accelerator's decode, a temporary
    folder (under $TMPDIR) for a CPU's; a torch.device = its memory; a folder path = files in it."""
    if store is None:
        store = torch.device("cpu") if device.type != "cpu" else tempfile.gettempdir()
    return _Memory(store) if isinstance(store, torch.device) else _Files(store)


# The tile programs hand each GroupNorm input over in a one-element list (a "box") and drop their own
# reference, so that the driver can move it to the store while the other tiles run.
def _resnet(block, box, unpark):
    """ResnetBlock.forward (eval: dropout is the identity) of box[0] as a generator; box[0] stays the residual."""
    a = yield block.norm1, box
    box2 = [block.conv1(F.silu(a))]
    del a
    a = yield block.norm2, box2
    del box2
    a = block.conv2(F.silu(a))
    x = unpark(box[0])
    return (block.nin_shortcut(x) if hasattr(block, "nin_shortcut") else x) + a


def _tile_program(decoder, h, masked_image, mask, store):
    """The decoder's up_path of one tile (h: its crop of the mid-block output) as a generator of
    (GroupNorm, boxed input) that receives the normalised input; returns the tile's image. The branch features
    wait on the store until their blend. A decoder whose norms are per pixel (not whole_image_norms: RMS norm)
    needs no statistics: its tile runs the up path at once."""
    if not decoder.whole_image_norms:
        return decoder.up_path(h, decoder.branch(masked_image) if mask is not None else None, mask)
    device = h.device
    unpark = lambda t: store.fetch(t, device)  # noqa: E731
    feats = [store.park(f) for f in decoder.branch(masked_image)] if mask is not None else None
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
                 store: Union[torch.device, str, os.PathLike, None] = None) -> torch.Tensor:
    """The decoder's forward (z (B,C,h,w) after post_quant_conv -> (B,3,8h,8w)) in latent tiles of core
    side `tile` with `overlap` latent pixels of context. Tile states wait on `store` (open_store: by default
    host memory for a GPU decode, files under $TMPDIR for a CPU one)."""
    check_tile(tile, overlap)
    if (masked_image is None) != (mask is None):
        raise ValueError("tiled_decode: pass both masked_image and mask, or neither")
    store = open_store(store, z.device)
    try:
        return _drive(decoder, z, masked_image, mask, tile, overlap, store)
    finally:
        store.close()


def _drive(decoder, z, masked_image, mask, tile, overlap, store):
    """Runs the tile programs norm by norm: one round per GroupNorm gathers every core's statistics while the
    tiles park their inputs; the next round resumes each tile with its input normalised by them."""
    h = decoder.mid_path(z)  # (B, 4ch, h, w): whole latent, exact attention
    f = decoder.upsample_factor
    tiles, programs = [], []
    for cy0, cy1, py0, py1 in spans(z.shape[-2], tile, overlap):
        for cx0, cx1, px0, px1 in spans(z.shape[-1], tile, overlap):
            rows, cols = slice(py0 * f, py1 * f), slice(px0 * f, px1 * f)
            crops = (masked_image[..., rows, cols], mask[..., rows, cols]) if mask is not None else (None, None)
            tiles.append(((cy0, cy1, cx0, cx1), (cy0 - py0, cy1 - py0, cx0 - px0, cx1 - px0), py1 - py0))
            programs.append(_tile_program(decoder, h[..., py0:py1, px0:px1], *crops, store))
    del h
    out, stats, waiting = None, None, [None] * len(programs)  # waiting: each tile's (GroupNorm, boxed input)
    while programs[0] is not None:  # all tiles finish together: the same program
        gathered = _Stats()
        for t, (program, (_, (y0, y1, x0, x1), side)) in enumerate(zip(programs, tiles)):
            sent = None
            if waiting[t] is not None:  # normalised here, one tile at a time: the device holds one tile's
                norm, box = waiting[t]
                sent = _normalise(norm, store.fetch(box[0], z.device), *stats.whole(norm))
                waiting[t] = None
            try:
                norm, box = program.send(sent)
            except StopIteration as done:
                out = _place(out, done.value, tiles[t], f, z.shape[-2:])
                programs[t] = None
                continue
            sent = None
            s = box[0].shape[-2] // side  # this activation's scale over the latent: 1, 2, 4, 8
            gathered.add(norm, box[0][..., y0 * s:y1 * s, x0 * s:x1 * s])
            box[0] = store.park(box[0])
            waiting[t] = (norm, box)
        stats = gathered
    return out


def _place(out, y, tile, f, latent_size):
    """Write tile output y's core into out (B,3,8h,8w), allocated at the first tile."""
    (cy0, cy1, cx0, cx1), (y0, y1, x0, x1), _ = tile
    if out is None:
        out = y.new_empty(*y.shape[:2], latent_size[0] * f, latent_size[1] * f)
    out[..., cy0 * f:cy1 * f, cx0 * f:cx1 * f] = y[..., y0 * f:y1 * f, x0 * f:x1 * f]
    return out
