"""What a pipeline run is given: an image, a mask (white = hole, or the region an edit may change) and a control image,
as tensors, PIL images or files; and a --batch file's rows."""
import csv
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import ImageOps

from .table import PipelineError

BATCH_COLUMNS = ("image", "mask", "prompt", "out", "control", "control_mode")  # a --batch file's; the last two optional
REQUIRED = 4  # image, mask, prompt, out


class Job(NamedTuple):
    """One run of scripts/inpaint.py: files, prompt, and where a pipeline takes them a control image and mode."""
    image: Path
    mask: Path
    prompt: str
    out: Path
    control: Optional[Path] = None
    control_mode: Optional[int] = None


def shown(image):
    """A PIL image as it is shown: the user's own Image.open of a phone photo still holds its EXIF orientation
    (data/images.py decode_image applies it to the files we open; a no-op on those)."""
    return ImageOps.exif_transpose(image)


def image_tensor(image) -> torch.Tensor:
    """A tensor, or a PIL image (turned as shown) -> (1,3,H,W) in [-1,1]."""
    if isinstance(image, torch.Tensor):
        return image
    pixels = np.asarray(shown(image).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1


def as_tensors(image, mask, control=None):
    """An image, mask (white = hole) and optional control image as tensors or PIL images -> (B,3,H,W) in [-1,1],
    (B,1,H,W) in {0,1}, the control (B or 1,3,H,W) in [-1,1] or None; all of the image's size."""
    image = image_tensor(image)
    if not isinstance(mask, torch.Tensor):
        mask = torch.from_numpy(np.asarray(shown(mask).convert("L")) > 127)[None, None]
    if (image.dim() != 4 or image.shape[1] != 3 or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[-2:] != image.shape[-2:] or mask.shape[0] not in (1, image.shape[0])):
        raise PipelineError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)}: want (B,3,H,W) and "
                            "(B or 1,1,H,W) of the same size")
    if control is not None:
        control = image_tensor(control).float()
        if control.dim() != 4 or control.shape[1] != 3 or control.shape[-2:] != image.shape[-2:]:
            raise PipelineError(f"control image {tuple(control.shape)}: want (B or 1,3,H,W) of the image's size "
                                f"{tuple(image.shape[-2:])}")
        control = control.expand(image.shape[0], -1, -1, -1)
    return image.float(), (mask > 0.5).float().expand(image.shape[0], -1, -1, -1), control


def read_image(name, path):
    from data.images import open_image, to_rgb
    try:
        with open_image(path) as img:  # decoded: a truncated file raises here
            return to_rgb(img)
    except (OSError, ValueError) as err:  # missing, unreadable, truncated
        raise PipelineError(f"{name} {path}: not a readable image ({err})") from None


def read_images(image_path, mask_path, control_path=None):
    """(RGB image, L mask, RGB control image or None) PIL images of the same size from files (mask: white = hole)."""
    image, mask = read_image("image", image_path), read_image("mask", mask_path).convert("L")
    control = None if control_path is None else read_image("control image", control_path)
    for name, path, other in (("mask", mask_path, mask), ("control image", control_path, control)):
        if other is not None and other.size != image.size:
            raise PipelineError(f"image {image_path} is {image.size[0]}x{image.size[1]} but {name} {path} "
                                f"{other.size[0]}x{other.size[1]}")
    return image, mask, control


def read_pair(image_path, mask_path):
    """(RGB image, L mask) PIL images of the same size from files (mask: white = hole)."""
    return read_images(image_path, mask_path)[:2]


def read_batch(path) -> list[Job]:
    """[Job] from a CSV file of the columns image, mask, prompt, out[, control[, control_mode]] (an optional header
    row of those names; blank lines skipped; quote a prompt that holds commas); relative paths are relative to the
    file's folder; an empty control cell: none."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PipelineError(f"{path}: not a readable CSV file ({err})") from None
    if rows and [c.strip().lower() for c in rows[0][1]] == list(BATCH_COLUMNS[:len(rows[0][1])]):
        rows = rows[1:]
    if not rows:
        raise PipelineError(f"{path}: no rows (want {', '.join(BATCH_COLUMNS[:REQUIRED])} per line)")
    return [batch_row(path, n, row) for n, row in rows]


def batch_row(path: Path, n: int, row: list) -> Job:
    if not REQUIRED <= len(row) <= len(BATCH_COLUMNS):
        raise PipelineError(f"{path}:{n}: {len(row)} columns, want {REQUIRED}: {', '.join(BATCH_COLUMNS[:REQUIRED])} "
                            f"(then optionally {', '.join(BATCH_COLUMNS[REQUIRED:])})")
    cells = [c.strip() for c in row] + [""] * (len(BATCH_COLUMNS) - len(row))
    image, mask, prompt, out, control, mode = cells
    image, mask, out = (path.parent / p for p in (image, mask, out))
    control = path.parent / control if control else None
    for name, p in (("image", image), ("mask", mask), ("control", control)):
        if p is not None and not p.is_file():
            raise PipelineError(f"{path}:{n}: {name} {p}: no such file")
    if mode and not mode.isdigit():
        raise PipelineError(f"{path}:{n}: control_mode {mode!r}: not a whole number")
    return Job(image, mask, prompt, out, control, int(mode) if mode else None)
