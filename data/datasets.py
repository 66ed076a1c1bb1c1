"""(image, mask) datasets: an endless training stream dealt over readers and a finite, fixed validation set.

Every random draw comes from a generator seeded by (seed, stream, epoch, position) for training samples of a
folder (rank, reader and index in place of the position for shards), (seed, stream, epoch, lap) for the file
order all readers share, and (seed, stream, sample index) for validation, never from the global numpy/torch
RNG. A pass resumed at batch b (set_epoch) yields exactly what the uninterrupted pass yields from batch b on.
"""
import itertools
import multiprocessing

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .images import SkipCounter, load_crop
from .masks import sample_rng
from .sources import file_samples, shard_samples

# seed-sequence tags: the streams never overlap (evaluation masks: 3, latent caches: 4 and 6, posterior noise: 7,
# validation's latent noise: 8)
TRAIN_STREAM, ORDER_STREAM, VAL_STREAM, LAP_STREAM, BUCKET_STREAM = 0, 1, 2, 5, 9


def worker_slot():
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def reader_slot(rank, world_size, slot=None):
    """(reader, readers): worker `slot` = (worker, num_workers) (default: this one, worker_slot()) among all
    ranks' workers; readers 0..world_size-1 are the ranks' worker 0."""
    worker, num_workers = slot or worker_slot()
    return worker * world_size + rank, num_workers * world_size


def to_image(pixels):
    """(R, R, 3) uint8 array -> (3, R, R) float32 in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_sample(pixels, mask, key):
    """(H, W, 3) uint8 and (H, W) {0,1} arrays -> the batch-element dict (image in [-1, 1], mask 1 = hole)."""
    return {"image": to_image(pixels), "mask": torch.from_numpy(mask).float()[None], "key": key}  # mask (1, H, W)


def shuffled(pairs, rng, size, initial=100):
    """webdataset-style shuffle buffer: serves from `initial` items on, growing by one per item to `size`."""
    buffer = []
    for item in pairs:
        buffer.append(item)
        if len(buffer) < size:
            buffer.extend(itertools.islice(pairs, 1))  # read two per item served: the buffer fills up
        if len(buffer) >= min(initial, size):
            j = rng.integers(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()


class ImageMaskTrain(IterableDataset):
    """Endless random crops with random masks; each pass yields `length` samples (full batches per worker).

    All readers (every worker of every rank) deal out one endless sequence of permutations of the
    source's files or shards, drawn from (seed, epoch, lap). Files: sample j of a rank's batch b takes
    position (b * world_size + rank) * batch_size + j, so a pass of world_size * length samples (the number
    of files) sees each file once (unreadable files aside), and its crop and mask are drawn from (seed, epoch,
    position): the stream does not depend on the number of workers. Shards: reader r takes positions r,
    r + readers, ..., and their samples are mixed through a shuffle buffer.

    Call set_epoch(epoch, batch) before a pass (EpochLoader does). A pass started at batch b > 0 (a run resumed
    mid-epoch) continues the uninterrupted pass exactly: the DataLoader's worker w plays the part that worker
    (b + w) mod num_workers had, files skip to batch b, and a shard reader reads past (without decoding) the
    samples it had served. Exact with the same ranks and workers, unless unreadable files or samples fell
    before batch b (each shifts its reader's stream by one).

    `buckets` ((H, W) shapes, data.buckets.aspect_buckets; default the square (R, R)): batch b of a pass takes the
    bucket drawn from (seed, epoch, b), the same on every rank, for its crops and masks.
    """

    def __init__(self, source, resolution, mask_generator, length, seed=0, rank=0, world_size=1,
                 batch_size=1, crop_min_scale=0.5, flip=True, shuffle_buffer=1000, buckets=None):
        if length < batch_size or length % batch_size:
            raise ValueError(f"length {length} must be a positive multiple of batch_size {batch_size}")
        if not len(source):
            raise ValueError(f"image source {source.name!r} has no files or shards")
        self.source, self.resolution, self.masks = source, resolution, mask_generator
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.batch_size, self.crop_min_scale, self.flip = batch_size, crop_min_scale, flip
        self.shuffle_buffer = shuffle_buffer
        self.buckets = list(buckets or [(resolution, resolution)])
        self.skipped = SkipCounter()
        # (epoch, first batch) in shared memory: persistent workers see set_epoch; no lock (only the main process
        # writes)
        self._pass = multiprocessing.Array("q", 2, lock=False)

    def __len__(self):
        return self.length

    def set_epoch(self, epoch, batch=0):
        """Select pass `epoch` and the rank's batch it starts at (> 0 on a run resumed mid-epoch)."""
        if not 0 <= int(batch) <= self.length // self.batch_size:
            raise ValueError(f"pass start batch {batch} is outside 0 .. {self.length // self.batch_size}")
        self._pass[:] = [int(epoch), int(batch)]

    def _lap_order(self, epoch, lap):
        """The permutation of source.items that every reader shares for this lap of the pass."""
        return sample_rng(self.seed, LAP_STREAM, epoch, lap).permutation(len(self.source))

    def _dealt_files(self, epoch, batches):
        """Endless (position, index into source.items) for the rank's batches `batches` (then more, for skipped
        files): sample j of batch b is position (b * world_size + rank) * batch_size + j of the laps' shared
        permutations, so a pass covers positions 0 .. world_size * length - 1 once each."""
        n, lap, order = len(self.source), -1, None
        for b in batches:
            for j in range(self.batch_size):
                position = (b * self.world_size + self.rank) * self.batch_size + j
                here, i = divmod(position, n)
                if here != lap:  # positions only grow: one lap's permutation at a time
                    lap, order = here, self._lap_order(epoch, here)
                yield position, int(order[i])

    def _dealt_shards(self, epoch, reader, readers):
        """Endless indices into source.items: this reader's positions in the readers' shared permutations."""
        n = len(self.source)
        for lap in itertools.count():  # position lap * n + i is order[i]: take i = reader - lap * n (mod readers)
            order = self._lap_order(epoch, lap)
            yield from order[(reader - lap * n) % readers::readers].tolist()  # empty in some laps when n < readers

    def _file_stream(self, epoch, batches):
        """Endless (rng, key, path) of the dealt files, each with the generator of its position."""
        for position, i in self._dealt_files(epoch, batches):
            (key, path), = file_samples([self.source.items[i]], self.source.root)
            yield sample_rng(self.seed, TRAIN_STREAM, epoch, position), key, path

    def _shard_stream(self, epoch, part, num_workers, served):
        """Endless (rng, key, bytes) of the reader that plays DataLoader worker `part`'s part, read past its first
        `served` samples (not decoded): the dealt shards' samples through the shuffle buffer, each with the
        generator of (rank, part, epoch, its index in this stream)."""
        reader, readers = reader_slot(self.rank, self.world_size, (part, num_workers))
        ids = (self.rank, part, epoch)
        dealt = (self.source.items[i] for i in self._dealt_shards(epoch, reader, readers))
        pairs = shuffled(self._shard_pairs(dealt), sample_rng(self.seed, ORDER_STREAM, *ids), self.shuffle_buffer)
        for index, (key, raw) in enumerate(pairs):
            if index >= served:
                yield sample_rng(self.seed, TRAIN_STREAM, *ids, index), key, raw

    def _shard_pairs(self, urls):
        """(key, bytes) pairs of the shards in order; raises when many shards in a row give nothing."""
        empty, give_up = 0, max(100, 2 * len(self.source))
        for url in urls:
            count = 0
            for pair in self._shard_samples([url], self.skipped.add):
                count += 1
                yield pair
            empty = 0 if count else empty + 1
            if empty > give_up:
                raise RuntimeError(f"image source {self.source.name!r}: {empty} shard reads in a row gave no sample")

    def _shard_samples(self, urls, on_error):
        """(key, raw) pairs of the shards in order: image bytes here (a latent cache reads whole samples)."""
        return shard_samples(urls, on_error)

    def make_sample(self, key, raw, rng, mask):
        """The batch element: a random crop of the decoded image at the mask's shape (raises on unreadable data:
        skipped)."""
        return to_sample(load_crop(raw, mask.shape, rng, self.crop_min_scale, self.flip), mask, key)

    def bucket(self, epoch, batch):
        """(H, W) of the pass's batch `batch` (the same on every rank)."""
        if len(self.buckets) == 1:
            return self.buckets[0]
        return self.buckets[sample_rng(self.seed, BUCKET_STREAM, epoch, batch).integers(len(self.buckets))]

    def __iter__(self):
        worker, num_workers = worker_slot()
        epoch, first = self._pass[:]
        # the DataLoader takes its i-th batch from worker i mod num_workers: this worker serves the pass's batches
        # first + worker, first + worker + num_workers, ..., those of worker `part` in a pass started at batch 0
        part, batches = (first + worker) % num_workers, self.length // self.batch_size
        mine = range(first + worker, batches, num_workers)  # the pass's batches this worker serves, in order
        todo, done = self.batch_size * len(mine), 0
        if self.source.kind == "files":  # then further positions, in place of unreadable files
            stream = self._file_stream(epoch, itertools.count(first + worker, num_workers))
        else:  # a shard holds many samples: shards are dealt to readers, their samples mixed in a buffer
            served = self.batch_size * len(range(part, first, num_workers))
            stream = self._shard_stream(epoch, part, num_workers, served)
        give_up = max(1000, 2 * len(self.source))  # consecutive failures meaning "nothing here is readable"
        misses = 0
        while todo > 0:
            misses += 1
            if misses > give_up:
                raise RuntimeError(f"image source {self.source.name!r}: no usable image in {give_up} attempts")
            rng, key, raw = next(stream)
            mask = self.masks(rng, self.bucket(epoch, mine[done // self.batch_size]))  # drawn first: the mask
            try:  # stream does not depend on the images
                sample = self.make_sample(key, raw, rng, mask)
            except Exception as error:  # corrupt, truncated, zero-byte, not an image: skip and count
                self.skipped.add(key, error)
                continue
            misses, todo, done = 0, todo - 1, done + 1
            yield sample


class ImageMaskVal(IterableDataset):
    """The first `size` images of a source, centre-cropped, each with a mask fixed by (seed, its index).

    Sample i goes to reader i mod readers (reader_slot: samples 0..world_size-1 to the ranks' first
    workers, so every rank gets one when size >= world_size and none idles at DDP's metric reduction):
    over all ranks and workers every image is seen exactly once, and its crop and mask never depend on
    the number of ranks or workers. Every reader reads (not decodes) the first `size` samples, so keep
    val_size moderate for remote shards. With `buckets` ((H, W) shapes) image i takes bucket i mod len(buckets)
    (batch them with data.buckets.ShapeBatches).
    """

    def __init__(self, source, resolution, mask_generator, seed=0, rank=0, world_size=1, size=None, buckets=None):
        self.source, self.resolution, self.masks = source, resolution, mask_generator
        self.seed, self.rank, self.world_size, self.size = seed, rank, world_size, size
        self.buckets = list(buckets or [(resolution, resolution)])
        self.skipped = SkipCounter()

    def _raw_stream(self):
        if self.source.kind == "files":
            return file_samples(self.source.items, self.source.root)
        return shard_samples(self.source.items, self.skipped.add)

    def __iter__(self):
        reader, readers = reader_slot(self.rank, self.world_size)
        pairs = itertools.islice(self._raw_stream(), self.size)  # sample i of the source, in order
        for i, (key, raw) in enumerate(pairs):
            if i % readers != reader:
                continue
            mask = self.masks(sample_rng(self.seed, VAL_STREAM, i), self.buckets[i % len(self.buckets)])
            try:
                pixels = load_crop(raw, mask.shape)
            except Exception as error:
                self.skipped.add(key, error)
                continue
            yield {**to_sample(pixels, mask, key), "index": i}


def collect(dataset, n=None):
    """The first n samples of a dataset as a list (all of a finite one): for tests and scripts."""
    return list(itertools.islice(iter(dataset), n))

