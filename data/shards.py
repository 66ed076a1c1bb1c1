"""Webdataset shards of an image folder: each file's original bytes (no re-encoding), unreadable files left out."""
import os
import sys

import webdataset as wds
from tqdm import tqdm

from .images import load_crop
from .sources import image_suffix


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


def prefix_range(prefix, last):
    """The brace pattern naming shards 0..last."""
    return f"{prefix}-000000.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"
