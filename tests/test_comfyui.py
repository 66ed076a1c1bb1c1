"""The `comfyui` tier: the node pack (comfyui/) in a real ComfyUI server (tests/comfyui_server.py), CPU.

One server for the tier, started with a latent-diffusion fork's `ldm` and `data` first on its path and imported
by a node pack of the fork's before ours (the pack must use ours). Workflows in ComfyUI's API format are posted
to /prompt: a photo with an alpha mask -> ComfyUI's own VAELoader and VAEEncode (a full-width random-weight VAE
of the base, as ComfyUI reads only the real widths) -> our decode node -> SaveImage; what it saves equals our
Python decode of the same latent (SaveLatent) to 8-bit rounding, and for decoders the tier trains once, the
known region is nearer the photo than ComfyUI's own VAEDecode gives.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import comfyui_server as cs
from ldm import build_autoencoder, load_autoencoder
from test_comfyui_pack import TINY, decoder as tiny_decoder, write_foreign

pytestmark = pytest.mark.comfyui
ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 70)  # (H, W): not a multiple of 8 wide (VAEEncode crops 3 px each side)
BASES = {"sd1": 4, "flux": 16}  # trained here: the SD family and a 16-channel base, both ComfyUI's encoder reads
# 30 steps of L1 only at 32 px from a random encoder (the known region comes through the masked-image branch,
# whatever the encoder), no EMA (its 0.9999 would keep the initial weights): about 45 s of CPU per run
TRAIN = [*[f"model.autoencoder.{k}={v}" for k, v in TINY.items()], "model.vae_ckpt=null",
         "model.sample_posterior=false", "perceptual.pretrained=false", "loss.perceptual_weight=0",
         "loss.disc_weight=0", "ema.decay=null", "discriminator.ndf=8", "discriminator.n_layers=2", "data.resolution=32", "data.batch_size=2",
         "data.num_workers=0", "data.val_size=2", "trainer.accelerator=cpu", "trainer.devices=1",
         "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1", "trainer.max_steps=30",
         "trainer.val_check_interval=30", "optim.warmup_steps=1", "optim.base_lr=1e-3"]


def write_vae(path: Path, channels: int, seed: int):
    """A full-width SD-layout VAE (ch 128, ch_mult 1,2,4,4, 2 res blocks), random weights, diffusers keys, fp16:
    4 channels with quant convs (SD), or 16 without (FLUX.1)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    quant = channels == 4
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=channels,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=quant, use_post_quant_conv=quant)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(path))


def write_photo(path: Path, hole=(16, 44, 20, 52)):
    """A photo (scikit-image's astronaut) at SIZE, transparent in the box `hole` (LoadImage: mask = 1 - alpha)."""
    import skimage.data
    rgb = Image.fromarray(skimage.data.astronaut()).resize(SIZE[::-1], Image.BICUBIC)
    rgba = np.concatenate([np.asarray(rgb), np.full((*SIZE, 1), 255, np.uint8)], axis=-1)
    top, bottom, left, right = hole
    rgba[top:bottom, left:right, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)


class Tier:
    """The session's server, its files, and the decoders trained for it."""

    def __init__(self, home: Path):
        self.home = home
        fork = write_foreign(home / "fork")
        (home / "base" / "custom_nodes" / "a_fork").mkdir(parents=True)  # a fork's node pack, importing its ldm
        (home / "base" / "custom_nodes" / "a_fork" / "__init__.py").write_text(
            "import ldm, data\nassert ldm.FOREIGN and data.FOREIGN\nNODE_CLASS_MAPPINGS = {}\n")
        runs = {base: self.train(base) for base in BASES}  # two processes, while the server starts
        self.server = cs.ComfyServer(home, {"PYTHONPATH": str(fork)})
        try:
            for n, (base, channels) in enumerate(BASES.items()):
                write_vae(self.server.models("vae") / f"base_{base}.safetensors", channels, seed=n)
            write_photo(self.server.input_dir / "photo.png")
            self.decoders = {base: self.finish(base, proc) for base, proc in runs.items()}
            self.server.wait_ready()
        except BaseException:
            self.server.stop()
            raise

    def train(self, base: str):
        cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "bases" / f"{base}.yaml"),
               *TRAIN, f"run.log_dir={self.home / 'runs'}", "--name", base]
        env = {**cs.os.environ, "OMP_NUM_THREADS": "1"}  # two runs side by side on 2 cores: a thread each
        return subprocess.Popen(cmd, cwd=self.home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def finish(self, base: str, proc) -> Path:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"train.py ({base}) failed:\n{out[-4000:]}")
        dest = self.server.models("asymmetric_decoders") / f"{base}.ckpt"
        shutil.copy(self.home / "runs" / base / "checkpoints" / "last.ckpt", dest)
        return dest

    def run(self, workflow: dict) -> dict:
        entry = self.server.run(workflow)
        assert entry["status"]["status_str"] == "success", cs.errors_of(entry) or entry["status"]
        return entry

    def image(self, entry: dict, node: str) -> np.ndarray:
        saved = entry["outputs"][node]["images"][0]
        return np.asarray(Image.open(self.server.output_dir / saved["subfolder"] / saved["filename"])).astype(int)

    def latent(self, entry: dict, node: str) -> torch.Tensor:
        saved = entry["outputs"][node]["latents"][0]
        return load_file(str(self.server.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]


@pytest.fixture(scope="session")
def tier(tmp_path_factory):
    reason = cs.cannot_start()
    if reason:
        cs.skip_or_fail(reason)
    started = time.time()
    tier = Tier(tmp_path_factory.mktemp("comfyui"))
    print(f"\n[comfyui tier] server up, decoders trained: {time.time() - started:.1f} s")
    try:
        yield tier
    finally:
        tier.server.stop()


def encode_decode(base: str, decoder: str, image="photo.png", paste=False) -> dict:
    """photo -> VAELoader/VAEEncode (ComfyUI's) -> our decode -> SaveImage; SaveLatent; VAEDecode -> SaveImage."""
    return {
        "image": {"class_type": "LoadImage", "inputs": {"image": image}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f"base_{base}.safetensors"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}},
        "decoder": {"class_type": "LoadAsymmetricDecoder", "inputs": {"decoder_name": decoder}},
        "decode": {"class_type": "AsymmetricDecode", "inputs": {
            "decoder": ["decoder", 0], "samples": ["encode", 0], "image": ["image", 0], "mask": ["image", 1],
            "tile": 0, "paste_back": paste}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"ours_{base}"}},
        "latent": {"class_type": "SaveLatent", "inputs": {"samples": ["encode", 0], "filename_prefix": f"z/{base}"}},
        "plain": {"class_type": "VAEDecode", "inputs": {"samples": ["encode", 0], "vae": ["vae", 0]}},
        "save_plain": {"class_type": "SaveImage", "inputs": {"images": ["plain", 0], "filename_prefix": f"vae_{base}"}},
    }


def python_decode(path, z, photo: np.ndarray) -> np.ndarray:
    """Our Python decode of z with the photo and its mask, 8-bit (B=1, H, W, 3), at the photo's size."""
    vae = load_autoencoder(path)
    rgb = torch.tensor(photo[..., :3] / 255.0, dtype=torch.float32).movedim(-1, 0)[None]
    mask = torch.tensor(1 - photo[..., 3] / 255.0, dtype=torch.float32)[None, None]
    h, w = z.shape[-2] * 8, z.shape[-1] * 8
    top, left = (SIZE[0] - h) // 2, (SIZE[1] - w) // 2
    crop = lambda t: t[..., top:top + h, left:left + w]  # noqa: E731  (VAEEncode's centred crop)
    with torch.no_grad():
        out = ((vae.decode(z, crop(rgb) * 2 - 1, crop(mask)) + 1) / 2).clamp(0, 1)
    full = rgb.clone()
    full[..., top:top + h, left:left + w] = out
    return (full[0].movedim(0, -1).numpy() * 255).round().astype(int), (top, left, h, w)


@pytest.mark.parametrize("base", list(BASES))
def test_the_decode_node_equals_our_python_decode_and_keeps_the_known_region(tier, base):
    entry = tier.run(encode_decode(base, f"asymmetric_decoders/{base}.ckpt"))
    assert entry["outputs"]["decoder"]["text"] == [base]  # the loader shows the decoder's base
    photo = np.asarray(Image.open(tier.server.input_dir / "photo.png")).astype(int)
    ours, z = tier.image(entry, "save"), tier.latent(entry, "latent")
    assert z.shape == (1, BASES[base], SIZE[0] // 8, SIZE[1] // 8)
    expected, (top, left, h, w) = python_decode(tier.decoders[base], z, photo)
    assert ours.shape == (*SIZE, 3)
    assert np.abs(ours - expected).max() <= 1  # 8-bit rounding
    known = photo[top:top + h, left:left + w, 3] == 255
    crop = lambda a: a[top:top + h, left:left + w, :3]  # noqa: E731
    err_ours = np.abs(crop(ours) - crop(photo))[known].mean()
    err_vae = np.abs(tier.image(entry, "save_plain") - crop(photo))[known].mean()
    print(f"\n[comfyui tier] {base}: known-region mean |error| (8-bit): ours {err_ours:.1f}, VAEDecode {err_vae:.1f}")
    assert err_ours < err_vae, (err_ours, err_vae)


def test_flux2s_latent_layout_decodes_as_our_python_decode(tier):
    """FLUX.2 (ComfyUI after this snapshot): a LATENT of 128 channels at 1/16, the batch norm applied, that the
    test builds (LoadLatent) -> our decode node; equals latent_norm.from_diffusion then our Python decode."""
    from ldm.formats.export import save_decoder
    vae = tiny_decoder("flux2", seed=3)
    save_decoder(vae, tier.server.models("asymmetric_decoders") / "flux2_tiny")
    samples = torch.randn(1, 128, SIZE[0] // 16, SIZE[1] // 16, generator=torch.Generator().manual_seed(4))
    save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])},
              str(tier.server.input_dir / "flux2.latent"))
    workflow = encode_decode("flux2", "asymmetric_decoders/flux2_tiny/decoder.safetensors")
    for node in ("vae", "encode", "latent", "plain", "save_plain"):
        del workflow[node]
    workflow["load"] = {"class_type": "LoadLatent", "inputs": {"latent": "flux2.latent"}}
    workflow["decode"]["inputs"]["samples"] = ["load", 0]
    entry = tier.run(workflow)
    photo = np.asarray(Image.open(tier.server.input_dir / "photo.png")).astype(int)
    z = vae.latent_norm.from_diffusion(samples)  # (1, 32, H/8, W/8)
    expected, _ = python_decode(tier.server.models("asymmetric_decoders") / "flux2_tiny" / "decoder.safetensors",
                                z, photo)
    assert np.abs(tier.image(entry, "save") - expected).max() <= 1


def test_bad_input_comes_back_in_the_history_naming_it_and_the_server_goes_on(tier):
    (tier.server.models("asymmetric_decoders") / "not_a_decoder.safetensors").write_bytes(b"not a checkpoint")
    Image.open(tier.server.input_dir / "photo.png").crop((0, 0, 32, 32)).save(tier.server.input_dir / "small.png")
    other_base = encode_decode("sd1", "asymmetric_decoders/flux.ckpt")  # a 4-channel latent, a FLUX.1 decoder
    small_mask = encode_decode("sd1", "asymmetric_decoders/sd1.ckpt")
    small_mask["small"] = {"class_type": "LoadImage", "inputs": {"image": "small.png"}}
    small_mask["decode"]["inputs"]["mask"] = ["small", 1]
    no_decoder = encode_decode("sd1", "asymmetric_decoders/not_a_decoder.safetensors")
    for workflow, node, message in [
            (other_base, "AsymmetricDecode", "the LATENT has 4 channels, but asymmetric_decoders/flux.ckpt (base flux) "
                                             "takes 16"),
            (small_mask, "AsymmetricDecode", "the MASK is 32x32 pixels but the IMAGE is 70x64"),
            (no_decoder, "LoadAsymmetricDecoder", "asymmetric_decoders/not_a_decoder.safetensors is no decoder")]:
        entry = tier.server.run(workflow)
        assert entry["status"]["status_str"] == "error"
        errors = cs.errors_of(entry)
        assert len(errors) == 1 and errors[0][0] == node and message in errors[0][1], errors
    entry = tier.run(encode_decode("sd1", "asymmetric_decoders/sd1.ckpt", paste=True))  # the next prompt runs
    photo = np.asarray(Image.open(tier.server.input_dir / "photo.png")).astype(int)
    known = photo[..., 3] == 255
    assert np.abs(tier.image(entry, "save") - photo[..., :3])[known].max() <= 1  # pasted back


WORKFLOWS = sorted((ROOT / "comfyui" / "workflows").glob("*.json"))


def test_the_example_workflows_name_nodes_and_inputs_the_server_defines(tier):
    """API format: every node's class exists, every input is one it declares, every link reaches an output of the
    type the input takes. UI format: every node's type exists and its links join declared slots."""
    info = tier.server.get("/object_info")
    api = [p for p in WORKFLOWS if p.name.endswith("_api.json")]
    assert len(api) >= 3 and len(WORKFLOWS) == 2 * len(api), [p.name for p in WORKFLOWS]
    for path in api:
        graph = json.loads(path.read_text())
        for node_id, node in graph.items():
            spec = info.get(node["class_type"])
            assert spec, f"{path.name}: node {node_id}: no node class {node['class_type']}"
            declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
            for name, value in node["inputs"].items():
                assert name in declared, f"{path.name}: node {node_id} ({node['class_type']}) has no input {name}"
                if isinstance(value, list):
                    source = graph[value[0]]
                    out_type = info[source["class_type"]]["output"][value[1]]
                    want = declared[name][0]
                    assert out_type == want or want == "*", f"{path.name}: {node_id}.{name} takes {want}, gets {out_type}"
    for path in WORKFLOWS:
        if path.name.endswith("_api.json"):
            continue
        ui = json.loads(path.read_text())
        types = {n["id"]: n["type"] for n in ui["nodes"]}
        for node in ui["nodes"]:
            assert node["type"] in info or node["type"] in ("Note", "MarkdownNote"), f"{path.name}: {node['type']}"
        for link in ui["links"]:  # [id, from node, from slot, to node, to slot, type]
            _, src, slot, dst, _, kind = link
            assert info[types[src]]["output"][slot] == kind, f"{path.name}: link {link}"


def readme_install_line() -> str:
    """The one command of the README's ComfyUI section (its first bash block, comments aside)."""
    section = (ROOT / "README.md").read_text().split("\n## ComfyUI", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def fresh_venv(folder: Path) -> Path:
    """A new venv that sees this Python's packages (torch and the rest, as a ComfyUI venv has them) through a
    .pth file, but holds no install of this project: what the README's line installs into. -> its python."""
    import site
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=300)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "comfyui_venv_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_the_readme_install_line_and_comfyuis_quick_test_load_the_pack(tmp_path):
    """The README's line, as typed, in a copy of this repository with a fresh venv's python first on PATH and
    COMFYUI a copy of the ComfyUI tree; then `python main.py --cpu --quick-test-for-ci` there loads the pack."""
    reason = cs.cannot_start()
    if reason:
        cs.skip_or_fail(reason)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    repo, comfy = tmp_path / "asymmetric-decoder", tmp_path / "ComfyUI"
    repo.mkdir()
    for item in ("pyproject.toml", "README.md", "ldm", "data", "comfyui"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, repo / item, **(
            {"ignore": ignore} if (ROOT / item).is_dir() else {}))
    shutil.copytree(cs.comfyui_root(), comfy, ignore=ignore)
    (comfy / "custom_nodes").mkdir(exist_ok=True)
    python = fresh_venv(tmp_path / "venv")
    env = {**cs.os.environ, "PATH": f"{python.parent}:{cs.os.environ['PATH']}", "COMFYUI": str(comfy),
           "VIRTUAL_ENV": str(python.parent.parent), "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    proc = subprocess.run(["bash", "-c", readme_install_line()], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    where = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.distribution("
                            "'asymmetric-decoder').locate_file(''))"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)  # not a checkout's folder: its egg-info (pip install -e) would answer
    assert where.stdout.strip().startswith(str(tmp_path / "venv")), where.stdout + where.stderr  # installed there
    proc = subprocess.run([python, "main.py", "--cpu", "--quick-test-for-ci"], cwd=comfy, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    loaded = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/asymmetric_decoder")]
    assert loaded and "IMPORT FAILED" not in loaded[0], log[-4000:]
    assert "asymmetric_decoder module for custom nodes" not in log, log[-4000:]
