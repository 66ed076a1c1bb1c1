"""Tests of ldm/metrics.py: hand-computed region PSNR, SSIM, LPIPS composites, pre_error, buckets, grids."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.metrics import (
    area_buckets,
    bucket_labels,
    feather_back,
    nanmean_by_bucket,
    nanmean_dict,
    paste_back,
    region_metrics,
    LABEL_HEIGHT,
    sample_grid,
    save_grid,
)

H = W = 16


def _image(b=2, seed=0):
    """(B,3,16,16) image in [-0.8, 0.8], so +-0.2 offsets stay inside [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, H, W, generator=g) * 1.6 - 0.8


def _quarter_mask(b=2):
    """Hole = top-left 8x8 block: hole fraction exactly 1/4."""
    mask = torch.zeros(b, 1, H, W)
    mask[:, :, :8, :8] = 1
    return mask


class RecordingDistance:
    """Fake perceptual callable: records its inputs, returns per-sample mean |x - y|."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, y):
        self.calls.append((x.clone(), y.clone()))
        return (x - y).abs().flatten(1).mean(1)


def test_paste_back_takes_recon_in_hole_and_image_elsewhere():
    image, mask = _image(), _quarter_mask()
    recon = torch.full_like(image, 0.5)
    out = paste_back(recon, image, mask)
    assert torch.equal(out[:, :, :8, :8], recon[:, :, :8, :8])
    assert torch.equal(out[:, :, 8:], image[:, :, 8:])
    assert torch.equal(out[:, :, :, 8:], image[:, :, :, 8:])


def test_feather_back_keeps_the_hole_and_ramps_to_the_image_outside_it():
    image, mask = _image(), _quarter_mask()  # hole: rows and columns 0..7
    recon = torch.full_like(image, 0.5)
    out = feather_back(recon, image, mask, radius=3)
    assert torch.equal(out[:, :, :8, :8], recon[:, :, :8, :8])  # the hole is recon only, never the original
    # dilated by 3, blurred over 3: the original from 2 x 3 px outside the hole on
    assert torch.equal(out[:, :, 14:], image[:, :, 14:]) and torch.equal(out[:, :, :, 14:], image[:, :, :, 14:])
    w = ((out - image) / (recon - image))[0, 0, 2, 7:15]  # the weight of recon across the border, column 7..14
    assert w[0] == 1 and all(1 > a > b > 0 for a, b in zip(w[1:7], w[2:7])) and abs(w[7]) < 1e-6, w


def test_psnr_hand_computed_for_hole_offset():
    image, mask = _image(), _quarter_mask()
    recon = image + 0.1 * mask  # error 0.1 in the hole only
    m = region_metrics(recon, image, mask)
    assert all(v.shape == (2,) for v in m.values())
    # hole MSE = 0.01 -> 10*log10(4/0.01) = 26.02 dB
    assert torch.allclose(m["psnr_hole"], torch.full((2,), 10 * math.log10(4 / 0.01)), atol=1e-3)
    assert m["psnr_hole"][0].item() == pytest.approx(26.0206, abs=1e-3)
    # whole MSE = 0.01 * 1/4 -> 32.04 dB
    assert torch.allclose(m["psnr_whole"], torch.full((2,), 10 * math.log10(4 / 0.0025)), atol=1e-3)
    # known region untouched: capped at 100 dB, not inf
    assert torch.allclose(m["psnr_known"], torch.full((2,), 100.0))
    assert torch.allclose(m["mask_area"], torch.full((2,), 0.25))
    assert torch.allclose(m["pre_error"], torch.zeros(2), atol=1e-12)


def test_pre_error_is_known_region_mse_on_unit_scale():
    image, mask = _image(), _quarter_mask()
    recon = image + 0.2 * (1 - mask) + 0.3 * mask  # hole error must not leak into pre_error
    m = region_metrics(recon, image, mask)
    # 0.2 on the [-1,1] scale is 0.1 on [0,1]: squared 0.01
    assert torch.allclose(m["pre_error"], torch.full((2,), 0.01), rtol=1e-4)
    # consistency with psnr_known below the cap
    assert torch.allclose(m["psnr_known"], -10 * torch.log10(m["pre_error"]), atol=1e-3)


def test_empty_region_is_nan_and_identical_images_are_finite():
    image = _image()
    mask = torch.ones(2, 1, H, W)
    mask[1] = 0  # sample 0: pure reconstruction (no known); sample 1: no hole
    m = region_metrics(image.clone(), image, mask, perceptual=RecordingDistance())
    for key in ("psnr_known", "ssim_known", "lpips_known", "pre_error"):
        assert torch.isnan(m[key][0]) and not torch.isnan(m[key][1]), key
    for key in ("psnr_hole", "ssim_hole", "lpips_hole"):
        assert torch.isnan(m[key][1]) and not torch.isnan(m[key][0]), key
    for key, v in m.items():
        assert not torch.isinf(v).any(), key
    assert m["psnr_whole"].tolist() == pytest.approx([100.0, 100.0])
    assert m["mask_area"].tolist() == [1.0, 0.0]


def test_ssim_of_identical_images_is_one_in_every_region():
    image, mask = _image(), _quarter_mask()
    m = region_metrics(image.clone(), image, mask)
    for region in ("whole", "known", "hole"):
        assert torch.allclose(m[f"ssim_{region}"], torch.ones(2), atol=1e-4), region


def test_ssim_is_local_to_the_region():
    image, mask = _image(), _quarter_mask()
    g = torch.Generator().manual_seed(1)
    recon = image + mask * (torch.rand(image.shape, generator=g) - 0.5)  # noise in the hole only
    m = region_metrics(recon, image, mask)
    assert (m["ssim_hole"] < 0.8).all()
    # the 11x11 window leaks a few pixels past the hole border, so known is high but below 1
    assert (m["ssim_known"] > 0.9).all() and (m["ssim_known"] < 1).all()
    assert (m["ssim_hole"] < m["ssim_whole"]).all() and (m["ssim_whole"] < m["ssim_known"]).all()


def test_lpips_regions_use_the_documented_composites():
    image, mask = _image(), _quarter_mask()
    recon = image + 0.1 * mask - 0.2 * (1 - mask)
    fake = RecordingDistance()
    m = region_metrics(recon, image, mask, perceptual=fake)
    assert len(fake.calls) == 3
    (whole, ref0), (known, ref1), (hole, ref2) = fake.calls
    for ref in (ref0, ref1, ref2):
        assert torch.equal(ref, image)
    assert torch.allclose(whole, recon)
    assert torch.allclose(known, recon * (1 - mask) + image * mask)  # recon only in the known part
    assert torch.allclose(hole, recon * mask + image * (1 - mask))  # recon only in the hole
    # mean |diff| over the full image: hole 0.1 * 1/4, known 0.2 * 3/4
    assert torch.allclose(m["lpips_hole"], torch.full((2,), 0.025), atol=1e-6)
    assert torch.allclose(m["lpips_known"], torch.full((2,), 0.15), atol=1e-6)
    assert torch.allclose(m["lpips_whole"], torch.full((2,), 0.175), atol=1e-6)


def test_no_lpips_keys_without_perceptual():
    image, mask = _image(), _quarter_mask()
    assert not any(k.startswith("lpips") for k in region_metrics(image, image, mask))


def test_shape_mismatch_raises():
    image = _image()
    with pytest.raises(ValueError, match="mask"):
        region_metrics(image, image, torch.zeros(2, 3, H, W))


def test_nanmean_dict_ignores_nan_and_keeps_all_nan():
    batches = [
        {"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("nan")] * 2)},
        {"a": torch.tensor([3.0]), "b": torch.tensor([float("nan")])},
    ]
    out = nanmean_dict(batches)
    assert out["a"] == pytest.approx(2.0)
    assert math.isnan(out["b"])
    with pytest.raises(ValueError, match="keys"):
        nanmean_dict([{"a": torch.ones(1)}, {"b": torch.ones(1)}])


def test_bucket_labels():
    assert bucket_labels() == ["0-10%", "10-20%", "20-30%", "30-40%", "40-50%", "50-60%", "60-100%"]
    assert bucket_labels((0, 0.7, 1.0)) == ["0-70%", "70-100%"]


def test_area_buckets():
    areas = torch.tensor([0.0, 0.05, 0.1, 0.35, 0.59, 0.6, 0.7, 0.99, 1.0])
    assert area_buckets(areas) == [
        "0-10%", "0-10%", "10-20%", "30-40%", "50-60%", "60-100%", "60-100%", "60-100%", "60-100%",
    ]
    assert area_buckets(torch.tensor([0.7]), edges=(0, 0.7, 1.0)) == ["70-100%"]  # float32 edge
    with pytest.raises(ValueError):
        area_buckets(torch.tensor([1.5]))


def test_nanmean_by_bucket_groups_samples():
    batches = [
        {"psnr_whole": torch.tensor([10.0, 20.0]), "mask_area": torch.tensor([0.05, 1.0])},
        {"psnr_whole": torch.tensor([30.0]), "mask_area": torch.tensor([0.08])},
    ]
    out = nanmean_by_bucket(batches)
    assert list(out) == ["0-10%", "60-100%"]
    assert out["0-10%"]["psnr_whole"] == pytest.approx(20.0)
    assert out["60-100%"]["psnr_whole"] == pytest.approx(20.0)
    assert (out["0-10%"]["n"], out["60-100%"]["n"]) == (2.0, 1.0)


def test_sample_grid_shape_and_panel_order():
    image, mask = _image(3), _quarter_mask(3)
    recon = image + 0.1
    grid = sample_grid(image, recon, mask, max_images=2)
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, LABEL_HEIGHT + 2 * (H + 2) + 2, 6 * (W + 2) + 2)  # labels, 2 rows, 6 columns, padding 2
    header = grid[:, :LABEL_HEIGHT]
    column = [header[:, :, 2 + c * (W + 2): 2 + (c + 1) * (W + 2) - 2] for c in range(6)]
    assert all((c < 128).any() for c in column)  # each column's name is written (dark text on white)

    def tile(row, col):
        y, x = LABEL_HEIGHT + 2 + row * (H + 2), 2 + col * (W + 2)
        return grid[:, y : y + H, x : x + W]

    assert (tile(1, 2)[:, :8, :8] == 255).all() and (tile(1, 2)[:, 8:] == 0).all()  # mask: white hole
    assert (tile(0, 1)[:, :8, :8] == 128).all()  # masked image: grey hole
    # |error| = 0.1 on [-1,1] = 0.05 on [0,1], x4 = 0.2 -> 51
    assert (tile(0, 5).int() - 51).abs().max() <= 1


def test_save_grid_writes_readable_png_atomically_with_the_umasks_permissions(tmp_path):
    image, mask = _image(), _quarter_mask()
    grid = sample_grid(image, image, mask)
    path = tmp_path / "sub" / "grid.png"
    old = os.umask(0o027)
    try:
        save_grid(grid, str(path))
        save_grid(grid, str(tmp_path / "sub" / "grid.jpg"))  # the format the extension names
    finally:
        os.umask(old)
    with Image.open(path) as img:
        assert img.format == "PNG"
        array = np.array(img.convert("RGB"))
    assert torch.equal(torch.from_numpy(array).permute(2, 0, 1), grid)
    with Image.open(tmp_path / "sub" / "grid.jpg") as img:
        assert img.format == "JPEG"
    assert sorted(os.listdir(path.parent)) == ["grid.jpg", "grid.png"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o640
