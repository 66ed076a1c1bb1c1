"""A phone photo, a JPEG stored landscape with EXIF orientation 6 or 8, is read as it is shown (portrait) wherever we
read an image (data/images.py decode_image): inpainting, with its mask drawn on the photo as shown; evaluation
folders (images and masks); training folders and shards. And no reader opens an image file any other way."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from data import ImageMaskTrain, MaskGenerator, load_mask_files, resolve_source
from data.evaluation import EvalImages
from data.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
RES = 16
RED, BLUE = (220, 30, 30), (30, 30, 220)
STORED = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # what viewers undo for orientation 6, 8


def shown(width=48, height=72):
    """The photo as shown: portrait, left half red, right half blue (a sideways or upside-down read moves them)."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, :width // 2], pixels[:, width // 2:] = RED, BLUE
    return Image.fromarray(pixels)


def phone_jpeg(path, orientation, image=None):
    """`image` (default: shown()) stored turned, as a phone's camera writes it, with the orientation that turns it
    back."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    (image or shown()).transpose(STORED[orientation]).save(path, quality=95, exif=exif)
    return path


def assert_as_shown(pixels):
    """(H, W, 3) uint8 of any crop of the full width of shown(): red on the left, blue on the right."""
    pixels = np.asarray(pixels, float)
    half = pixels.shape[1] // 2
    left, right = pixels[:, :half - 1].mean((0, 1)), pixels[:, half + 1:].mean((0, 1))
    assert np.abs(left - RED).max() < 20 and np.abs(right - BLUE).max() < 20, (left, right)


@pytest.fixture(scope="module")
def phone_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phone")
    for orientation in STORED:
        phone_jpeg(folder / f"phone{orientation}.jpg", orientation)
    return folder


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_inpainting_reads_a_phone_photo_as_shown_and_its_mask_fits(tmp_path, orientation):
    from ldm.decoding.pipelines import read_pair
    mask = Image.new("L", (48, 72))
    mask.paste(255, (0, 0, 48, 20))  # drawn on the photo as shown: a strip at the top
    mask.save(tmp_path / "mask.png")
    image, mask = read_pair(phone_jpeg(tmp_path / "phone.jpg", orientation), tmp_path / "mask.png")
    assert image.size == mask.size == (48, 72)
    assert_as_shown(image)
    from ldm.decoding.pipelines import as_tensors  # the Python API, given the user's own Image.open of the photo
    image, mask, _ = as_tensors(Image.open(tmp_path / "phone.jpg"), Image.open(tmp_path / "mask.png"))
    assert image.shape == (1, 3, 72, 48) and mask.shape == (1, 1, 72, 48)
    assert_as_shown(((image[0].permute(1, 2, 0) + 1) * 127.5).numpy())


def test_evaluation_folders_read_images_and_masks_as_shown(phone_folder, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    strip = np.zeros((72, 48), np.uint8)
    strip[:20] = 255  # a hole at the top of the photo as shown
    for orientation in STORED:
        phone_jpeg(masks / f"mask{orientation}.jpg", orientation, Image.fromarray(strip).convert("RGB"))
    read = load_mask_files(masks)  # (2, 1, 72, 48)
    assert tuple(read.shape) == (2, 1, 72, 48) and read[:, 0, :18].min() == 1 and read[:, 0, 22:].max() == 0
    samples = list(EvalImages(resolve_source(str(phone_folder)), RES, read[:, :, :RES, :RES]))
    assert len(samples) == 2
    for sample in samples:
        assert_as_shown(((sample["image"].permute(1, 2, 0) + 1) * 127.5).numpy())


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_training_reads_a_phone_photo_as_shown(phone_folder, tmp_path, kind):
    source = str(phone_folder)
    if kind == "shards":
        write_shards(sorted(map(str, phone_folder.glob("*.jpg"))), str(phone_folder), tmp_path, 10, "train")
        source = str(tmp_path / "train-000000.tar")
    train = ImageMaskTrain(resolve_source(source), RES, MaskGenerator(RES, p_full=0.0), length=2, batch_size=1,
                           crop_min_scale=1.0, flip=False)  # full-width crops of the portrait photo
    samples = list(train)
    assert len(samples) == 2
    for sample in samples:
        assert_as_shown(((sample["image"].permute(1, 2, 0) + 1) * 127.5).numpy())


def test_every_image_file_is_opened_by_decode_image():
    opens = [f"{path.relative_to(ROOT)}:{n}" for path in sorted(ROOT.glob("**/*.py"))
             if ".venv" not in path.parts and path.parts[len(ROOT.parts)] != "tests"
             for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"Image\.open\(", line)]
    assert [where.split(":")[0] for where in opens] == ["data/images.py"], opens
