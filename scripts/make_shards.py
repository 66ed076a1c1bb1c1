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

from data.shards import prefix_range, write_shards
from data.sources import list_image_files
from ldm.cli import at_least, existing_folder, script_main


@script_main
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


if __name__ == "__main__":
    sys.exit(main())
