"""Latent caches (scripts/cache_latents.py): shards of fixed crops with the frozen encoder's posterior.

A cache sample holds "png" (the (R, R, 3) crop, lossless), "mean.npy" and "logvar.npy" (float32
(C, R/8, R/8), C the base's latent channels: the posterior of that crop, logvar clamped as
DiagonalGaussianDistribution does) and "json" (the crop box in source pixels, flip, the source key, the
resolution and the encoder's weight fingerprint). Training on a cache
reads the crop as stored (no new crop or flip), draws a fresh mask, and skips the encoder.
"""
import hashlib
import io
import json
import os

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from .datasets import ImageMaskTrain, to_sample
from .images import open_image

# seed-sequence tags of the cache's crops and of its folder order (datasets: 0-2 and 5, evaluation masks: 3).
# Not one tag: SeedSequence pads entropy shorter than 4 words with zeros, so (seed, tag) == (seed, tag, 0, 0),
# the ids of image 0's first crop.
CACHE_STREAM, CACHE_ORDER_STREAM = 4, 6
CACHE_MEMBERS = ("png", "mean.npy", "logvar.npy", "json")


class LatentCacheError(ValueError):
    """A latent cache that does not fit the run (resolution, encoder weights, flip) or cannot be read; the message
    names it."""


def encoder_fingerprint(vae) -> str:
    """16 hex digits of sha256 over the frozen encoder's weights (encoder.*, quant_conv.*; float32 bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def png_bytes(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def cache_samples(urls, on_error):
    """(key, sample dict) pairs of latent-cache shards in order; incomplete samples go to on_error(key, exc)."""

    def handler(exc):
        on_error(str(exc.args[-1]) if exc.args else "shard", exc)
        return True

    for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=handler):
        key = f"{os.path.basename(sample['__url__'])}/{sample['__key__']}"
        missing = [m for m in CACHE_MEMBERS if m not in sample]
        if missing:
            on_error(key, ValueError(f"latent-cache sample without {missing}"))
            continue
        yield key, sample


def is_latent_cache(source, shards=3) -> bool:
    """True when the first sample of the source's first readable shard (of its first `shards`) carries a
    posterior: a cache from scripts/cache_latents.py.

    LatentCacheError, naming them, if none of those shards can be read or holds a sample: the source's kind
    is then unknown, and a cache must not be read as image shards.
    """
    if source.kind != "shards":
        return False
    problems = []
    for url in source.items[:shards]:
        samples = wds.tarfile_samples([{"url": url}])
        try:
            sample = next(samples, None)
        except Exception as error:  # unreadable, truncated, not a tar
            problems.append(f"{url}: {type(error).__name__}: {error}")
            continue
        finally:
            samples.close()
        if sample is not None:
            return "mean.npy" in sample
        problems.append(f"{url}: no sample")
    raise LatentCacheError(f"image source {source.name!r}: no sample in its first shards to tell a latent cache "
                           f"from image shards ({'; '.join(problems)})")


def cache_meta(sample, name):
    """The sample's json as a dict with "resolution" and "encoder"; else LatentCacheError naming it and the key."""
    try:
        meta = json.loads(sample["json"])
    except ValueError as error:  # not UTF-8 or not JSON
        raise LatentCacheError(f"latent cache {name}: its json member is not JSON ({error})") from error
    missing = [key for key in ("resolution", "encoder") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise LatentCacheError(f"latent cache {name}: its json member has no {' or '.join(map(repr, missing))} key; "
                               f"re-run scripts/cache_latents.py")
    return meta


def check_cache_sample(sample, resolution, encoder=None):
    """Raise LatentCacheError, naming the file and both values, if the sample was made for another run's settings."""
    name = f"{sample['__url__']} (sample {sample['__key__']})"
    meta = cache_meta(sample, name)
    if meta["resolution"] != resolution:
        raise LatentCacheError(f"latent cache {name}: made at resolution {meta['resolution']}, this run's "
                               f"data.resolution is {resolution}; re-run scripts/cache_latents.py with the run's "
                               f"config")
    if encoder is not None and meta["encoder"] != encoder:
        raise LatentCacheError(f"latent cache {name}: made with encoder weights {meta['encoder']}, this run's "
                               f"(model.vae_ckpt) are {encoder}; re-run scripts/cache_latents.py with the run's config")


def check_cache(source, resolution, flip, encoder=None, buckets=None):
    """Fail early, in the main process, if the cache's first sample does not fit the run (or flip is on, or the run
    asks for other crops than squares of `resolution`)."""
    if buckets and list(buckets) != [(resolution, resolution)]:
        raise LatentCacheError(f"data.aspect_ratios gives crops of {[f'{h}x{w}' for h, w in buckets]} px, but latent "
                               f"cache {source.name!r} holds fixed {resolution}x{resolution} crops and their latents; "
                               f"train multi-aspect on images (data.source) or set data.aspect_ratios=[1.0]")
    if flip:
        raise LatentCacheError(f"data.flip=true with latent cache {source.name!r}: its crops and latents are fixed "
                               f"(cache_latents.py applies data.flip when it draws them); set data.flip=false")
    for _key, sample in cache_samples(source.items[:1], lambda name, error: None):
        check_cache_sample(sample, resolution, encoder)
        return
    raise LatentCacheError(f"latent cache {source.name!r}: no complete sample in {source.items[0]}")


class LatentCacheTrain(ImageMaskTrain):
    """ImageMaskTrain over a latent cache: stored crops (no new crop or flip), fresh masks, cached posteriors.

    Samples add "mean" and "logvar" (float32 (C, R/8, R/8)). Every sample's resolution, and its encoder
    fingerprint when `encoder` is given, must match the run's (else LatentCacheError: not a skipped file).
    """

    def __init__(self, source, resolution, mask_generator, length, encoder=None, **kwargs):
        super().__init__(source, resolution, mask_generator, length, flip=False, **kwargs)
        self.encoder = encoder

    def _shard_samples(self, urls, on_error):
        for key, sample in cache_samples(urls, on_error):
            check_cache_sample(sample, self.resolution, self.encoder)  # outside the caller's skip: an error
            yield key, sample

    def make_sample(self, key, raw, rng, mask):
        with open_image(raw["png"]) as img:
            pixels = np.array(img.convert("RGB"))
        sample = to_sample(pixels, mask, key)
        sample["mean"] = torch.from_numpy(np.load(io.BytesIO(raw["mean.npy"])))  # (C, R/8, R/8)
        sample["logvar"] = torch.from_numpy(np.load(io.BytesIO(raw["logvar.npy"])))
        return sample
