"""Cache the frozen encoder's posterior of random training crops in webdataset shards; training then skips the encoder.

    python scripts/cache_latents.py -c CONFIG [key=value ...] --out DIR [--shard-size 1000] [--crops-per-image 1]
        [--batch-size 16] [--workers N] [--limit N] [--prefix latents]

Reads `data.source` (sample photographs, a folder, or image shards; a folder's files in an order shuffled by
data.seed, shards in their own order) and builds the frozen encoder as train.py does: `model.vae_ckpt` in any
format, null = the random init that `seed` gives. Each image gets K square crops drawn as training draws them
(data.crop_min_scale, data.flip, resized to data.resolution) from (data.seed, image index, k): the same command
writes the same shards. A sample holds the crop as lossless PNG, the posterior "mean.npy" / "logvar.npy" (float32
(4, R/8, R/8), encoded in fp32 with TF32 off, so a cache does not depend on the GPU it was made on) and
"json" (crop box in source pixels, flip, source key, resolution, encoder fingerprint). Train on it with
    python train.py -c CONFIG data.source='DIR/latents-{000000..000NNN}.tar' data.flip=false
A cache made at another resolution or with other encoder weights is refused, naming the file and both values.
"""
import argparse
import collections
import itertools
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # data/ and ldm/ from a checkout

from data.datasets import to_image  # noqa: E402
from data.images import load_crop  # noqa: E402
from data.latents import (CACHE_ORDER_STREAM, CACHE_STREAM, LatentCacheError, encoder_fingerprint,  # noqa: E402
                          is_latent_cache, npy_bytes, png_bytes)
from data.masks import sample_rng  # noqa: E402
from data.sources import file_samples, resolve_source, shard_samples  # noqa: E402
from ldm import build_autoencoder, load_into  # noqa: E402
from ldm.cli import at_least, script_main  # noqa: E402
from ldm.training.config import load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], help="YAML merged over configs/base.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.resolution=256")
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--shard-size", type=at_least(1), default=1000, help="samples per shard (default 1000)")
    p.add_argument("--crops-per-image", type=at_least(1), default=1, help="random crops cached per image (default 1)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="crops per encoder forward (default 16)")
    p.add_argument("--workers", type=at_least(0), default=min(4, os.cpu_count() or 1),
                   help="processes decoding and cropping images (0 = in this process)")
    p.add_argument("--limit", type=at_least(1), default=None, help="cache the first N images only")
    p.add_argument("--prefix", default="latents", help="shard file name prefix (default latents)")
    return p.parse_intermixed_args(argv)  # overrides on either side of the flags


def source_items(data):
    """(index, key, path-or-bytes) of the source's images in cache order (folders: shuffled by data.seed)."""
    source = resolve_source(data.source)
    if is_latent_cache(source):
        raise SystemExit(f"cache_latents: data.source {data.source!r} is already a latent cache")
    if source.kind == "files":
        order = sample_rng(data.seed, CACHE_ORDER_STREAM).permutation(len(source.items))
        pairs = file_samples([source.items[i] for i in order], source.root)
    else:
        pairs = shard_samples(source.items, lambda name, error: print(f"skipped {name}: {error}", file=sys.stderr))
    return ((i, key, raw) for i, (key, raw) in enumerate(pairs))


def draw_crops(job):
    """Worker: the K training-style crops of one image, (index, key, [(box, flipped, pixels)], error)."""
    (index, key, raw), (seed, resolution, min_scale, flip, crops) = job
    try:
        out = []
        for k in range(crops):
            rng = sample_rng(seed, CACHE_STREAM, index, k)
            pixels, box, flipped = load_crop(raw, resolution, rng, min_scale, flip, with_crop=True)
            out.append(([round(v, 3) for v in box], flipped, pixels))
        return index, key, out, None
    except Exception as error:  # corrupt, truncated, not an image: skipped and listed
        return index, key, None, f"{type(error).__name__}: {error}"


def in_order(pool, fn, jobs, ahead):
    """fn(job) for each job, in order, with at most `ahead` jobs in the pool (Pool.imap reads every job at once and
    queues all finished crops in this process while the encoder is slower)."""
    in_flight = collections.deque()
    for job in jobs:
        in_flight.append(pool.apply_async(fn, (job,)))
        if len(in_flight) >= ahead:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def build_encoder(cfg, device):
    """The run's frozen encoder (and quant_conv) as train.py builds it: same seed, same weights file."""
    torch.manual_seed(cfg.seed)  # train.py: pl.seed_everything(seed), then the VAE, encoder first
    vae = build_autoencoder(**cfg.model.autoencoder)
    if cfg.model.vae_ckpt:
        load_into(vae, cfg.model.vae_ckpt, parts=("encoder", "quant_conv"))
    del vae.decoder  # only encode() is used: no memory for a large decoder
    return vae.eval().to(device)


class CacheWriter:
    """Batches crops through the encoder and writes the samples to shards."""

    def __init__(self, vae, fingerprint, cfg, out, prefix, shard_size, batch_size):
        self.vae, self.fingerprint, self.cfg, self.batch_size = vae, fingerprint, cfg, batch_size
        self.device = next(vae.parameters()).device
        os.makedirs(out, exist_ok=True)
        self.writer = wds.ShardWriter(os.path.join(out, f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0)
        self.pending, self.written, self.png_bytes = [], 0, 0

    def add(self, index, key, crops):
        for k, (box, flipped, pixels) in enumerate(crops):
            self.pending.append((f"{index:09d}_{k:03d}", key, box, flipped, pixels))
        if len(self.pending) >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self):
        if not self.pending:
            return
        images = torch.stack([to_image(p[-1]) for p in self.pending]).to(self.device)  # as training reads them
        posterior = self.vae.encode(images)
        means, logvars = (t.float().cpu().numpy() for t in (posterior.mean, posterior.logvar))
        for (name, key, box, flipped, pixels), mean, logvar in zip(self.pending, means, logvars):
            meta = dict(key=key, box=box, flip=flipped, resolution=self.cfg.data.resolution,
                        encoder=self.fingerprint, source=str(self.cfg.data.source))
            png = png_bytes(pixels)
            self.writer.write({"__key__": name, "png": png, "mean.npy": npy_bytes(mean),
                               "logvar.npy": npy_bytes(logvar), "json": json.dumps(meta).encode()})
            self.written, self.png_bytes = self.written + 1, self.png_bytes + len(png)
        self.pending = []

    def close(self):
        self.flush()
        shards = getattr(self.writer, "shard", 0)  # shards opened so far (close() deletes the attribute)
        self.writer.close()
        return shards


@script_main
def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(ROOT / "configs" / "base.yaml", args.config, args.overrides)
    d = cfg.data
    settings = (d.seed, d.resolution, d.crop_min_scale, d.flip, args.crops_per_image)
    try:
        jobs = ((item, settings) for item in itertools.islice(source_items(d), args.limit))
    except LatentCacheError as err:  # no shard of the source could be read
        print(f"error: {err}", file=sys.stderr)
        return 2
    pool = multiprocessing.Pool(args.workers) if args.workers > 0 else None  # before CUDA
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full fp32
    vae = build_encoder(cfg, device)
    fingerprint = encoder_fingerprint(vae)
    writer = CacheWriter(vae, fingerprint, cfg, args.out, args.prefix, args.shard_size, args.batch_size)
    skipped = []
    try:
        results = in_order(pool, draw_crops, jobs, 4 * args.workers) if pool else map(draw_crops, jobs)
        for index, key, crops, error in tqdm(results, desc="cache", unit="img", file=sys.stderr):
            if error is None:
                writer.add(index, key, crops)
            else:
                skipped.append((key, error))
        shards = writer.close()
    finally:
        if pool is not None:
            pool.terminate()
    report(args, cfg, device, fingerprint, writer, shards, skipped)
    return 0 if writer.written else 1


def report(args, cfg, device, fingerprint, writer, shards, skipped):
    r, n = cfg.data.resolution, writer.written
    print(f"cached {n} crops ({args.crops_per_image} per image) in {shards} shard(s) in {args.out}; "
          f"skipped {len(skipped)} unreadable images")
    for key, reason in skipped[:20]:
        print(f"  skipped {key}: {reason}")
    print(f"encoder fingerprint {fingerprint} (model.vae_ckpt={cfg.model.vae_ckpt}), encoded on {device} in fp32; "
          f"resolution {r}, data.flip={cfg.data.flip}, data.seed={cfg.data.seed}")
    if n:
        latent_kib = 2 * cfg.model.autoencoder.embed_dim * (r // 8) ** 2 * 4 / 1024
        print(f"per sample: PNG {writer.png_bytes / n / 1024:.1f} KiB + mean and logvar {latent_kib:.1f} KiB (float32)")
        last = shards - 1
        pattern = f"{args.prefix}-000000.tar" if last == 0 else f"{args.prefix}-{{000000..{last:06d}}}.tar"
        print(f"source: {os.path.join(args.out, pattern)}  (train with data.flip=false)")


if __name__ == "__main__":
    sys.exit(main())
