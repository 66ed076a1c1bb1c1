"""Sources, bad files, shards, datasets, the datamodule and its configs."""
import collections
import contextlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data.datasets
from data import (EpochLoader, ImageMaskDataModule, ImageMaskTrain, ImageMaskVal, LogSkippedFiles, MaskGenerator,
                  collect, load_crop, resolve_source)
from data.sources import Source, shard_samples
from ldm.training.config import load_config
from probe_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
RES = 32


def photo(w, h, seed=0):
    """A smooth random RGB image (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """6 valid images (one CMYK JPEG, one 16-bit PNG, palette, RGBA, grey, tiny) and 4 bad files + 1 ignored."""
    root = tmp_path / "messy"
    (root / "sub").mkdir(parents=True)
    photo(120, 90, 1).save(root / "a.jpg", quality=90)
    photo(64, 80, 2).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    Image.fromarray(np.full((50, 70), 128 * 257, np.uint16)).save(root / "sub" / "deep16.png")  # 16-bit grey
    photo(60, 60, 3).convert("P").save(root / "sub" / "palette.png")
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black: must come out white
    Image.fromarray(rgba, "RGBA").save(root / "clear.PNG")
    photo(12, 9, 4).convert("L").save(root / "tiny_grey.bmp")
    good = jpeg_bytes(photo(200, 150, 5))
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "corrupt.jpg").write_bytes(good[:200] + bytes(range(256)) * 20)
    (root / "empty.png").write_bytes(b"")
    (root / "sub" / "notes.jpeg").write_text("not an image at all\n")
    (root / "readme.txt").write_text("ignored: not an image suffix\n")
    return root


VALID = {"a.jpg", "cmyk.jpg", "sub/deep16.png", "sub/palette.png", "clear.PNG", "tiny_grey.bmp"}


def by_key(samples):
    return {s["key"]: s for s in samples}


def test_bad_files_are_skipped_and_counted_and_modes_converted(messy_folder):
    source = resolve_source(str(messy_folder))
    assert len(source) == 10  # readme.txt is not an image name
    val = ImageMaskVal(source, RES, MaskGenerator(RES))
    samples = by_key(collect(val))
    assert set(samples) == VALID and val.skipped.value == 4
    for s in samples.values():
        assert s["image"].shape == (3, RES, RES) and s["image"].dtype == torch.float32
        assert s["mask"].shape == (1, RES, RES) and -1 <= s["image"].min() and s["image"].max() <= 1
    assert torch.allclose(samples["sub/deep16.png"]["image"], torch.tensor(1 / 255), atol=1e-6)  # 128*257 -> 128
    assert torch.equal(samples["clear.PNG"]["image"], torch.ones(3, RES, RES))  # transparent -> white
    got = (samples["cmyk.jpg"]["image"].permute(1, 2, 0).numpy() + 1) * 127.5
    want = np.asarray(photo(64, 80, 2).crop((0, 8, 64, 72)).resize((RES, RES), Image.BOX), float)
    assert np.abs(got - want).mean() < 12  # the CMYK JPEG comes back in its colours, not inverted

def test_small_images_are_upscaled_to_the_crop():
    img = photo(12, 9)
    out = load_crop(jpeg_bytes(img), 64, np.random.default_rng(0), min_scale=0.5, flip=True)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_large_jpegs_decode_reduced_but_match_a_full_decode():
    raw = jpeg_bytes(photo(1600, 1200, 9))
    fast = load_crop(raw, 64).astype(float)  # draft decoding at 1/8 scale
    full = Image.open(io.BytesIO(raw)).convert("RGB").crop((200, 0, 1400, 1200))
    full = np.asarray(full.resize((64, 64), Image.BOX))
    assert np.abs(fast - full).mean() < 3.0


def ramp(w, h):
    """Grey levels rising linearly along the long side: a crop taken from the wrong place shows as a mean offset."""
    t = (np.arange(max(w, h)) + 0.5) * 255 / max(w, h)
    levels = np.broadcast_to(t, (h, w)) if w >= h else np.broadcast_to(t[:, None], (h, w))
    return Image.fromarray(levels.round().astype(np.uint8), "L")


@pytest.mark.parametrize("w, h, resolution", [(401, 136, 16), (136, 401, 16), (1001, 273, 32)])
def test_reduced_jpeg_decodes_of_odd_sizes_crop_in_place(w, h, resolution):
    # decoded at 1/8 scale: 401 px become 51, for the source's 50.125 (the crop is scaled by the latter)
    image = ramp(w, h)
    fast = load_crop(jpeg_bytes(image), resolution).astype(float)
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    full = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.BOX, box=box), float)
    assert abs((fast - full).mean()) < 0.3  # scaled by 51/401 instead: 2.3 grey levels (1.0 at 1001 px)


def test_sources_without_usable_images_are_errors_naming_them(tmp_path, messy_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="bad"):
        ImageMaskDataModule(source=str(bad), resolution=RES, num_workers=0).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_source(str(tmp_path / "nowhere-{000..003}.tar"))
    train = ImageMaskTrain(resolve_source(str(bad)), RES, MaskGenerator(RES), length=4, batch_size=2)
    with pytest.raises(RuntimeError, match="no usable image"):
        collect(train)


def huge_png(path, side=20000):
    """A valid 1-bit side x side PNG (400 M pixels, beyond PIL's decompression-bomb limit), written without ever
    holding its pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    packer, row = zlib.compressobj(9), b"\0" + bytes((side + 7) // 8)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_a_20000_px_png_is_skipped_by_name_and_the_run_goes_on(tmp_path, caplog):
    """What held (issue 29): a 20000 x 20000 PNG among a folder's images is skipped, named in the warning, and
    training and validation go on with the others."""
    photo(80, 60, 1).save(tmp_path / "a.jpg")
    photo(70, 90, 2).save(tmp_path / "b.png")
    huge_png(tmp_path / "huge.png")
    source = resolve_source(str(tmp_path))
    train = ImageMaskTrain(source, RES, MaskGenerator(RES), length=6, batch_size=2)
    val = ImageMaskVal(source, RES, MaskGenerator(RES))
    assert len(collect(train)) == 6 and sorted(s["key"] for s in collect(val)) == ["a.jpg", "b.png"]
    assert train.skipped.value >= 1 and val.skipped.value == 1
    assert "skipped unreadable image huge.png: DecompressionBombError" in caplog.text


def make_shards(src, out, *extra):
    """Run scripts/make_shards.py's main; returns what it prints."""
    out_text = io.StringIO()
    with contextlib.redirect_stdout(out_text):
        assert load_script("make_shards").main([str(src), str(out), *extra]) == 0
    return out_text.getvalue()


def test_make_shards_keeps_the_original_bytes(messy_folder, tmp_path):
    out = make_shards(messy_folder, tmp_path / "shards", "--shard-size", "4")
    assert "wrote 6 images to 2 shards" in out and "skipped 4 unreadable files" in out
    pattern = out.strip().splitlines()[-1].split("source: ")[1]
    assert pattern.endswith("train-{000000..000001}.tar")
    pairs = dict(shard_samples(resolve_source(pattern).items, lambda *a: pytest.fail(f"shard error {a}")))
    originals = {k.rsplit(".", 1)[0].replace(".", "_"): (messy_folder / k).read_bytes() for k in VALID}
    assert {k.split("/", 1)[1]: v for k, v in pairs.items()} == originals


@pytest.fixture
def shard_set(tmp_path):
    """10 JPEGs in 3 shards (4 + 4 + 2); returns the brace pattern."""
    src = tmp_path / "jpegs"
    src.mkdir()
    for i in range(10):
        photo(48 + 4 * i, 40, i).save(src / f"img{i:02d}.jpg", quality=90)
    out = make_shards(src, tmp_path / "shards", "--shard-size", "4")
    return out.strip().splitlines()[-1].split("source: ")[1]


def test_benchmark_data_reads_nested_folders_and_any_sample_count(tmp_path, monkeypatch):
    bench = load_script("bench/benchmark_data")
    for i, sub in enumerate(["a", "a/b", "c"]):
        (tmp_path / "src" / sub).mkdir(parents=True, exist_ok=True)
        photo(40, 30, i).save(tmp_path / "src" / sub / f"{i}.jpg", quality=90)
    pattern = bench.make_shards(str(tmp_path / "src"), str(tmp_path), per_shard=2)
    keys = [k.split("/", 1)[1] for k, _ in shard_samples(resolve_source(pattern).items, pytest.fail)]
    assert pattern.endswith("bench-{000000..000001}.tar") and keys == ["a/0", "a/b/1", "c/2"]
    assert bench.describe_jpegs(str(tmp_path / "src")).startswith("3 JPEGs, mean 40x30 px")
    rates = bench.samples_per_second(pattern, 16, 5, rounds=2, batch_size=4)  # 5 samples: 2 batches of 4
    assert len(rates) == 2 and min(rates) > 0


def test_validation_sees_every_sample_once_over_2_ranks_x_2_workers(shard_set):
    source = resolve_source(shard_set)
    reference = by_key(collect(ImageMaskVal(source, RES, MaskGenerator(RES), seed=5)))
    assert len(reference) == 10
    seen = []
    for rank in range(2):
        val = ImageMaskVal(source, RES, MaskGenerator(RES), seed=5, rank=rank, world_size=2)
        for batch in DataLoader(val, batch_size=2, num_workers=2):
            for key, image, mask in zip(batch["key"], batch["image"], batch["mask"]):
                seen.append(key)
                assert torch.equal(mask, reference[key]["mask"]) and torch.equal(image, reference[key]["image"])
    assert sorted(seen) == sorted(reference)  # each exactly once, same crop and mask as on one process


def test_training_stream_differs_per_rank_worker_and_epoch_and_repeats_per_seed(shard_set, monkeypatch):
    source = resolve_source(shard_set)

    def first(rank=0, worker=0, epoch=0, seed=0):
        monkeypatch.setattr(data.datasets, "get_worker_info", lambda: type("W", (), {"id": worker, "num_workers": 2}))
        ds = ImageMaskTrain(source, RES, MaskGenerator(RES, p_full=0.0), length=4, seed=seed, rank=rank,
                            world_size=2, batch_size=2, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return torch.stack([s["mask"] for s in collect(ds)])

    base = first()
    assert base.shape == (2, 1, RES, RES)  # this worker's share: one of the rank's two batches
    assert torch.equal(base, first())
    for other in (first(rank=1), first(worker=1), first(rank=1, worker=1), first(epoch=1), first(seed=1)):
        assert not torch.equal(base, other)


class KeysOnly(ImageMaskTrain):
    """The training stream's keys, with no decoding: the order logic alone (fake paths are fine)."""

    def make_sample(self, key, raw, rng, mask):
        return key


class MasksOnly(ImageMaskTrain):
    """The training stream's masks, with no decoding."""

    def make_sample(self, key, raw, rng, mask):
        return torch.from_numpy(mask)


def every_reader(monkeypatch, world, workers, make_dataset):
    """{(rank, worker): samples} as the DataLoader workers of `world` ranks read them (make_dataset(rank))."""
    out = {}
    for rank in range(world):
        for worker in range(workers):
            info = type("W", (), {"id": worker, "num_workers": workers})
            monkeypatch.setattr(data.datasets, "get_worker_info", lambda info=info: info)
            out[rank, worker] = collect(make_dataset(rank))
    return out


def fake_files(n):
    return Source("fake", "files", [f"/fake/{i:03d}.jpg" for i in range(n)], "/fake")


def test_one_epoch_over_all_readers_sees_every_file_once(monkeypatch):
    def epoch_keys(epoch):
        def make(rank):  # 2 ranks x 3 workers x 8 samples = the 48 files
            ds = KeysOnly(fake_files(48), RES, MaskGenerator(RES), length=24, rank=rank, world_size=2, batch_size=2)
            ds.set_epoch(epoch)
            return ds

        return every_reader(monkeypatch, 2, 3, make)

    epochs = [epoch_keys(0), epoch_keys(1)]
    for keys in epochs:
        assert all(len(v) == 8 for v in keys.values())
        assert sorted(k for v in keys.values() for k in v) == [f"{i:03d}.jpg" for i in range(48)]
    assert epochs[0] != epochs[1]  # another epoch, another order


@pytest.mark.parametrize("files,world,workers,batch", [(100, 1, 3, 4), (130, 2, 4, 5)])
def test_an_epoch_sees_every_file_once_when_workers_get_unequal_batches(monkeypatch, files, world, workers, batch):
    """25 batches on 3 workers (9, 8, 8); 13 per rank on 4 workers (4, 3, 3, 3) on 2 ranks: every file once."""
    def make(rank):
        return KeysOnly(fake_files(files), RES, MaskGenerator(RES), length=files // world, rank=rank,
                        world_size=world, batch_size=batch)

    keys = every_reader(monkeypatch, world, workers, make)
    assert sorted(k for v in keys.values() for k in v) == [f"{i:03d}.jpg" for i in range(files)]


def test_fewer_files_than_readers_still_deals_them_evenly(monkeypatch):
    def make(rank):  # 4 readers, one sample each, 3 files
        return KeysOnly(fake_files(3), RES, MaskGenerator(RES), length=2, rank=rank, world_size=2, batch_size=1)

    counts = collections.Counter(k for v in every_reader(monkeypatch, 2, 2, make).values() for k in v)
    assert sorted(counts.values()) == [1, 1, 2]


def test_shards_are_split_over_readers(shard_set, monkeypatch):
    source = resolve_source(shard_set)  # 3 shards: each of 3 readers starts on its own one

    def make(rank):
        return KeysOnly(source, RES, MaskGenerator(RES), length=2, rank=rank, world_size=3, batch_size=2,
                        shuffle_buffer=1)

    readers = every_reader(monkeypatch, 3, 1, make)
    firsts = {rank: {key.split("/")[0] for key in keys} for (rank, _), keys in readers.items()}
    assert all(len(shards) == 1 for shards in firsts.values())  # 2 samples of one shard (shards hold 4, 4, 2)
    assert set.union(*firsts.values()) == {Path(u).name for u in source.items}


def test_small_validation_sets_reach_every_rank(tmp_path, monkeypatch):
    for i in range(16):
        photo(8, 8, i).save(tmp_path / f"{i:02d}.png")
    source = resolve_source(str(tmp_path))

    def make(rank):  # val_size 16 on 8 ranks x 4 workers: 2 per rank, never an idle rank in DDP's reduction
        return ImageMaskVal(source, RES, MaskGenerator(RES), rank=rank, world_size=8, size=16)

    keys = every_reader(monkeypatch, 8, 4, make)
    per_rank = [sum(len(keys[rank, w]) for w in range(4)) for rank in range(8)]
    assert per_rank == [2] * 8
    assert sorted(s["key"] for v in keys.values() for s in v) == sorted(f"{i:02d}.png" for i in range(16))


def test_persistent_workers_follow_set_epoch():
    def two_passes(num_workers):
        state = {"trained": 0}
        ds = MasksOnly(fake_files(50), 16, MaskGenerator(16, p_full=0.0), length=4, batch_size=2)
        loader = EpochLoader(ds, trained_fn=lambda: state["trained"], batch_size=2, num_workers=num_workers,
                             persistent_workers=num_workers > 0)
        first = torch.cat(list(loader))
        state["trained"] = 2  # the trainer's count of batches trained at the second pass
        return first, torch.cat(list(loader))

    here, workers = two_passes(0), two_passes(1)
    assert not torch.equal(*here)
    assert torch.equal(here[0], workers[0]) and torch.equal(here[1], workers[1])


class KeysAndMasks(ImageMaskTrain):
    """The training stream's keys and masks, with no decoding."""

    def make_sample(self, key, raw, rng, mask):
        return {"key": key, "mask": torch.from_numpy(mask)}


MULTI = [(24, 8), (16, 16), (8, 24)]  # three buckets of about 16 x 16 pixels (as multi-aspect training at 16 px)


def batches_from(source, trained, num_workers, world=1, rank=0, buckets=None):
    """[(keys, masks)] of the pass the loader serves when the trainer has trained `trained` batches (4 per pass)."""
    ds = KeysAndMasks(source, 16, MaskGenerator(16, p_full=0.0), length=12, batch_size=3, rank=rank,
                      world_size=world, shuffle_buffer=5, buckets=buckets)
    loader = EpochLoader(ds, trained_fn=lambda: trained, batch_size=3, num_workers=num_workers)
    return [(list(b["key"]), b["mask"]) for b in loader]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (keys, masks), (keys_expected, masks_expected) in zip(got, expected):
        assert keys == keys_expected and torch.equal(masks, masks_expected)


@pytest.mark.parametrize("kind, num_workers, buckets", [
    *[(kind, workers, None) for kind in ("files", "shards") for workers in (0, 3)],
    ("files", 3, MULTI), ("shards", 3, MULTI)], ids=lambda v: "multi-aspect" if v == MULTI else None)
def test_a_pass_resumed_at_batch_b_serves_the_uninterrupted_pass_from_b_on(kind, num_workers, buckets, shard_set):
    """A run resumed from a checkpoint saved after batch b of a pass trains batches b.. of that same pass (same
    files, crops and masks, through the same DataLoader workers' parts), not a fresh stream; multi-aspect: the same
    bucket per batch too."""
    source = fake_files(10) if kind == "files" else resolve_source(shard_set)
    whole = batches_from(source, 4, num_workers, buckets=buckets)  # pass 1 (the second), from its start
    assert len(whole) == 4 and whole != batches_from(source, 0, num_workers, buckets=buckets)
    for b in (1, 2, 3):
        assert_same_batches(batches_from(source, 4 + b, num_workers, buckets=buckets), whole[b:])
    assert batches_from(source, 8, num_workers, buckets=buckets) != whole  # pass 2 starts afresh


def test_multi_aspect_training_takes_one_bucket_per_batch_the_same_on_every_rank():
    source = fake_files(40)
    shapes = {}
    for rank, workers in ((0, 0), (1, 0), (0, 2)):
        passes = [b for trained in (0, 4, 8) for b in batches_from(source, trained, workers, 2, rank, MULTI)]
        shapes[rank, workers] = [tuple(masks.shape[-2:]) for _, masks in passes]  # masks (3, 1, H, W): one shape
    assert len(set(map(tuple, shapes.values()))) == 1  # batch b's bucket: whatever the rank or the workers
    assert set(shapes[0, 0]) == set(MULTI)  # 12 batches over 3 passes draw every bucket
    square = batches_from(source, 4, 0, buckets=[(16, 16)])
    assert_same_batches(square, batches_from(source, 4, 0))  # one square bucket: the stream without buckets


def test_multi_aspect_datamodule_crops_batches_and_validates_at_each_bucket(messy_folder):
    """data.aspect_ratios [0.5, 1, 2] at 32 px: buckets 48x24, 32x32, 24x48; a training batch takes one, validation
    image i (in the source's order) takes bucket i mod 3, batched by shape. With [1.0] validation batches are the
    plain DataLoader's."""
    dm = ImageMaskDataModule(source=str(messy_folder), resolution=RES, batch_size=2, num_workers=2, epoch_length=16,
                             aspect_ratios=[0.5, 1.0, 2.0])
    assert dm.buckets == [(48, 24), (32, 32), (24, 48)]
    dm.setup("fit")
    seen = set()
    for b in dm.train_dataloader():
        (h, w) = b["image"].shape[-2:]
        assert b["image"].shape[:2] == (2, 3) and b["mask"].shape == (2, 1, h, w)
        seen.add((h, w))
    assert seen == set(dm.buckets)
    val = list(dm.val_dataloader())
    for b in val:
        for index, image, mask in zip(b["index"].tolist(), b["image"], b["mask"]):
            assert tuple(image.shape[-2:]) == tuple(mask.shape[-2:]) == dm.buckets[index % 3]
    assert sorted(k for b in val for k in b["key"]) == sorted(VALID)  # each once (the index counts bad files too)
    assert len({tuple(b["image"].shape[-2:]) for b in val}) == 3

    square = ImageMaskDataModule(source=str(messy_folder), resolution=RES, batch_size=4, num_workers=0)
    square.setup("validate")
    for got, want in zip(square.val_dataloader(), DataLoader(square.val_set, batch_size=4)):
        assert got["key"] == want["key"] and torch.equal(got["image"], want["image"])


def test_the_stream_of_a_folder_is_the_same_whatever_the_number_of_workers():
    """Folder samples are dealt by position, their crops and masks drawn from (seed, epoch, position): a resume
    with another data.num_workers still continues the pass exactly."""
    source = fake_files(10)
    for world, rank in ((1, 0), (2, 1)):
        one = batches_from(source, 5, 0, world, rank)
        assert_same_batches(batches_from(source, 5, 2, world, rank), one)
        assert_same_batches(batches_from(source, 5, 3, world, rank), one)


def test_set_epoch_refuses_a_start_past_the_pass():
    ds = KeysAndMasks(fake_files(10), 16, MaskGenerator(16), length=12, batch_size=3)
    ds.set_epoch(0, 4)  # the end: an empty pass
    assert collect(ds) == []
    with pytest.raises(ValueError, match="pass start batch 5 is outside 0 .. 4"):
        ds.set_epoch(0, 5)


def test_datamodule_batches_follow_the_contract(messy_folder):
    dm = ImageMaskDataModule(source=str(messy_folder), resolution=RES, batch_size=3, num_workers=2,
                             epoch_length=12, masks={"p_full": 0.5})
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    for b in batches:
        assert b["image"].shape == (3, 3, RES, RES) and b["image"].dtype == torch.float32
        assert b["mask"].shape == (3, 1, RES, RES) and b["mask"].dtype == torch.float32
        assert set(b["mask"].unique().tolist()) <= {0.0, 1.0} and b["image"].abs().max() <= 1
        assert set(b["key"]) <= VALID
    assert dm.skipped > 0  # counted in the worker processes, read in this one
    again = list(loader)  # the next epoch: a different stream
    assert not torch.equal(batches[0]["image"], again[0]["image"])
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val_keys) == sorted(VALID)


def test_default_source_is_the_sample_photographs():
    source = resolve_source("sample")
    assert source.kind == "files" and len(source) >= 8 and "astronaut.png" in {Path(f).name for f in source.items}
    for path in source.items:
        assert load_crop(path, 16).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        ImageMaskDataModule(resolution=100)


def test_base_config_and_mask_ablations_build():
    cfg = load_config(ROOT / "configs" / "base.yaml")
    assert cfg.data.source == "sample" and cfg.data.resolution == 256 and cfg.data.masks.p_full == 0.5
    from data.masks import PRESETS
    assert {k: dict(v) for k, v in cfg.data.masks.presets.items()} == {k: dict(v) for k, v in PRESETS.items()}
    expected = {"masks_thick": ["thick"], "masks_medium": ["medium"], "masks_thin": ["thin"]}
    for name, presets in expected.items():
        cfg = load_config(ROOT / "configs" / "base.yaml", [ROOT / f"configs/ablations/{name}.yaml"])
        gen = ImageMaskDataModule(**cfg.data).mask_generator()
        widths = {p["max_width"] for _, kind, p in gen.components if kind == "strokes"}
        assert widths == {PRESETS[presets[0]]["strokes"]["max_width"]} and gen.p_full == 0.5
    for name, p_full in (("p_full_0", 0.0), ("p_full_0_5", 0.5)):
        cfg = load_config(ROOT / "configs" / "base.yaml", [ROOT / f"configs/ablations/{name}.yaml"])
        assert ImageMaskDataModule(**cfg.data).mask_generator().p_full == p_full


class _Probe(pl.LightningModule):
    """Records the first mask of each epoch; a tiny parameter so the loop runs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.first_masks = {}

    def training_step(self, batch, batch_idx):
        assert batch["image"].shape[1:] == (3, RES, RES)
        self.first_masks.setdefault(self.current_epoch, batch["mask"].clone())
        return (self.w * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_with_a_lightning_trainer(messy_folder, tmp_path):
    dm = ImageMaskDataModule(source=str(messy_folder), resolution=RES, batch_size=2, num_workers=0,
                             epoch_length=4, masks={"p_full": 0.0})
    model = _Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[LogSkippedFiles()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4 and set(model.first_masks) == {0, 1}
    assert not torch.equal(model.first_masks[0], model.first_masks[1])
    assert trainer.callback_metrics["data/skipped"] == dm.skipped > 0

