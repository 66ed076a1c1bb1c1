"""Pack an image folder into webdataset shards, keeping each file's original bytes (no re-encoding).

    python scripts/make_shards.py SRC_FOLDER OUT_DIR [--shard-size 1000] [--prefix train]

Unreadable files (corrupt, truncated, zero-byte, not images) are left out and listed at the end.
Files are shuffled (fixed seed) so that each shard mixes the folder's classes. Prints the brace pattern
to use as `data.source`.
"""
import argparse
import os
import random
import sys

import webdataset as wds
from tqdm import tqdm

from data.images import load_crop
from ldm.cli import at_least, existing_folder
from data.sources import image_suffix, list_image_files


def shard_key(path, root, taken):
    """A unique webdataset key from the relative path: no dots (webdataset splits key and suffix at one)."""
    stem = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/").replace(".", "_")
    key, n = stem, 1
    while key in taken:  # "a.jpg" and "a.png" in one folder
        key, n = f"{stem}_{n}", n + 1
    taken.add(key)
    return key


def write_shards(files, root, out_dir, shard_size, prefix):
    """Write the readable files as shards; returns (number written, number of shards, [(path, reason)])."""
    os.makedirs(out_dir, exist_ok=True)
    skipped, taken, written = [], set(), 0
    writer = wds.ShardWriter(os.path.join(out_dir, f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0)
    try:
        for path in tqdm(files, desc="shards", unit="img", file=sys.stderr):
            with open(path, "rb") as f:
                raw = f.read()
            try:
                load_crop(raw, 32)  # full decode check (reduced-scale for JPEG): truncation shows here
            except Exception as error:
                skipped.append((path, f"{type(error).__name__}: {error}"))
                continue
            writer.write({"__key__": shard_key(path, root, taken), image_suffix(path): raw})
            written += 1
        shards = writer.shard  # shards opened so far (close() deletes the attribute)
    finally:
        writer.close()
    return written, shards, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=existing_folder, help="image folder (searched recursively for jpg, jpeg, png, webp, bmp)")
    parser.add_argument("out", help="output folder for the .tar shards")
    parser.add_argument("--shard-size", type=at_least(1), default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", default="train", help="shard file name prefix (default train)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file order shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    args = parser.parse_args(argv)

    files = list_image_files(args.src)
    if not files:
        sys.exit(f"make_shards: no image files under {args.src!r}")
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(files)
    written, shards, skipped = write_shards(files, args.src, args.out, args.shard_size, args.prefix)
    print(f"wrote {written} images to {shards} shards in {args.out}; skipped {len(skipped)} unreadable files")
    for path, reason in skipped[:20]:
        print(f"  skipped {path}: {reason}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")
    if written:
        last = shards - 1
        print(f"source: {os.path.join(args.out, f'{prefix_range(args.prefix, last)}')}")
    return 0 if written else 1


def prefix_range(prefix, last):
    """The brace pattern naming shards 0..last."""
    return f"{prefix}-000000.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"


if __name__ == "__main__":
    sys.exit(main())
