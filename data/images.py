"""Decoding any image file to an RGB crop: turned as shown (EXIF orientation), mode conversion, fast JPEG draft
decoding, skip counting. Every image file this project reads is opened by `decode_image` (a test enforces it)."""
import io
import logging
import math
import multiprocessing

import numpy as np
from PIL import ExifTags, Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")  # lower case, no dot; also the shard member suffixes


class SkipCounter:
    """Count of unreadable files, shared by the DataLoader worker processes (shared memory)."""

    def __init__(self, max_warnings=10):
        self._count = multiprocessing.Value("q", 0)  # inherited by workers: fork, spawn and forkserver
        self.max_warnings = max_warnings  # per process: a broken dataset must not flood the log
        self._warned = 0

    def add(self, name, error):
        """Count one skipped file and warn about the first few."""
        with self._count.get_lock():
            self._count.value += 1
        if self._warned < self.max_warnings:
            self._warned += 1
            last = self._warned == self.max_warnings
            more = " (further skips in this process are counted, not logged)" if last else ""
            log.warning("skipped unreadable image %s: %s: %s%s", name, type(error).__name__, error, more)

    @property
    def value(self):
        """Files skipped so far, over all worker processes."""
        return self._count.value


TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (6, 8: a phone held upright)


def decode_image(src, plan=None):
    """(image, scale): the image in `src` (a path or the file's bytes) decoded and turned as it is shown, its EXIF
    orientation applied (a phone photo stored landscape with orientation 6 or 8 comes out portrait, as viewers show
    it and as its mask was drawn); any PIL mode (to_rgb converts). Raises on unreadable or truncated data.

    plan(width, height) -> (w, h) or None is called with the shown size before the pixels are decoded; a JPEG then
    decodes at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) while it keeps at least w x h pixels. `scale`: decoded
    pixels per shown pixel, exactly 1/s (the image has ceil(size / s) pixels); 1 without a reduction."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ValueError("zero-byte file")
        src = io.BytesIO(src)
    scale = 1.0
    with Image.open(src) as img:
        if plan is not None and img.format == "JPEG":  # its EXIF (APP1) precedes the pixels: known before decoding
            turned = img.getexif().get(ExifTags.Base.Orientation, 1) in TURNED
            stored = img.size
            want = plan(*(stored[::-1] if turned else stored))
            drafted = img.draft(img.mode, want[::-1] if turned else want) if want is not None else None
            if drafted is not None:  # (mode, (0, 0, the source's extent in decoded pixels)); a mirrored orientation
                scale = drafted[1][2] / stored[0]  # (2, 4, 5, 7) shifts the crop by under a decoded pixel
            plan = None
        img.load()  # the actual decode: raises on truncated or corrupt data
        ImageOps.exif_transpose(img, in_place=True)
    if plan is not None:
        plan(*img.size)
    return img, scale


def open_image(src):
    """The image in `src` (a path or bytes), decoded and turned as shown (decode_image)."""
    return decode_image(src)[0]


def to_rgb(img):
    """Any PIL mode as 8-bit RGB: 16/32-bit and float rescaled, alpha composited on white, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)  # (H, W) uint16 / int32; 16-bit PNGs span 0..65535
        img = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        peak = 255.0 if arr.max() > 1.0 else 1.0  # float images come either in [0, 1] or [0, 255]
        img = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)  # transparent pixels hold arbitrary colours: paint them white
    return img if img.mode == "RGB" else img.convert("RGB")


def _largest(width, height, aspect):
    """(w, h) of the largest box of width / height `aspect` inside width x height."""
    return (height * aspect, height) if width > height * aspect else (width, width / aspect)


def random_crop_box(rng, width, height, min_scale=0.5, aspect=1.0):
    """(left, top, right, bottom) of the largest box of width / height `aspect` scaled by U(min_scale, 1), at a
    uniform position (aspect 1: a square of side min_side * U(min_scale, 1))."""
    scale = rng.uniform(min_scale, 1.0)
    w, h = (side * scale for side in _largest(width, height, aspect))
    left = rng.uniform(0.0, width - w)
    top = rng.uniform(0.0, height - h)
    return (left, top, left + w, top + h)


def center_crop_box(width, height, aspect=1.0):
    """The largest centred box of width / height `aspect` (1: the largest centred square)."""
    w, h = _largest(width, height, aspect)
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def load_crop(src, resolution, rng=None, min_scale=0.5, flip=False, with_crop=False):
    """Decode `src` (path or bytes) as it is shown (decode_image: EXIF orientation), crop (random if rng else
    centred) a box of the output's aspect, resize to `resolution` (a side, or (height, width)): (H, W, 3) uint8;
    with_crop: (pixels, the box in shown source pixels, flipped).

    Raises on unreadable data; callers count and skip. Crops smaller than the output are upscaled, larger ones
    downscaled by area averaging.
    """
    out_h, out_w = (int(resolution),) * 2 if np.ndim(resolution) == 0 else map(int, resolution)
    chosen = []

    def plan(width, height):  # the box, in shown pixels; a big JPEG decodes reduced while the crop keeps out_w px
        aspect = out_w / out_h
        box = (random_crop_box(rng, width, height, min_scale, aspect) if rng is not None
               else center_crop_box(width, height, aspect))
        chosen.append(box)
        side = box[2] - box[0]  # the box's width, out_w pixels of the output
        return (math.ceil(width * out_w / side), math.ceil(height * out_w / side)) if side > 2 * out_w else None

    img, scale = decode_image(src, plan)
    with img:
        rgb = to_rgb(img)
    source_box = chosen[0]
    box = tuple(v * scale for v in source_box)  # in decoded pixels
    side = box[2] - box[0]
    # area averaging to shrink (PIL BOX); bilinear to enlarge, which is what cv2.INTER_AREA does there
    resample = Image.BOX if side >= out_w else Image.BILINEAR
    out = rgb.resize((out_w, out_h), resample, box=box)
    flipped = bool(flip and rng is not None and rng.random() < 0.5)
    if flipped:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.array(out)  # (H, W, 3) uint8, writable
    return (pixels, source_box, flipped) if with_crop else pixels
