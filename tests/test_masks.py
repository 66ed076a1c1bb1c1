"""Masks: binary, right shape, reproducible, independent per (rank, worker), preset areas as defined."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data import (MEAN_AREA, PRESETS, MaskGenerator, box_mask, load_mask_files, make_eval_masks, outpaint_mask,
                  sample_rng, save_masks, stroke_mask)


def four_se(areas):
    """Tolerance stated by these tests: 4 standard errors of a mean, plus MEAN_AREA's own error (~0.003)."""
    return 4 * np.std(areas) / math.sqrt(len(areas)) + 0.005


@pytest.mark.parametrize("fn", [stroke_mask, box_mask, outpaint_mask])
def test_each_kind_is_binary_with_the_right_shape(fn):
    rng = np.random.default_rng(0)
    for size in [(64, 96), (256, 256)]:
        masks = [fn(rng, size) for _ in range(20)]
        for m in masks:
            assert m.shape == size and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 1}
        assert 0 < np.mean(masks) < 1


def test_generator_output_and_p_full():
    gen = MaskGenerator(128, p_full=0.5)
    rng = np.random.default_rng(1)
    masks = np.stack([gen(rng) for _ in range(600)])
    assert masks.shape == (600, 128, 128) and set(np.unique(masks)) == {0, 1}
    full = (masks == 1).all(axis=(1, 2)).mean()
    assert abs(full - 0.5) < 0.08  # 4 standard errors of a fraction p = 0.5 over 600 draws: 0.082
    assert not (np.stack([MaskGenerator(64, p_full=0.0)(rng) for _ in range(100)]) == 1).all(axis=(1, 2)).any()
    assert (MaskGenerator(64, p_full=1.0)(rng) == 1).all()


def test_same_seed_same_masks_and_streams_differ_per_rank_and_worker():
    gen = MaskGenerator(64, p_full=0.0)

    def stream(rank, worker, seed=0):
        return np.stack([gen(sample_rng(seed, 0, rank, worker, 0, i)) for i in range(6)])

    assert np.array_equal(stream(1, 1), stream(1, 1))
    streams = {(r, w): stream(r, w) for r in range(2) for w in range(2)}
    keys = list(streams)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            same = [np.array_equal(x, y) for x in streams[keys[a]] for y in streams[keys[b]]]
            assert not any(same), (keys[a], keys[b])
    assert not np.array_equal(stream(0, 0, seed=0), stream(0, 0, seed=1))


@pytest.mark.parametrize("preset", ["thick", "medium", "thin", "outpaint"])
@pytest.mark.parametrize("resolution", [256, 512])
def test_preset_mean_area_matches_its_definition(preset, resolution):
    n = 400 if resolution == 256 else 200
    gen = MaskGenerator(resolution, p_full=0.0, mix={preset: 1.0})
    rng = np.random.default_rng(123)
    areas = [gen(rng).mean() for _ in range(n)]
    assert abs(np.mean(areas) - MEAN_AREA[preset]) < four_se(areas), (np.mean(areas), MEAN_AREA[preset])


def _segment_distance(xx, yy, x1, y1, x2, y2):
    dx, dy = x2 - x1, y2 - y1
    t = np.clip(((xx - x1) * dx + (yy - y1) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
    return np.hypot(xx - (x1 + t * dx), yy - (y1 + t * dy))


def _reference_mask(rng, res, preset):
    """LaMa's definition in continuous geometry, point-sampled at pixel centres (independent of PIL)."""
    parts = list(PRESETS[preset].items())
    weights = np.array([p["weight"] for _, p in parts])
    kind, p = parts[rng.choice(len(parts), p=weights / weights.sum())]
    s = res / 256
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    mask = np.zeros((res, res), bool)
    if kind == "boxes":
        hi = min(p["max_size"], 256 - 2 * p["margin"])
        for _ in range(rng.integers(p["min_times"], p["max_times"] + 1)):
            bw, bh = rng.integers(p["min_size"], hi, size=2) * s
            margin = p["margin"] * s
            x, y = rng.uniform(margin, res - margin - bw), rng.uniform(margin, res - margin - bh)
            mask |= (xx >= x) & (xx < x + bw) & (yy >= y) & (yy < y + bh)
        return mask
    for i in range(rng.integers(p["min_times"], p["max_times"] + 1)):
        x, y = rng.uniform(0, res, size=2)
        for _ in range(1 + rng.integers(5)):
            angle = 0.01 + rng.integers(p["max_angle"])
            angle = 2 * math.pi - angle if i % 2 == 0 else angle
            length, width = (10 + rng.integers(p["max_len"])) * s, (5 + rng.integers(p["max_width"])) * s
            x2, y2 = np.clip(x + length * math.sin(angle), 0, res), np.clip(y + length * math.cos(angle), 0, res)
            mask |= _segment_distance(xx, yy, x, y, x2, y2) <= width / 2
            x, y = x2, y2
    return mask


@pytest.mark.parametrize("preset", ["thick", "medium", "thin"])
def test_preset_areas_agree_with_an_independent_rasterizer(preset):
    rng = np.random.default_rng(7)
    areas = [_reference_mask(rng, 64, preset).mean() for _ in range(250)]
    assert abs(np.mean(areas) - MEAN_AREA[preset]) < four_se(areas), (np.mean(areas), MEAN_AREA[preset])


def test_presets_are_configurable_and_unknown_names_fail():
    wide = MaskGenerator(256, p_full=0.0, mix={"thin": 1.0}, presets={"thin": {"strokes": {"max_width": 40}}})
    thin = MaskGenerator(256, p_full=0.0, mix={"thin": 1.0})
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert np.mean([wide(rng_a).mean() for _ in range(50)]) > np.mean([thin(rng_b).mean() for _ in range(50)]) + 0.1
    with pytest.raises(ValueError, match="huge"):
        MaskGenerator(256, mix={"huge": 1.0})
    with pytest.raises(ValueError, match="blobs"):
        MaskGenerator(256, presets={"thin": {"blobs": {}}})


def test_eval_masks_fixed_capped_nested_and_saved(tmp_path):
    masks = make_eval_masks(12, 64, seed=3, max_area=0.5)
    assert masks.shape == (12, 64, 64) and masks.dtype == np.uint8
    areas = masks.mean(axis=(1, 2))
    assert (areas <= 0.5).all() and (areas > 0).all()
    assert np.array_equal(masks, make_eval_masks(12, 64, seed=3))
    assert np.array_equal(masks[:5], make_eval_masks(5, 64, seed=3))  # mask i depends on (seed, i) only
    assert not np.array_equal(masks, make_eval_masks(12, 64, seed=4))
    paths = save_masks(masks, tmp_path / "masks")
    assert len(paths) == 12 and np.asarray(Image.open(paths[0])).max() == 255
    loaded = load_mask_files(tmp_path / "masks")
    assert loaded.shape == (12, 1, 64, 64) and loaded.dtype == torch.float32
    assert torch.equal(loaded[:, 0], torch.from_numpy(masks).float())


def test_load_mask_files_white_is_hole_and_resizes(tmp_path):
    grey = np.zeros((40, 40), np.uint8)
    grey[10:20, 10:30] = 255  # white rectangle = hole
    Image.fromarray(grey).convert("RGB").save(tmp_path / "m.png")
    mask = load_mask_files(tmp_path / "m.png")
    assert mask.shape == (1, 1, 40, 40) and mask.sum() == 200 and mask[0, 0, 15, 15] == 1 and mask[0, 0, 0, 0] == 0
    assert load_mask_files([tmp_path / "m.png"], resolution=80).sum() == 800


def test_load_mask_files_errors_name_the_folder(tmp_path):
    (tmp_path / "masks_here").mkdir()
    (tmp_path / "masks_here" / "notes.txt").write_text("not a mask")
    with pytest.raises(FileNotFoundError, match="masks_here"):
        load_mask_files(tmp_path / "masks_here")
    with pytest.raises(FileNotFoundError, match="empty"):
        load_mask_files([])
