"""scripts/eval.py, ldm/evaluation/loop.py on tiny random models (scripts/ablate.py: test_ablate.py; scripts/inpaint.py:
test_inpaint_bases.py)."""
import csv
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from data import load_mask_files, make_eval_masks
from ldm import AsymmetricAutoencoderKL
from ldm.evaluation.loop import BUCKETS, COLUMNS, INCEPTION_FILE, OUTPUTS, Decoder, FidTracker, evaluate, inception_weights, \
    markdown, write_reports
from probe_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)
METRICS = [key for key, _, _ in COLUMNS if key not in ("fid", "n")]  # per-sample region metrics


eval_script, export = load_script("eval"), load_script("export")


def tiny(seed, **kw):
    torch.manual_seed(seed)
    return AsymmetricAutoencoderKL(**{**TINY, **kw}).eval()


def save_run(model, path):
    """A run checkpoint as train.py writes it: vae.* keys and the config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in model.state_dict().items()},
                "config": {"model": {"autoencoder": model.config}}}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A run checkpoint, a diffusers export of another model, and an SD-layout ldm VAE (no branch)."""
    root = tmp_path_factory.mktemp("models")
    a = tiny(0)
    run = save_run(a, root / "runA" / "checkpoints" / "last.ckpt")
    export.save_diffusers(tiny(1), root / "exportB")
    core = {k: v for k, v in a.state_dict().items() if not k.startswith("decoder.encoder.")}
    torch.save({"state_dict": core}, root / "sd_vae.ckpt")
    export.save_decoder(tiny(2), root / "decoderC")  # decoder.* and post_quant_conv.* only: no encoder
    return SimpleNamespace(run=run, export=root / "exportB", sd=root / "sd_vae.ckpt", decoder=root / "decoderC",
                           root=root)


def cli_args(models, out, *extra):
    return ["--decoder", str(models.run), "--decoder", str(models.export), "--decoder", str(models.decoder),
            "--decoder", "vanilla",
            "--vae", str(models.sd), "--data", "sample", "--masks", "medium", "--resolution", "16",
            "--num-images", "2", "--batch-size", "2", "--workers", "0", "--no-lpips-pretrained",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def first_run(models):
    out = models.root / "eval1"
    assert eval_script.main(cli_args(models, out, "--save-masks", str(models.root / "masks"))) == 0
    return out


def test_eval_writes_every_metric_decoder_and_bucket(first_run):
    md = (first_run / "results.md").read_text()
    names = ["runA", "exportB", "decoderC", "vanilla"]
    for name in names:
        for output in OUTPUTS:
            assert f"| {name} | {output} |" in md
    for _, title, _ in COLUMNS:
        assert f" {title} |" in md
    for bucket in BUCKETS:
        assert f"## Hole area {bucket}" in md
    assert "FID skipped:" in md and INCEPTION_FILE in md and "| n/a |" in md  # FID column, not a crash
    assert "nan" not in md.lower().replace("nanmean", "")
    result = json.loads((first_run / "results.json").read_text())
    assert set(result["metrics"]) == set(names)
    for name in names:
        for output in OUTPUTS:
            overall = result["metrics"][name][output]["all"]
            assert all(math.isfinite(overall[m]) for m in METRICS), overall
            assert overall["fid"] is None and overall["n"] == 2
    assert result["seed"] == 0 and result["versions"]["torch"] == torch.__version__
    assert result["masks"]["preset"] == "medium" and result["decoders"]["vanilla"]["branch"] is False
    # the vanilla row is the SD decoder without the branch: the same core as runA, another output
    raw = {n: result["metrics"][n]["raw"]["all"]["psnr_known"] for n in names}
    assert len(set(raw.values())) == 4
    rows = list(csv.DictReader(open(first_run / "results.csv")))
    assert {r["decoder"] for r in rows} == set(names) and {r["output"] for r in rows} == set(OUTPUTS)
    assert {"all", "psnr_known", "lpips_hole", "pre_error"} <= {r["bucket"] for r in rows} | {r["metric"] for r in rows}
    with Image.open(first_run / "grid.png") as grid:  # 2 rows; image, masked, then 2 tiles per decoder
        assert grid.size == (2 + 10 * 18, 2 + 2 * 18)


def test_same_seed_same_numbers_and_saved_masks_are_the_generated_ones(models, first_run):
    again = models.root / "eval2"
    assert eval_script.main(cli_args(models, again)) == 0
    first = json.loads((first_run / "results.json").read_text())["metrics"]
    assert json.loads((again / "results.json").read_text())["metrics"] == first
    saved = load_mask_files(models.root / "masks")[:, 0].numpy().astype("uint8")
    assert (saved == make_eval_masks(2, 16, seed=0, mix={"medium": 1.0}, max_area=0.5)).all()


def test_eval_at_several_shapes_crops_each_image_and_its_mask_to_its_bucket(models, tmp_path):
    """--aspect-ratios 0.5,2 at 32 px: image 0 is 48x24 (its grid row), image 1 24x48, each mask drawn at its shape."""
    args = ["--decoder", str(models.run), "--decoder", "vanilla", "--vae", str(models.sd), "--data", "sample",
            "--masks", "medium", "--resolution", "32", "--aspect-ratios", "0.5,2", "--num-images", "2",
            "--batch-size", "2", "--workers", "0", "--no-lpips-pretrained", "--grid-images", "2",
            "--save-masks", str(tmp_path / "masks"), "--out", str(tmp_path / "out")]
    assert eval_script.main(args) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["images"]["shapes"] == [[48, 24], [24, 48]] and result["metrics"]["runA"]["raw"]["all"]["n"] == 2
    sizes = [Image.open(p).size for p in sorted((tmp_path / "masks").glob("*.png"))]
    assert sizes == [(24, 48), (48, 24)]  # (W, H)
    with Image.open(tmp_path / "out" / "grid.png") as grid:  # one row: image 0's shape; 6 tiles of 24 x 48
        assert grid.size == (2 + 6 * 26, 2 + 50)


def test_bad_decoder_arguments_exit_2_with_a_message(models, tmp_path, capsys):
    args = cli_args(models, tmp_path / "x")
    del args[args.index("--vae"):args.index("--vae") + 2]
    assert eval_script.main(args) == 2
    assert f"--decoder {models.decoder}: a decoder export has no encoder; pass --vae" in capsys.readouterr().err
    del args[args.index(str(models.decoder)) - 1:args.index(str(models.decoder)) + 1]
    assert eval_script.main(args) == 2
    assert "--decoder vanilla needs --vae" in capsys.readouterr().err
    assert eval_script.main(cli_args(models, tmp_path / "y", "--name", "only-one")) == 2
    assert "1 --name for 4 --decoder" in capsys.readouterr().err



@pytest.mark.parametrize("flag, value", [("--num-images", "0"), ("--num-images", "-1"), ("--batch-size", "0"),
                                         ("--grid-images", "0"), ("--workers", "-1"), ("--batch-size", "two")])
def test_bad_numbers_are_usage_errors_naming_the_flag(tmp_path, capsys, flag, value):
    argv = ["--decoder", str(tmp_path / "none.ckpt"), "--data", "sample", "--masks", "medium",
            "--out", str(tmp_path / "out"), flag, value]
    with pytest.raises(SystemExit) as stop:
        eval_script.main(argv)
    assert stop.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def test_a_bad_device_exits_2_naming_the_flag(models, tmp_path, capsys):
    for device in ("gpu", f"cuda:{torch.cuda.device_count()}"):
        assert eval_script.main(cli_args(models, tmp_path / "x", "--device", device)) == 2
        assert f"eval: --device {device}: " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["eval", "inpaint", "ablate"])
def test_usage_lines_stay_apart_in_help(name):
    """A usage line continued with a backslash keeps it: a single one in the docstring would join the lines."""
    usage = [line for line in load_script(name).__doc__.splitlines() if line.startswith("    python scripts/")]
    assert usage and usage[0].endswith(" \\"), usage


# ---- identical images, undefined regions, FID ------------------------------------------------------------
class Identity(torch.nn.Module):
    """A "decoder" whose output is the input image exactly (latent = image)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device off a parameter

    def encode(self, x):
        return SimpleNamespace(mode=lambda: x)

    def decode(self, z, image=None, mask=None):
        return z


class Darken(Identity):
    def decode(self, z, image=None, mask=None):
        return z * 0.5


class MeanStd(torch.nn.Module):
    """A 4-d stand-in for Inception features: per-channel mean and the overall std of a uint8 image."""

    num_features = 4

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.flatten(1).std(1, keepdim=True)], 1)


def batches(n=6, all_ones=False):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.ones(n, 1, 16, 16)
    if not all_ones:
        mask[::2, :, :, :8] = 0  # half of the images: left half known; the others pure reconstruction
    return [{"image": image[i:i + 2], "mask": mask[i:i + 2], "index": torch.arange(i, i + 2)} for i in range(0, n, 2)]


def l1_distance(x, y):
    return (x - y).abs().mean((1, 2, 3))


def test_identical_images_give_finite_averages_and_na_for_undefined_regions(tmp_path):
    decoders = [Decoder("identity", Identity()), Decoder("dark", Darken())]
    summary, grid = evaluate(decoders, batches(), l1_distance)
    overall = summary["identity"]["raw"]["all"]
    assert overall["psnr_whole"] == overall["psnr_known"] == overall["psnr_hole"] == 100.0  # the cap, not inf
    assert overall["pre_error"] == 0 and overall["lpips_whole"] == 0 and overall["ssim_whole"] == pytest.approx(1)
    assert summary["dark"]["raw"]["all"]["psnr_whole"] < 20
    assert set(summary["identity"]["raw"]) == {"all", "50-60%", "60-100%"}  # area 0.5 and 1.0
    assert summary["identity"]["raw"]["60-100%"]["n"] == 3
    assert math.isnan(summary["identity"]["raw"]["60-100%"]["psnr_known"])  # no known pixel anywhere there
    write_reports(tmp_path, summary, ["a note"], {"seed": 0}, grid)
    md = (tmp_path / "results.md").read_text()
    assert "| identity | raw | n/a | 0.0000 | 0.0000 | 0.0000 | 100.00 | 100.00 | 100.00 |" in md
    assert "| n/a |" in md.split("## Hole area 60-100%")[1] and "nan" not in md
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN written as null
    assert data["metrics"]["identity"]["raw"]["60-100%"]["psnr_known"] is None


def test_fid_with_a_feature_network_is_zero_for_identical_images():
    decoders = [Decoder("identity", Identity()), Decoder("dark", Darken())]
    fid = FidTracker([(d.name, o) for d in decoders for o in OUTPUTS], MeanStd())
    summary, _ = evaluate(decoders, batches(), None, fid=fid)
    assert abs(summary["identity"]["raw"]["all"]["fid"]) < 1e-3
    assert summary["dark"]["raw"]["all"]["fid"] > 0.01
    assert 0 < summary["dark"]["pasted"]["all"]["fid"] < summary["dark"]["raw"]["all"]["fid"]
    assert "fid" not in summary["dark"]["raw"]["60-100%"]  # overall only
    assert "| dark | raw | " in markdown(summary)


def test_missing_inception_weights_give_a_note_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path, note = inception_weights()
    installed = importlib.util.find_spec("torch_fidelity") is not None
    assert path is None and note.startswith("FID skipped:")
    assert f"{INCEPTION_FILE} not found in {tmp_path / 'checkpoints'}" in note
    assert ("torch-fidelity is not installed" in note) != installed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace() if name == "torch_fidelity" else real_find_spec(name, *a))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / INCEPTION_FILE).write_bytes(b"")
    assert inception_weights() == (tmp_path / "checkpoints" / INCEPTION_FILE, None)


def test_fid_reads_inception_weights_in_torch_fidelitys_format(tmp_path, monkeypatch):
    """The real loading path (inception_weights -> FidTracker.inception) on random weights saved in the file
    format torch-fidelity downloads: the weights arrive unchanged and FID runs (the FID maths: test above)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as m:  # build the network without its download, then save its random weights
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    (tmp_path / "checkpoints").mkdir()
    torch.save(net.state_dict(), tmp_path / "checkpoints" / INCEPTION_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path, note = inception_weights()
    assert note is None and path.name == INCEPTION_FILE
    fid = FidTracker.inception([("same", "raw"), ("dark", "raw")], path)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid.update_real(images)
    fid.update(("same", "raw"), images)
    fid.update(("dark", "raw"), images * 0.5 - 0.5)
    loaded = fid.real.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    scores = fid.compute()  # random Inception weights: tiny features, so only the order is meaningful
    assert math.isfinite(scores[("dark", "raw")]) and scores[("dark", "raw")] > abs(scores[("same", "raw")]), scores


def test_the_untrained_lpips_is_one_network_whatever_ran_before():
    """--no-lpips-pretrained's random VGG must not depend on the random draws before it (a pipeline's generation
    runs before the generated table is scored): one decoder, one image, one LPIPS, with or without --pipeline."""
    from ldm.evaluation.run import lpips_network
    build = lpips_network.__wrapped__  # the cache would hand back the first network
    first = build(False, "cpu").state_dict()
    torch.rand(1000)
    second = build(False, "cpu").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to its last byte, or a skip saying why it could not be mounted (root only)."""
    import os
    import shutil
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is a small tmpfs, and mounting one needs root (and mount)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"mount -t tmpfs was refused: {done.stderr.strip()}")
    try:
        with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 512)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_eval_on_a_full_disk_says_so_in_the_line_train_py_says_it(models, full_disk, capsys):
    out = full_disk / "eval"
    argv = ["--decoder", str(models.export), "--data", "sample", "--masks", "medium", "--resolution", "16",
            "--num-images", "2", "--batch-size", "2", "--workers", "0", "--no-lpips-pretrained", "--out", str(out)]
    assert eval_script.main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: No space left on device: could not write {out / 'results.md'}; make room, then run it again"], err
    assert "Traceback" not in err and not any(p.name.endswith(".tmp") for p in out.iterdir())
