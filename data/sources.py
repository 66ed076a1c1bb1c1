"""Where images come from: the bundled sample photographs, an image folder, or webdataset shards."""
import os
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from .images import IMAGE_SUFFIXES

# The RGB photographs bundled with scikit-image (skimage.data's files; no download): the default source.
SAMPLE_IMAGES = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)


def sample_image_files():
    """Paths of the bundled sample photographs."""
    import skimage.data  # deferred: only the "sample" source needs scikit-image

    root = Path(skimage.data.data_dir)
    files = [str(root / name) for name in SAMPLE_IMAGES if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"none of the sample images {SAMPLE_IMAGES} found in {root}")
    return files


def list_image_files(folder):
    """Image files under `folder`, recursively, in sorted order (by suffix, case-insensitive)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if image_suffix(f) is not None)
    return files


def image_suffix(name):
    """The lower-case image suffix of a file or shard member name, or None."""
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return suffix if suffix in IMAGE_SUFFIXES else None


def is_remote(url):
    """True for URLs and pipe: commands, which webdataset opens itself."""
    return url.startswith("pipe:") or "://" in url


@dataclass
class Source:
    """A resolved source: `kind` "files" (paths) or "shards" (webdataset URLs); `name` as configured."""

    name: str
    kind: str
    items: list
    root: str = ""  # files: keys are paths relative to this folder

    def __len__(self):
        return len(self.items)


def resolve_source(source):
    """Turn "sample", a folder, or a shard pattern/URL/pipe: command into a Source; errors name the source."""
    name = str(source)
    if name == "sample":
        files = sample_image_files()
        return Source(name, "files", files, os.path.dirname(files[0]))
    if os.path.isdir(name):
        files = list_image_files(name)
        if not files:
            raise FileNotFoundError(f"image source {name!r}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
        return Source(name, "files", files, name)
    urls = wds.shardlists.expand_urls(name)  # brace patterns, "::"-joined lists, WDS_ environment variables
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"image source {name!r}: not a folder, and {len(missing)} of {len(urls)} shard files are missing "
            f"(first: {missing[0]!r})"
        )
    return Source(name, "shards", urls)


def shard_samples(urls, on_error):
    """(key, image bytes) pairs from webdataset shards in order; tar-level errors go to on_error(name, exc)."""

    def handler(exc):
        on_error(str(exc.args[-1]) if exc.args else "shard", exc)
        return True  # keep going: a broken shard must not stop a run

    for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=handler):
        suffix = next((k for k in sample if k in IMAGE_SUFFIXES), None)
        key = f"{os.path.basename(sample['__url__'])}/{sample['__key__']}"
        if suffix is None:
            on_error(key, ValueError(f"no image member among {sorted(k for k in sample if k[:2] != '__')}"))
            continue
        yield key, sample[suffix]


def file_samples(paths, root=""):
    """(key, path) pairs for image files; the key is the path relative to root."""
    for path in paths:
        yield (os.path.relpath(path, root) if root else path), path
