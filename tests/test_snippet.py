"""The Python snippet of README.md and docs/bases.md (a user's own pipeline object, our decoder, image, mask -> the
decoded image) runs as written against a tiny offline pipeline and a decoder export at the paths it names."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
import tiny_pipelines  # noqa: E402
from ldm import build_autoencoder  # noqa: E402
from ldm.decoding import pipelines  # noqa: E402
from probe_utils import load_script  # noqa: E402
from test_bases import base_kwargs  # noqa: E402
from test_docs import FENCE, ROOT  # noqa: E402
from test_inpaint_variants import their_vae  # noqa: E402
from test_interop import jitter  # noqa: E402

MARK = "from ldm.decoding.pipelines import inpaint"


def snippet(doc) -> str:
    blocks = [b for b in FENCE.findall((ROOT / doc).read_text()) if MARK in b]
    assert len(blocks) == 1, f"{doc}: {len(blocks)} snippets"
    return blocks[0]


def test_the_readme_and_docs_hold_the_same_snippet():
    assert snippet("README.md") == snippet("docs/bases.md")


def test_the_snippet_runs_as_written(tmp_path, monkeypatch):
    code = snippet("README.md")
    cls = re.search(r"from diffusers import (\w+)", code).group(1)
    folder = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    export = re.search(r'load_autoencoder\("([^"]+)"\)', code).group(1)
    _, built = tiny_pipelines.build(cls, their_vae("flux"), tmp_path / "built")
    (tmp_path / folder).parent.mkdir(parents=True, exist_ok=True)
    built.rename(tmp_path / folder)
    torch.manual_seed(0)
    ours = jitter(build_autoencoder(**{**base_kwargs("flux"), "ch": 32, "num_res_blocks": 1, "encoder_ch": 32,
                                       "encoder_num_res_blocks": 1}), 0)
    load_script("export").save_diffusers(ours, tmp_path / export)
    g = np.random.default_rng(0)
    for name in ("photo.jpg", "canny.png"):
        Image.fromarray(g.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / name)
    mask = np.zeros((64, 96), np.uint8)
    mask[16:40, 32:72] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipelines, "native_size", lambda pipe: 64)  # the tiny pipeline at 64^2 px, not 1024^2
    exec(compile(code, "README.md", "exec"), {})
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (96, 64)
