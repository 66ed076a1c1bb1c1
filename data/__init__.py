"""Data: random inpainting masks, image sources (sample photos, folders, webdataset shards), the datamodule.

Batches are dicts: "image" float32 (B,3,R,R) in [-1,1], "mask" float32 (B,1,R,R) with 1 = hole, "key" ids;
validation batches add "index" (B,), each image's place among the validation images;
training on a latent cache adds the posterior "mean" and "logvar", float32 (B,4,R/8,R/8).
"""
from .datamodule import EpochLoader, ImageMaskDataModule, LogSkippedFiles
from .datasets import ImageMaskTrain, ImageMaskVal, collect
from .images import IMAGE_SUFFIXES, SkipCounter, load_crop, to_rgb
from .latents import LatentCacheError, LatentCacheTrain, encoder_fingerprint
from .masks import (
    MEAN_AREA,
    PRESETS,
    MaskGenerator,
    box_mask,
    load_mask_files,
    make_eval_masks,
    outpaint_mask,
    sample_rng,
    seed_of,
    save_masks,
    stroke_mask,
)
from .sources import SAMPLE_IMAGES, Source, list_image_files, resolve_source, sample_image_files

__all__ = [
    "ImageMaskDataModule", "EpochLoader", "LogSkippedFiles",
    "ImageMaskTrain", "ImageMaskVal", "collect",
    "IMAGE_SUFFIXES", "SkipCounter", "load_crop", "to_rgb",
    "LatentCacheError", "LatentCacheTrain", "encoder_fingerprint",
    "MEAN_AREA", "PRESETS", "MaskGenerator", "box_mask", "stroke_mask", "outpaint_mask",
    "load_mask_files", "make_eval_masks", "sample_rng", "save_masks", "seed_of",
    "SAMPLE_IMAGES", "Source", "list_image_files", "resolve_source", "sample_image_files",
]
