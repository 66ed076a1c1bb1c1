"""Multi-aspect images: (height, width) buckets of about one pixel count, and batches of one shape each.

Training draws one bucket per batch (ImageMaskTrain); validation and evaluation give image i bucket i mod n and
batch the images of each shape together (`batched`), so a decoder and its mid-block attention see the shapes that
SDXL and FLUX users decode at one compute cost.
"""
import math

from torch.utils.data import IterableDataset, default_collate

SQUARE = (1.0,)  # the paper: square crops at data.resolution


def aspect_buckets(resolution: int, ratios=SQUARE, multiple: int = 8) -> list:
    """[(height, width)] per width / height ratio, in order: about resolution**2 pixels, each side the nearest
    multiple of `multiple` (at least one). (1.0,) gives [(resolution, resolution)]."""
    out = []
    for ratio in ratios:
        side = [resolution / math.sqrt(ratio), resolution * math.sqrt(ratio)]
        out.append(tuple(max(multiple, round(s / multiple) * multiple) for s in side))
    return out


def batched(samples, batch_size: int):
    """Batches (default_collate) of up to batch_size consecutive samples of one image shape from a stream of sample
    dicts: a shape's batch is served once full, the unfilled ones at the end in the order their shapes came. One
    shape only: the batches a DataLoader of that batch_size makes."""
    pending = {}  # (H, W) -> samples waiting
    for sample in samples:
        shape = tuple(sample["image"].shape[-2:])
        pending.setdefault(shape, []).append(sample)
        if len(pending[shape]) == batch_size:
            yield default_collate(pending.pop(shape))
    for rest in pending.values():
        yield default_collate(rest)


class ShapeBatches(IterableDataset):
    """`dataset`'s samples as `batched` batches, per DataLoader worker: load with DataLoader(batch_size=None)."""

    def __init__(self, dataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        return batched(iter(self.dataset), self.batch_size)
