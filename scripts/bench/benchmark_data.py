"""Loader throughput: (image, mask) samples per second that one worker process produces, at 256 px.

    python scripts/bench/benchmark_data.py [--resolution 256] [--samples 1024] [--folder DIR] [--shards PATTERN]

Without --folder/--shards it builds ImageNet-like data in a temporary folder: the bundled sample photos,
randomly cropped and resized to 500 px on the long side (ImageNet's typical 500x375), saved as JPEG
(quality 90), and the same files packed as webdataset shards by scripts/make_shards.py's writer (data/shards.py) (a --folder is
searched recursively, as training does). The loop is a DataLoader with
num_workers=0 and one torch thread, i.e. the work each DataLoader worker does (decode, crop, resize,
flip, mask, tensor conversion, collation). Masks: the paper's recipe (p_full 0.5, thick/medium/thin).
Each source is timed in 3 rounds; the best round is reported (other processes only slow rounds down).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from data import EpochLoader, ImageMaskTrain, MaskGenerator, list_image_files, resolve_source, sample_image_files
from data.images import open_image
from data.shards import prefix_range, write_shards
from ldm.cli import at_least, existing_folder, multiple_of_8, script_main


def make_jpeg_folder(out_dir, copies=8, long_side=500, seed=0):
    """Random crops of the sample photos as JPEGs of `long_side` px; returns the folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    for path in sample_image_files():
        with open_image(path) as img:
            photo = img.convert("RGB")
        for c in range(copies):
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crop = photo.crop((x, y, x + cw, y + ch))
            crop.thumbnail((long_side, long_side), Image.LANCZOS)  # long side = 500 px, aspect kept
            if max(crop.size) < long_side:
                scale = long_side / max(crop.size)
                crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
            name = os.path.splitext(os.path.basename(path))[0]
            crop.save(os.path.join(out_dir, f"{name}_{c}.jpg"), quality=90)
    return out_dir


def make_shards(folder, out_dir, per_shard=24):
    """The folder's image files (recursively, sorted), bytes unchanged, as shards; returns the brace pattern."""
    written, shards, _skipped = write_shards(list_image_files(folder), folder, out_dir, per_shard, "bench")
    if not written:
        raise SystemExit(f"benchmark_data: no readable image under {folder!r}")
    return os.path.join(out_dir, prefix_range("bench", shards - 1))


def samples_per_second(source, resolution, n_samples, rounds=3, batch_size=32):
    """Samples/s of one process producing collated batches from `source` (n_samples rounded up to whole
    batches): each round's rate."""
    n_batches = -(-n_samples // batch_size) + 2  # + 2 warm-up batches
    dataset = ImageMaskTrain(resolve_source(source), resolution, MaskGenerator(resolution, p_full=0.5),
                             length=n_batches * batch_size, batch_size=batch_size, shuffle_buffer=100)
    loader = EpochLoader(dataset, batch_size=batch_size, num_workers=0)  # each round another epoch's stream
    rates = []
    for _ in range(rounds):  # best of several rounds: other processes on the machine only slow a round down
        batches = iter(loader)
        for _ in range(2):  # warm-up: file cache, shuffle buffer
            next(batches)
        start, count = time.perf_counter(), 0
        for batch in batches:
            count += len(batch["key"])
        rates.append(count / (time.perf_counter() - start))
    return rates


def describe_jpegs(folder):
    files = list_image_files(folder)
    sizes = []
    for path in files:
        with open_image(path) as img:  # as shown (EXIF orientation), as the loader reads it
            sizes.append(img.size)
    kb = np.mean([os.path.getsize(path) for path in files]) / 1024
    width, height = np.mean(sizes, axis=0)
    return f"{len(sizes)} JPEGs, mean {width:.0f}x{height:.0f} px, {kb:.0f} KB"


@script_main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=multiple_of_8, default=256)
    parser.add_argument("--samples", type=at_least(1), default=1024,
                        help="samples timed per round, rounded up to batches of 32 (3 rounds per source)")
    parser.add_argument("--folder", type=existing_folder, help="benchmark this image folder instead of the generated one")
    parser.add_argument("--shards", help="benchmark these shards (pattern/URL) instead of the generated ones")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_jpeg_folder(os.path.join(tmp, "jpeg"))
        shards = args.shards or make_shards(folder, tmp)
        if not args.folder:
            print(f"data: {describe_jpegs(folder)}; shards {shards}")
        print(f"{args.resolution} px, masks p_full 0.5 + thick/medium/thin, batch 32, 1 process, 1 torch thread")
        folder_rates = samples_per_second(folder, args.resolution, args.samples)
        shard_rates = samples_per_second(shards, args.resolution, args.samples)
        print(f"rounds (samples/s): folder {' '.join(f'{r:.0f}' for r in folder_rates)}; "
              f"shards {' '.join(f'{r:.0f}' for r in shard_rates)}")
        print(f"folder: {max(folder_rates):.0f} samples/s per worker")
        print(f"shards: {max(shard_rates):.0f} samples/s per worker")


if __name__ == "__main__":
    sys.exit(main())
