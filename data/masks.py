"""Random inpainting masks (LaMa-style strokes, boxes, outpainting) and fixed evaluation masks.

Convention everywhere: 1 = hole (to be generated), 0 = known. A mask is a (H, W) uint8 array here;
the datasets turn it into a float32 (1, H, W) tensor. All randomness comes from the
``numpy.random.Generator`` passed in, never from a global RNG.
"""
import copy
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .images import open_image

BASE_RESOLUTION = 256  # the presets' pixel sizes are for 256 px; other resolutions scale them

# LaMa's evaluation presets (configs/data_gen/random_{thick,medium,thin}_256.yaml), sizes in pixels at 256 px.
# Within a preset one component is drawn per mask, with probability weight / sum(weights):
# thick and medium are strokes 1.0 : boxes 0.3, i.e. p = 0.77 / 0.23.
# MEAN_AREA: each preset's expected hole fraction, measured over 4000 masks at 256 px (standard error
# ~0.003); tests/test_masks.py checks it at 256 and 512 px.
PRESETS = {
    "thick": {
        "strokes": dict(weight=1.0, min_times=1, max_times=5, max_width=100, max_len=200, max_angle=4),
        "boxes": dict(weight=0.3, min_times=1, max_times=3, min_size=30, max_size=150, margin=10),
    },
    "medium": {
        "strokes": dict(weight=1.0, min_times=4, max_times=5, max_width=50, max_len=100, max_angle=4),
        "boxes": dict(weight=0.3, min_times=1, max_times=5, min_size=10, max_size=50, margin=0),
    },
    "thin": {
        "strokes": dict(weight=1.0, min_times=4, max_times=50, max_width=10, max_len=40, max_angle=4),
    },
    # LaMa's OutpaintingMaskGenerator: each side padded by 4-25 % with p 0.5 (at least one side)
    "outpaint": {
        "outpaint": dict(weight=1.0, min_pad=0.04, max_pad=0.25, p_side=0.5),
    },
}
MEAN_AREA = {"thick": 0.365, "medium": 0.217, "thin": 0.268, "outpaint": 0.272}


def stroke_mask(rng, size, scale=1.0, min_times=1, max_times=5, max_width=100, max_len=200, max_angle=4):
    """Irregular brush strokes (LaMa's make_random_irregular_mask, round-capped lines); (H, W) uint8."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    times = int(rng.integers(min_times, max_times + 1))
    segments = 1 + rng.integers(5, size=times)  # 1-5 segments per stroke
    starts = (rng.random((times, 2)) * (w, h)).tolist()
    n = int(segments.sum())  # all draws at once, as Python floats: per-scalar numpy calls dominate otherwise
    angles = (0.01 + rng.integers(max_angle, size=n)).tolist()
    lengths = ((10 + rng.integers(max_len, size=n)) * scale).tolist()
    widths = ((5 + rng.integers(max_width, size=n)) * scale).tolist()
    k = 0
    for i in range(times):
        x, y = starts[i]
        r_prev = 0.0  # cap radius of the previous segment at (x, y)
        for _ in range(int(segments[i])):
            angle = 2 * math.pi - angles[k] if i % 2 == 0 else angles[k]
            x2 = min(max(x + lengths[k] * math.sin(angle), 0.0), w)
            y2 = min(max(y + lengths[k] * math.cos(angle), 0.0), h)
            draw.line([(x, y), (x2, y2)], fill=1, width=max(1, round(widths[k])))
            r = max(widths[k] / 2, r_prev)  # round caps and joints, as OpenCV's thick lines; the larger covers both
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
            x, y, r_prev, k = x2, y2, widths[k] / 2, k + 1
        draw.ellipse([x - r_prev, y - r_prev, x + r_prev, y + r_prev], fill=1)  # the stroke's end cap
    return np.array(canvas, dtype=np.uint8)  # a writable copy


def box_mask(rng, size, scale=1.0, min_times=1, max_times=3, min_size=30, max_size=150, margin=10):
    """Axis-aligned rectangles (LaMa's make_random_rectangle_mask); (H, W) uint8."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    margin = round(margin * scale)
    lo = max(1, round(min_size * scale))
    hi = max(lo + 1, min(round(max_size * scale), h - 2 * margin, w - 2 * margin))
    for _ in range(rng.integers(min_times, max_times + 1)):
        bw, bh = rng.integers(lo, hi), rng.integers(lo, hi)
        x = rng.integers(margin, max(margin, w - margin - bw) + 1)
        y = rng.integers(margin, max(margin, h - margin - bh) + 1)
        mask[y:y + bh, x:x + bw] = 1
    return mask


def outpaint_mask(rng, size, scale=1.0, min_pad=0.04, max_pad=0.25, p_side=0.5):
    """Bands along the image sides (LaMa's OutpaintingMaskGenerator); at least one side; (H, W) uint8."""
    h, w = size  # scale unused: padding is a fraction of the side
    mask = np.zeros((h, w), np.uint8)
    sides = rng.random(4) < p_side  # top, bottom, left, right
    if not sides.any():
        sides[rng.integers(4)] = True
    pads = [int(rng.integers(int(min_pad * n), max(int(min_pad * n) + 1, int(max_pad * n)))) for n in (h, h, w, w)]
    if sides[0]:
        mask[: pads[0]] = 1
    if sides[1]:
        mask[h - pads[1]:] = 1
    if sides[2]:
        mask[:, : pads[2]] = 1
    if sides[3]:
        mask[:, w - pads[3]:] = 1
    return mask


KINDS = {"strokes": stroke_mask, "boxes": box_mask, "outpaint": outpaint_mask}


def resolve_presets(overrides=None):
    """The built-in presets with `overrides` ({preset: {kind: {param: value}}}) merged in; new names allowed."""
    presets = copy.deepcopy(PRESETS)
    for name, kinds in (overrides or {}).items():
        target = presets.setdefault(name, {})
        for kind, params in kinds.items():
            if kind not in KINDS:
                raise ValueError(f"mask preset {name!r}: unknown kind {kind!r}, expected one of {sorted(KINDS)}")
            target.setdefault(kind, {"weight": 1.0}).update(params or {})
    return presets


class MaskGenerator:
    """All-ones with probability p_full, else one component of the weighted preset mix (LaMa's mixed masks)."""

    def __init__(self, resolution, p_full=0.5, mix=None, presets=None):
        if not 0.0 <= p_full <= 1.0:
            raise ValueError(f"p_full must be in [0, 1], got {p_full}")
        self.resolution = int(resolution)
        self.p_full = float(p_full)
        self.scale = self.resolution / BASE_RESOLUTION
        mix = {"thick": 1.0, "medium": 1.0, "thin": 1.0} if mix is None else mix
        table = resolve_presets(presets)
        self.components = []  # (probability, kind, params): flattened over presets, one drawn per mask
        for name, preset_weight in mix.items():
            if name not in table:
                raise ValueError(f"unknown mask preset {name!r}, expected one of {sorted(table)}")
            parts = table[name]
            total = sum(p["weight"] for p in parts.values())
            for kind, params in parts.items():
                prob = preset_weight * params["weight"] / total
                if prob > 0:
                    self.components.append((prob, kind, {k: v for k, v in params.items() if k != "weight"}))
        if not self.components and self.p_full < 1.0:
            raise ValueError("mask mix has no component with positive weight and p_full < 1")
        probs = np.array([c[0] for c in self.components], dtype=np.float64)
        self.probs = probs / probs.sum() if len(probs) else probs

    def __call__(self, rng, size=None):
        """One uint8 mask of `size` (H, W) (default (R, R)), 1 = hole; pixel sizes scale with R (buckets of about R x R
        pixels keep them)."""
        size = (self.resolution, self.resolution) if size is None else tuple(size)
        if self.p_full > 0 and rng.random() < self.p_full:
            return np.ones(size, np.uint8)
        _, kind, params = self.components[rng.choice(len(self.components), p=self.probs)]
        return KINDS[kind](rng, size, scale=self.scale, **params)

    def __repr__(self):
        parts = ", ".join(f"{k}{p} p={q:.3f}" for q, (_, k, p) in zip(self.probs, self.components))
        return f"MaskGenerator(resolution={self.resolution}, p_full={self.p_full}, [{parts}])"


def seed_of(*ids) -> int:
    """A torch seed (a non-negative int64) from a seed-sequence id tuple: independent streams per tuple, as
    sample_rng's."""
    return int(np.random.SeedSequence([int(i) for i in ids]).generate_state(1, np.uint64)[0] >> 1)


def sample_rng(seed, *ids):
    """A fresh generator for one sample, seeded by (seed, *ids): independent streams per id tuple."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, ids)]))


EVAL_STREAM = 3  # stream tag: evaluation masks never share a seed sequence with training or validation


def make_eval_masks(n, resolution, seed=0, mix=None, presets=None, max_area=0.5, min_area=0.0, sizes=None):
    """n fixed masks (n, R, R) uint8 from `seed`; mask i depends only on (seed, i) (and its size), so sets nest.
    With `sizes` ((H, W) per mask; buckets of about R x R pixels): a list of (H, W) uint8 masks.

    Masks with hole area > max_area (LaMa drops those over 50 %) or <= min_area are redrawn.
    """
    gen = MaskGenerator(resolution, p_full=0.0, mix=mix, presets=presets)
    out = []
    for i in range(n):
        rng = sample_rng(seed, EVAL_STREAM, i)
        for _attempt in range(1000):
            mask = gen(rng, None if sizes is None else sizes[i])
            area = mask.mean()
            if min_area < area <= (1.0 if max_area is None else max_area):
                break
        else:
            raise RuntimeError(f"no mask with area in ({min_area}, {max_area}] after 1000 draws: {gen}")
        out.append(mask)
    return out if sizes is not None else np.stack(out) if out else np.empty((0, resolution, resolution), np.uint8)


def save_masks(masks, out_dir, prefix="mask"):
    """Write (N, H, W) {0,1} masks (or a list of (H, W) ones) as PNGs (white = hole) named prefix_00000.png...;
    returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, mask in enumerate(masks):
        path = out_dir / f"{prefix}_{i:05d}.png"
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(path)
        paths.append(path)
    return paths


MASK_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_mask_files(paths, resolution=None):
    """Masks from image files or a folder of them (white = hole) as float32 (N, 1, H, W) in {0, 1}.

    Colour or grey files are thresholded at 50 % grey; with `resolution` they are resized (nearest).
    """
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        folder = paths
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in MASK_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no mask files ({', '.join(sorted(MASK_SUFFIXES))}) under {str(folder)!r}")
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise FileNotFoundError("no mask files: the list of mask paths is empty")
    masks = []
    for path in paths:
        with open_image(path) as img:  # turned as shown (EXIF orientation), as its image
            grey = img.convert("L")
        if resolution is not None:
            grey = grey.resize((resolution, resolution), Image.NEAREST)
        masks.append(torch.from_numpy((np.asarray(grey) > 127).astype(np.float32)))
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"mask files have different sizes {sorted(shapes)}; pass resolution= to resize them")
    return torch.stack(masks)[:, None]  # (N, 1, H, W)
