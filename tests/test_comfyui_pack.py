"""The ComfyUI node pack (comfyui/) without ComfyUI: its library isolation and its latent layouts.

The pack's nodes run in ComfyUI (tests/test_comfyui.py, the `comfyui` tier); what they call is here, tested in
any Python: our `ldm`/`data` against a foreign pair ahead of them, and every base's ComfyUI LATENT -> our z.
"""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldm import build_autoencoder

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "comfyui"
TINY = dict(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)


def load_pack(name="asymmetric_decoder_pack"):
    """The pack as ComfyUI imports it: a package under a name of its own (ComfyUI: its folder's path)."""
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


load_pack()
from asymmetric_decoder_pack import layouts  # noqa: E402


def write_foreign(folder: Path) -> Path:
    """A latent-diffusion fork's `ldm` and `data`: any use of them by our library raises, naming them."""
    for top in ("ldm", "data"):
        (folder / top).mkdir(parents=True)
        (folder / top / "__init__.py").write_text(textwrap.dedent(f"""
            FOREIGN = True
            def __getattr__(name):
                raise ImportError("the foreign {top} was used for " + name)
            """))
    (folder / "data" / "images.py").write_text("raise ImportError('the foreign data.images was imported')\n")
    return folder


def test_the_pack_uses_our_library_with_a_foreign_ldm_and_data_ahead_and_imported(tmp_path):
    """In a Python whose path starts with a fork's ldm and data, both already imported: inside Library.active()
    `import ldm`, its lazy `from data.images import ...` and relative imports are ours; outside, the fork's."""
    foreign = write_foreign(tmp_path / "fork")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(foreign)!r})
        import ldm, data                           # the fork's, first on the path and imported before us
        spec = importlib.util.spec_from_file_location("pack", {str(PACK / '__init__.py')!r},
                                                      submodule_search_locations=[{str(PACK)!r}])
        pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
        from pack.library import Library, find_root
        from pathlib import Path
        from PIL import Image
        Image.new("RGB", (16, 16)).save("image.png"); Image.new("L", (16, 16)).save("mask.png")
        lib = Library(find_root(Path({str(PACK)!r})))
        with lib.active():
            import ldm as ours
            from ldm.decoding.pipelines import read_pair
            vae = ours.build_autoencoder(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)
        assert sys.modules["ldm"] is ldm and sys.modules["data"] is data, "the fork's modules were not put back"
        assert "data.images" not in sys.modules
        with lib.active():                           # a later call: read_pair's lazy `from data.images import`
            image, mask = read_pair("image.png", "mask.png")
            assert sys.modules["data.images"].__file__.startswith({str(ROOT)!r})
        assert sys.modules["data"] is data and "data.images" not in sys.modules
        print("OK", type(vae).__module__, image.size)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "OK ldm." in proc.stdout, proc.stderr[-3000:]


def decoder(base: str, seed: int = 0):
    """A tiny random decoder of the base's latent layout (FLUX.2's with batch-norm statistics of its own)."""
    torch.manual_seed(seed)
    layout = {"sd1": dict(z_channels=4, embed_dim=4),
              "flux": dict(z_channels=16, embed_dim=16, use_quant_conv=False,
                           latent_norm={"patch_size": 1, "shift": [0.1159], "scale": [0.3611]}),
              "flux2": dict(z_channels=32, embed_dim=32,
                            latent_norm={"patch_size": 2, "shift": (torch.randn(128) * 0.3).tolist(),
                                         "scale": (torch.rand(128) + 0.5).tolist()}),
              "qwenimage": dict(family="qwenimage", z_channels=16, embed_dim=16)}[base]
    return build_autoencoder(**TINY, **layout).eval()


def comfy_inputs(h=52, w=37, b=2, seed=1):
    """ComfyUI's IMAGE (B, H, W, 3) in [0, 1] and MASK (B, H, W), 1 = to inpaint (a box)."""
    g = torch.Generator().manual_seed(seed)
    image, mask = torch.rand(b, h, w, 3, generator=g), torch.zeros(b, h, w)
    mask[:, 8:24, 10:30] = 1
    return image, mask


def ours(vae, z, image, mask, f=8):
    """The reference: our Python decode of the image's centred crop (VAEEncode's), as ComfyUI's IMAGE."""
    h, w = z.shape[-2] * f, z.shape[-1] * f
    top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
    crop_image = image[:, top:top + h, left:left + w].movedim(-1, 1) * 2 - 1
    crop_mask = mask[:, None, top:top + h, left:left + w]
    out = ((vae.decode(z, crop_image, crop_mask) + 1) / 2).clamp(0, 1).movedim(1, -1)
    full = image.clone()
    full[:, top:top + h, left:left + w] = out
    return full


@pytest.mark.parametrize("base", ["sd1", "flux", "flux2", "qwenimage"])
@torch.no_grad()
def test_every_bases_comfyui_latent_decodes_as_our_python_decode(base):
    """SD and FLUX.1: the raw z; FLUX.2: the 2x2-patchified 128 channels with the batch norm applied (z =
    latent_norm.from_diffusion); Qwen-Image: Wan's (B, 16, 1, h, w). The image is not a multiple of 8: the
    decode covers VAEEncode's centred crop, the image's own pixels the rest."""
    vae, (image, mask) = decoder(base), comfy_inputs()
    z = torch.randn(2, vae.config["embed_dim"], 6, 4)
    samples = {"flux2": lambda: vae.latent_norm.to_diffusion(z), "qwenimage": lambda: z[:, :, None]}.get(base, lambda: z)()
    if base == "flux2":
        assert samples.shape == (2, 128, 3, 2)  # what ComfyUI's FLUX.2 VAE hands a sampler: 1/16, 128 channels
    out = layouts.decode(vae, samples, image, mask)
    assert out.shape == image.shape
    torch.testing.assert_close(out, ours(vae, z, image, mask), atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_tile_option_decodes_in_tiles():
    """tile > 0: ldm's tiled decode (8 latent px of context), close to the whole decode; a tile not above the
    context is refused, naming it."""
    vae, (image, mask) = decoder("sd1"), comfy_inputs(h=160, w=160, b=1)
    z = torch.randn(1, 4, 20, 20)
    whole, tiled = (layouts.decode(vae, z, image, mask, tile=t) for t in (0, 12))
    assert (tiled - whole).abs().mean() < 0.02 and not torch.equal(tiled, whole)
    with pytest.raises(ValueError, match="tile must be"):
        layouts.decode(vae, z, image, mask, tile=4)


@torch.no_grad()
def test_paste_back_keeps_the_images_own_pixels_where_the_mask_is_0_and_a_batch_1_mask_broadcasts():
    vae, (image, mask) = decoder("sd1"), comfy_inputs(h=32, w=32)
    out = layouts.decode(vae, torch.randn(2, 4, 4, 4), image, mask[:1], paste=True)
    known = mask == 0
    assert torch.equal(out[known], image[known])
    assert not torch.allclose(out[~known], image[~known])


@pytest.mark.parametrize("case, message", [
    ("channels", "the LATENT has 16 channels, but my.ckpt (base sd1) takes 4"),
    ("flux2 channels", "takes 32 (or 128: its 2x2-patchified latent)"),
    ("mask size", "the MASK is 16x16 pixels but the IMAGE is 32x32"),
    ("image size", "the LATENT decodes to 32x32 pixels but the IMAGE is 64x64"),
    ("frames", "the LATENT holds 3 frames"),
    ("batch", "the IMAGE has a batch of 3, the LATENT 2"),
])
def test_bad_input_is_refused_naming_it(case, message):
    vae = decoder("flux2" if case == "flux2 channels" else "sd1")
    image, mask = comfy_inputs(h=32, w=32)
    z = torch.randn(2, 4, 4, 4)
    args = {"channels": (torch.randn(2, 16, 4, 4), image, mask),
            "flux2 channels": (torch.randn(2, 16, 4, 4), image, mask),
            "mask size": (z, image, mask[:, :16, :16]),
            "image size": (z, *comfy_inputs(h=64, w=64)),
            "frames": (torch.randn(2, 4, 3, 4, 4), image, mask),
            "batch": (z, image[:1].expand(3, -1, -1, -1), mask)}[case]
    with pytest.raises(ValueError) as err:
        layouts.decode(vae, *args, name="my.ckpt")
    assert message in str(err.value)


@pytest.mark.parametrize("base, name", [("sd1", "sd1"), ("flux", "flux"), ("flux2", "flux2-like"),
                                        ("qwenimage", "qwenimage")])
def test_the_base_a_decoder_shows(base, name):
    assert layouts.base_of(decoder(base)).startswith(name)
