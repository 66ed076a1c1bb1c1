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
    seam_band,
    seam_error,
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


# ---- colour (CIEDE2000) and seam --------------------------------------------------------------------------
# sRGB (D65) <-> CIELAB written out from the standards, and CIEDE2000 from Sharma, Wu & Dalal (2005): a computation
# independent of scikit-image, which ldm.metrics uses
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
WHITE = np.array([0.95047, 1.0, 1.08883])
EPS = (6 / 29) ** 3


def lab_to_srgb(lab):
    L, a, b = lab
    fy = (L + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    xyz = np.where(f ** 3 > EPS, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * WHITE
    lin = np.linalg.solve(RGB_TO_XYZ, xyz)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def de2000(lab1, lab2):
    (L1, a1, b1), (L2, a2, b2) = lab1, lab2
    c_bar = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_bar ** 7 / (c_bar ** 7 + 25 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p, h2p = (math.degrees(math.atan2(b, a)) % 360 if (a or b) else 0.0 for a, b in ((a1p, b1), (a2p, b2)))
    dh = 0.0 if c1p * c2p == 0 else (h2p - h1p + 180) % 360 - 180
    d_h = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dh / 2))
    l_bar, cp_bar = (L1 + L2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        h_bar = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        h_bar = (h1p + h2p) / 2
    else:
        h_bar = (h1p + h2p + 360) / 2 if h1p + h2p < 360 else (h1p + h2p - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(h_bar - 30)) + 0.24 * math.cos(math.radians(2 * h_bar))
         + 0.32 * math.cos(math.radians(3 * h_bar + 6)) - 0.20 * math.cos(math.radians(4 * h_bar - 63)))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / math.sqrt(20 + (l_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    r_t = -math.sin(math.radians(60 * math.exp(-(((h_bar - 275) / 25) ** 2)))) * 2 * math.sqrt(
        cp_bar ** 7 / (cp_bar ** 7 + 25 ** 7))
    dl, dc = (L2 - L1) / s_l, (c2p - c1p) / s_c
    return math.sqrt(dl ** 2 + dc ** 2 + (d_h / s_h) ** 2 + r_t * dc * (d_h / s_h))


def hue_rotated(lab, degrees):
    L, a, b = lab
    c, h = math.hypot(a, b), math.atan2(b, a) + math.radians(degrees)
    return (L, c * math.cos(h), c * math.sin(h))


def test_the_reference_ciede2000_reproduces_sharmas_published_pairs():
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, 2.5, 0), (73, 25, -18), 27.1492), ((50, 2.5, 0), (61, -5, 29), 22.8977),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644)]
    for lab1, lab2, want in pairs:
        assert de2000(lab1, lab2) == pytest.approx(want, abs=1e-4), (lab1, lab2)


def test_colour_difference_of_a_hue_shifted_known_region_is_the_expected_ciede2000():
    """Two flat colours (left, right), the hole a top strip; the output keeps L and C and turns the hue by 25 degrees
    in the known region, and is black in the hole (which must not count): de2000_known is the mean of the two
    colours' CIEDE2000 over the known pixels (half each). An unchanged known region gives 0."""
    colours = [(55.0, 20.0, 15.0), (40.0, -10.0, 25.0)]
    image, recon = torch.zeros(2, 1, 3, H, W, dtype=torch.float64)
    for side, lab in enumerate(colours):
        cols = slice(side * W // 2, (side + 1) * W // 2)
        image[0, :, :, cols] = torch.from_numpy(lab_to_srgb(lab) * 2 - 1)[:, None, None]
        recon[0, :, :, cols] = torch.from_numpy(lab_to_srgb(hue_rotated(lab, 25)) * 2 - 1)[:, None, None]
    image, recon = image.float(), recon.float()
    assert image.min() > -1 and image.max() < 1 and recon.min() > -1 and recon.max() < 1  # in the sRGB gamut
    mask = torch.zeros(1, 1, H, W)
    mask[..., :4, :] = 1
    shifted = recon * (1 - mask) - mask  # black in the hole
    want = sum(de2000(lab, hue_rotated(lab, 25)) for lab in colours) / 2
    cie76 = sum(math.dist(lab, hue_rotated(lab, 25)) for lab in colours) / 2
    assert abs(want - cie76) > 0.2 * want  # the test tells CIEDE2000 from a plain Lab distance
    got = region_metrics(shifted, image, mask)["de2000_known"]
    assert got.item() == pytest.approx(want, abs=1e-3)
    unchanged = image * (1 - mask) - mask
    assert region_metrics(unchanged, image, mask)["de2000_known"].item() == pytest.approx(0, abs=1e-4)


def test_seam_is_zero_when_identical_and_grows_as_the_edge_blurs():
    from torchvision.transforms.functional import gaussian_blur
    image = _image(1, seed=3)
    mask = torch.zeros(1, 1, H, W)
    mask[..., :, :8] = 1  # the hole's edge: between columns 7 and 8
    seam = [seam_error(image, image, mask, radius=2).item()]
    for sigma in (0.5, 1.0, 2.0):
        blurred = gaussian_blur(image, kernel_size=7, sigma=sigma)
        seam.append(seam_error(image * (1 - seam_band(mask, 2)) + blurred * seam_band(mask, 2), image, mask,
                               radius=2).item())
    assert seam[0] == 0 and seam[1] > 0 and seam[1] < seam[2] < seam[3], seam
    # a step at the edge (the hole 0.3 brighter) is a seam; the same shift everywhere is a colour change, no seam
    # |0.3| / 2 on the band's column 7 of its 4 (6..9)
    assert seam_error(image + 0.3 * mask, image, mask, radius=2).item() == pytest.approx(0.3 / 2 / 4, rel=1e-5)
    assert seam_error(image + 0.3, image, mask, radius=2).item() == pytest.approx(0, abs=1e-6)
    band = seam_band(mask, 2)[0, 0]
    assert band[:, 6:10].all() and band.sum() == 4 * H  # 2 px each side of the edge
    assert region_metrics(image, image, mask)["seam"].item() == 0
    assert torch.isnan(seam_error(image, image, torch.ones_like(mask)))  # no edge


def test_the_colour_metric_scores_outputs_outside_the_range_as_the_image_file_holds_them():
    """A decoder's output beyond [-1, 1] (highlights past white, shadows past black) is scored clamped, as an image
    file holds it: no colour difference where the clamped output is the image, and the clamped output's difference
    elsewhere (not extrapolated through the sRGB curve, not rescaled to the output's own range)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    image[:, :, :3], image[:, :, 3:5] = 1.0, -1.0  # white rows, black rows
    out = image.clone()
    out[:, :, :3] += torch.rand(2, 3, 3, 8, generator=g) * 0.5 + 0.1  # past white
    out[:, :, 3:5] -= torch.rand(2, 3, 2, 8, generator=g) * 0.5 + 0.1  # past black
    known = torch.zeros(2, 1, 8, 8)
    assert region_metrics(out, image, known)["de2000_known"].abs().max() == 0
    out[:, :, 5:] += torch.randn(2, 3, 3, 8, generator=g) * 0.3  # in range, or past it, and different
    got = region_metrics(out, image, known)["de2000_known"]
    want = region_metrics(out.clamp(-1, 1), image, known)["de2000_known"]
    assert (got > 0.5).all() and torch.equal(got, want)
