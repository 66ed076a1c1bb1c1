"""The latent cache: scripts/cache_latents.py writes crops + posteriors; training reads them and skips the encoder."""
import copy
import csv
import io
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data import ImageMaskDataModule, LatentCacheError, LatentCacheTrain, MaskGenerator, collect, encoder_fingerprint
from data.datasets import to_image
from data.latents import check_cache, is_latent_cache
from data.sources import resolve_source, sample_image_files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import cache_latents  # noqa: E402
import harness  # noqa: E402

RES = 32
TINY = [  # as tests/test_train.py: a tiny encoder and decoder, random init from `seed`
    "model.vae_ckpt=null", "model.autoencoder.ch=32", "model.autoencoder.num_res_blocks=1",
    "model.autoencoder.encoder_ch=32", "model.autoencoder.encoder_num_res_blocks=1",
    "perceptual.pretrained=false", "discriminator.ndf=8", "discriminator.n_layers=2",
    f"data.resolution={RES}", "data.batch_size=2", "trainer.accelerator=cpu",
]
PATTERN = "latents-{000000..000001}.tar"


def make_cache(out, *extra, limit=4):
    """4 sample photographs x 2 crops (flip on) in shards of 5: 8 samples in 2 shards."""
    args = ["-c", str(ROOT / "configs" / "base.yaml"), *TINY, *extra, "--out", str(out), "--crops-per-image", "2",
            "--shard-size", "5", "--batch-size", "3", "--workers", "0", "--limit", str(limit)]
    assert cache_latents.main(args) == 0
    return Path(out)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(make_cache(tmp_path_factory.mktemp("cache")) / PATTERN)


def read_samples(pattern):
    urls = wds.shardlists.expand_urls(pattern)
    return [s for s in wds.tarfile_samples({"url": u} for u in urls)]


def npy(raw):
    return torch.from_numpy(np.load(io.BytesIO(raw)))


def png_pixels(raw):
    return np.array(Image.open(io.BytesIO(raw)))


def tiny_system(*extra):
    cfg = harness.load([ROOT / "configs" / "x1.yaml"], [*TINY, *extra])  # the GAN on from step 0
    torch.manual_seed(cfg.seed)  # as train.py: the same random encoder as the cache's
    return harness.build_ours(cfg), cfg


def test_cache_holds_the_encoders_posterior_of_the_stored_crop(cache, tmp_path):
    samples = read_samples(cache)
    assert len(samples) == 8
    system, _ = tiny_system()
    vae = system.vae.eval()
    metas = [json.loads(s["json"]) for s in samples]
    assert {m["encoder"] for m in metas} == {encoder_fingerprint(vae)}  # train.py's encoder, from the seed
    assert {m["resolution"] for m in metas} == {RES} and len({m["key"] for m in metas}) == 4
    images = torch.stack([to_image(png_pixels(s["png"])) for s in samples])
    with torch.no_grad():
        posterior = vae.encode(images)
    torch.testing.assert_close(torch.stack([npy(s["mean.npy"]) for s in samples]), posterior.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([npy(s["logvar.npy"]) for s in samples]), posterior.logvar,
                               atol=1e-5, rtol=0)
    assert npy(samples[0]["mean.npy"]).dtype == torch.float32
    # the stored box and flip give the stored crop back from the source image (JPEG: decoded at reduced size)
    root = Path(sample_image_files()[0]).parent
    for meta, s in zip(metas, samples):
        with Image.open(root / meta["key"]) as img:
            crop = img.convert("RGB").resize((RES, RES), Image.BOX, box=tuple(meta["box"]))
        if meta["flip"]:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.abs(np.asarray(crop, float) - png_pixels(s["png"])).mean() < 4, meta
    assert any(m["flip"] for m in metas) and not all(m["flip"] for m in metas)
    # deterministic from the seed, whatever the batch size
    again = read_samples(str(make_cache(tmp_path, limit=1) / "latents-000000.tar"))
    assert [a["png"] for a in again] == [s["png"] for s in samples[:2]]
    assert [a["json"] for a in again] == [s["json"] for s in samples[:2]]


@pytest.mark.parametrize("sample_posterior", [True, False])
def test_training_step_on_cached_latents_equals_the_encoder_path(cache, sample_posterior):
    sample = read_samples(cache)[0]
    image = to_image(png_pixels(sample["png"]))[None].repeat(2, 1, 1, 1)
    mask = torch.zeros(2, 1, RES, RES)
    mask[:, :, 8:24, 4:20] = 1.0
    cached = {k: npy(sample[f"{k}.npy"])[None].repeat(2, 1, 1, 1) for k in ("mean", "logvar")}
    system, cfg = tiny_system(f"model.sample_posterior={str(sample_posterior).lower()}")
    twin = copy.deepcopy(system)
    calls = []
    twin.vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(1)
    plain = harness.fit_ours(system, cfg, image, mask, 1).callback_metrics
    torch.manual_seed(1)  # the same posterior noise
    from_cache = harness.fit_ours(twin, cfg, image, mask, 1, extra=cached).callback_metrics
    assert not calls  # the encoder is skipped
    for name in ("nll", "g_loss", "d_loss", "d_weight"):
        torch.testing.assert_close(from_cache[f"train/{name}"], plain[f"train/{name}"], rtol=1e-5, atol=1e-6,
                                   msg=name)
    for a, b in zip(system.vae.decoder.parameters(), twin.vae.decoder.parameters()):  # the same update
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_datamodule_reads_the_cache_and_refuses_a_mismatch(cache):
    fingerprint = json.loads(read_samples(cache)[0]["json"])["encoder"]
    stored = {s["__key__"]: png_pixels(s["png"]) for s in read_samples(cache)}
    dm = ImageMaskDataModule(source=cache, resolution=RES, batch_size=2, num_workers=0, epoch_length=4,
                             flip=False, encoder_fingerprint=fingerprint)
    dm.setup("fit")
    assert isinstance(dm.train_set, LatentCacheTrain)
    for batch in dm.train_dataloader():
        assert batch["mean"].shape == batch["logvar"].shape == (2, 4, RES // 8, RES // 8)
        assert batch["mask"].shape == (2, 1, RES, RES)
        for key, image in zip(batch["key"], batch["image"]):  # the stored crop: no new crop, no flip
            pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            assert np.array_equal(pixels, stored[key.split("/")[1]])

    def setup(**kw):
        args = dict(source=cache, resolution=RES, num_workers=0, flip=False, encoder_fingerprint=fingerprint)
        ImageMaskDataModule(**{**args, **kw}).setup("fit")

    with pytest.raises(LatentCacheError, match=r"latents-000000\.tar.*resolution 32.*data\.resolution is 64"):
        setup(resolution=64)
    with pytest.raises(LatentCacheError, match=rf"latents-000000\.tar.*weights {fingerprint}.* are 0123456789abcdef"):
        setup(encoder_fingerprint="0123456789abcdef")
    with pytest.raises(LatentCacheError, match="data.flip=false"):
        setup(flip=True)
    with pytest.raises(LatentCacheError, match=r"data.aspect_ratios gives crops of \['40x24', '32x32'\] px, but latent "
                                                r"cache .* holds fixed 32x32 crops"):
        setup(aspect_ratios=[0.6, 1.0])
    # every sample is checked as it is read: a mismatch is an error, never a skipped file
    ds = LatentCacheTrain(resolve_source(cache), RES, MaskGenerator(RES), 8, encoder="0123456789abcdef")
    with pytest.raises(LatentCacheError, match="0123456789abcdef"):
        collect(ds, 1)


def test_cache_latents_keeps_few_images_in_flight(tmp_path, monkeypatch):
    taken, lead = [], []

    def items(data):  # 200 zero-byte images: each worker job fails fast, and is listed as skipped
        for i in range(200):
            taken.append(i)
            yield i, f"img{i}", b""

    def slow_consumer(results, **kwargs):  # the encoder: slower than the workers
        for n, result in enumerate(results):
            time.sleep(0.3 if n == 0 else 0.0)
            lead.append(len(taken) - n - 1)  # images read from the source but not yet consumed
            yield result

    monkeypatch.setattr(cache_latents, "source_items", items)
    monkeypatch.setattr(cache_latents, "tqdm", slow_consumer)
    args = ["-c", str(ROOT / "configs" / "base.yaml"), *TINY, "--out", str(tmp_path), "--workers", "1"]
    assert cache_latents.main(args) == 1  # nothing readable
    assert len(lead) == 200 and max(lead) <= 4  # 4 jobs per worker in flight (Pool.imap: all 200 at once)


def test_seed_streams_of_data_and_caches_are_distinct():
    # SeedSequence pads entropy shorter than 4 words with zeros: (seed, tag) is (seed, tag, 0, 0)
    from data.datasets import BUCKET_STREAM, LAP_STREAM, ORDER_STREAM, TRAIN_STREAM, VAL_STREAM
    from data.latents import CACHE_ORDER_STREAM, CACHE_STREAM
    from data.masks import EVAL_STREAM, sample_rng
    from ldm.models.asym_decoder import NOISE_STREAM, VAL_NOISE_STREAM
    live = {  # every call's ids at their first values
        "train sample (files)": (TRAIN_STREAM, 0, 0), "train sample (shards)": (TRAIN_STREAM, 0, 0, 0, 0),
        "reader buffer": (ORDER_STREAM, 0, 0, 0), "lap order": (LAP_STREAM, 0, 0), "validation": (VAL_STREAM, 0),
        "eval masks": (EVAL_STREAM, 0), "cache crop": (CACHE_STREAM, 0, 0), "cache order": (CACHE_ORDER_STREAM,),
        "posterior noise": (NOISE_STREAM, 0, 0), "validation latent noise": (VAL_NOISE_STREAM, 0),
        "aspect bucket": (BUCKET_STREAM, 0, 0),
    }
    draws = {name: tuple(sample_rng(0, *ids).integers(2**32, size=4)) for name, ids in live.items()}
    same_stream = {draws["train sample (files)"], draws["train sample (shards)"]}  # never in one run
    assert len(set(draws.values())) == len(draws) - 2 + len(same_stream), draws


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)
    return str(path)


def test_unreadable_first_shards_and_broken_json_are_errors_naming_the_shard(cache, tmp_path):
    garbage = tmp_path / "garbage-000000.tar"
    garbage.write_bytes(b"not a tar file" * 100)
    empty = write_tar(tmp_path / "empty-000000.tar", [])
    for url in (str(garbage), empty):  # the source's kind is unknown: never read as image shards
        with pytest.raises(LatentCacheError, match=re.escape(url)):
            is_latent_cache(resolve_source(url))
    good = read_samples(cache)[0]
    members = {k: good[k] for k in ("png", "mean.npy", "logvar.npy")}
    shards = tmp_path / "mixed"
    shards.mkdir()
    (shards / "s-000000.tar").write_bytes(garbage.read_bytes())  # a broken first shard does not decide the kind
    write_tar(shards / "s-000001.tar", [{"__key__": "s0", **members, "json": good["json"]}])
    assert is_latent_cache(resolve_source(str(shards / "s-{000000..000001}.tar")))
    write_tar(shards / "s-000001.tar", [{"__key__": "s0", "png": good["png"]}])
    assert not is_latent_cache(resolve_source(str(shards / "s-{000000..000001}.tar")))
    for name, meta, match in (("notjson", b"{resolution: 32", "not JSON"),
                              ("nokey", json.dumps({"encoder": "x"}).encode(), "'resolution'")):
        url = write_tar(tmp_path / f"{name}-000000.tar", [{"__key__": "s0", **members, "json": meta}])
        assert is_latent_cache(resolve_source(url))
        with pytest.raises(LatentCacheError, match=rf"{re.escape(url)} \(sample s0\).*{match}"):
            check_cache(resolve_source(url), RES, flip=False)


def test_train_py_runs_on_a_cache_and_refuses_another_encoder(cache, tmp_path, capsys):
    import train  # in this process: no second start-up of torch and Lightning
    args = ["-c", str(ROOT / "configs" / "base.yaml"), *TINY, f"data.source={cache}", "data.flip=false",
            "data.num_workers=0", "data.val_size=2", "trainer.devices=1", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", f"run.log_dir={tmp_path}"]
    assert train.main([*args, "--name", "cached"]) == 0
    run = tmp_path / "cached"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    capsys.readouterr()
    assert train.main([*args, "seed=1", "--name", "other"]) == 2  # another random encoder
    err = capsys.readouterr().err
    assert re.search(r"error: latent cache .*latents-000000\.tar.*made with encoder weights [0-9a-f]{16}, this run's "
                     r"\(model\.vae_ckpt\) are [0-9a-f]{16}", err), err[-2000:]


def test_cache_latents_names_an_unreadable_source(tmp_path, capsys):
    garbage = tmp_path / "g-000000.tar"
    garbage.write_bytes(b"not a tar file" * 100)
    args = ["-c", str(ROOT / "configs" / "base.yaml"), *TINY, f"data.source={garbage}", "--out", str(tmp_path / "o")]
    assert cache_latents.main(args) == 2
    assert f"error: image source '{garbage}'" in capsys.readouterr().err
