"""Evaluation's images and masks: the first N images of a source, centre-cropped, each with a fixed mask.

Image i is centre-cropped to bucket i mod n of `buckets` ((H, W) shapes, data.buckets; default the square of the
resolution) and takes mask i mod M, fixed by the seed or read from files (white = hole).
"""
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from .images import SkipCounter, load_crop
from .masks import PRESETS, load_mask_files, make_eval_masks, save_masks
from .sources import shard_samples

MIXED = "mixed"  # thick + medium + thin in equal parts (MaskGenerator's default mix)
MASK_CHOICES = (*PRESETS, MIXED)


class EvalImages(IterableDataset):
    """Source image i, centre-cropped and resized to its bucket, with mask i mod len(masks) (resized, nearest, where
    its shape differs) and its "index"; unreadable files are skipped and counted."""

    def __init__(self, source, resolution, masks, n=None, buckets=None):
        self.source, self.masks, self.n = source, masks, n
        self.buckets = list(buckets or [(resolution, resolution)])
        self.skipped = SkipCounter()

    def _raw(self):
        if self.source.kind == "files":
            return iter(self.source.items)
        return (raw for _, raw in shard_samples(self.source.items, self.skipped.add))

    def shape(self, i):
        return self.buckets[i % len(self.buckets)]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, raw in enumerate(itertools.islice(self._raw(), self.n)):
            if i % workers != worker:
                continue
            try:
                pixels = load_crop(raw, self.shape(i))  # (H, W, 3) uint8, the largest centred box of its aspect
            except Exception as error:  # corrupt or not an image: counted and reported
                self.skipped.add(raw if isinstance(raw, str) else f"sample {i}", error)
                continue
            image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
            mask = self.masks[i % len(self.masks)].float()  # (1, h, w)
            if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
                mask = F.interpolate(mask[None], size=image.shape[-2:], mode="nearest")[0]
            yield {"image": image, "mask": mask, "index": i}


def image_count(source, num_images):
    """Images to evaluate (None: unknown, a shard source read to its end)."""
    if source.kind == "files":
        return len(source) if num_images is None else min(len(source), num_images)
    return num_images


def eval_masks(spec, resolution, n, seed=0, max_area=0.5, save_to=None, buckets=None):
    """(masks: bool (1, H, W) each, indexable; a description for the reports). `spec`: a preset name or `mixed`
    (n masks from the seed, mask i at image i's bucket; saved as PNGs to `save_to`), or a folder of mask files
    (resized, nearest, to the resolution; cycled when fewer than the images). ValueError names what is wrong."""
    if Path(spec).is_dir():
        masks = load_mask_files(spec, resolution=resolution) > 0.5  # (M, 1, R, R)
        cycled = n is None or len(masks) < n
        return masks, {"kind": "files", "folder": str(spec), "count": len(masks), "cycled": cycled}
    if spec not in MASK_CHOICES:
        raise ValueError(f"--masks {spec!r}: neither a folder nor a preset ({', '.join(MASK_CHOICES)})")
    if n is None:
        raise ValueError("--num-images is needed to generate masks for a shard source (its length is unknown)")
    mix = None if spec == MIXED else {spec: 1.0}
    buckets = list(buckets or [(resolution, resolution)])
    sizes = [buckets[i % len(buckets)] for i in range(n)] if len(buckets) > 1 else None
    arrays = make_eval_masks(n, resolution, seed=seed, mix=mix, max_area=max_area, sizes=sizes)  # (H, W) uint8 each
    if save_to:
        save_masks(arrays, save_to)
    masks = [torch.from_numpy(np.asarray(a)[None] > 0) for a in arrays]
    return masks, {"kind": "preset", "preset": spec, "seed": seed, "max_area": max_area, "count": n,
                   "saved": save_to}
