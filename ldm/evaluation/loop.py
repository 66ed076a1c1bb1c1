"""Evaluation of decoders side by side: batched decoding, region metrics (raw and pasted back), FID, reports.

Plain functions and small classes of tensors; ldm/evaluation/run.py builds an evaluation of them from eval.py's arguments.
Conventions as ldm/metrics.py: images (B,3,H,W) in [-1,1], masks (B,1,H,W) with 1 = hole.
"""
import csv
import importlib.util
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..files import atomic_write_text
from ..metrics import (bucket_labels, concat_dicts, feather_back, grid_panels, nanmean_by_bucket, nanmean_dict,
                      panel_grid, paste_back, region_metrics, save_grid)

# the decoder output itself; it pasted into the original through the mask; through a feathered (blurred) mask,
# the baseline inpainting tools apply to any decoder
OUTPUTS = ("raw", "pasted", "feathered")
ALL = "all"  # the bucket name of the overall means
BUCKETS = bucket_labels()  # the mask-area buckets, in order: '0-10%', ..., '60-100%'
HEADINGS = {"generated": "Generated table: every decoder decodes the latents the inpainting pipeline generated",
            "reconstruction": "Reconstruction table: every decoder decodes the encoder's latents of the whole image"}
# (key, column title, format); the order of the markdown columns
COLUMNS = [("fid", "FID", "{:.2f}"), ("lpips_whole", "LPIPS", "{:.4f}"), ("lpips_known", "LPIPS known", "{:.4f}"),
           ("lpips_hole", "LPIPS hole", "{:.4f}"), ("psnr_whole", "PSNR", "{:.2f}"),
           ("psnr_known", "PSNR known", "{:.2f}"), ("psnr_hole", "PSNR hole", "{:.2f}"),
           ("ssim_whole", "SSIM", "{:.4f}"), ("ssim_known", "SSIM known", "{:.4f}"),
           ("ssim_hole", "SSIM hole", "{:.4f}"), ("pre_error", "pre_error", "{:.2e}"),
           ("de2000_known", "dE00 known", "{:.3f}"), ("seam", "seam", "{:.4f}"),
           ("mask_area", "hole %", "{:.1%}"), ("n", "n", "{:.0f}")]
# torch-fidelity's Inception weights (its URL_INCEPTION_V3); torch.hub keeps downloads under <hub>/checkpoints
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ---- FID ----------------------------------------------------------------------------------------------
def inception_weights(path=None) -> tuple[Optional[Path], Optional[str]]:
    """(weights file, None) when FID can run without any download, else (None, the note saying why not)."""
    problems, name = [], INCEPTION_FILE
    if importlib.util.find_spec("torch_fidelity") is None:  # find_spec imports nothing
        problems.append("torch-fidelity is not installed (torchmetrics' FrechetInceptionDistance raises "
                        "ModuleNotFoundError without it; pip install torch-fidelity)")
    else:  # the file name its installed version would download (importing it downloads nothing)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
            name = URL_INCEPTION_V3.rsplit("/", 1)[-1]
        except ImportError:
            pass
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / name  # where torch.hub.load_state_dict_from_url looks
    path = Path(path)
    if not path.is_file():
        problems.append(f"{path.name} not found in {path.parent} (copy it there or pass --inception-weights)")
    return (None, "FID skipped: " + "; ".join(problems)) if problems else (path, None)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] float -> uint8 [0,255], as an image file would hold it."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FidTracker:
    """One FID per (decoder, output) key against the same real images; one feature network, real pass once."""

    def __init__(self, keys, feature: torch.nn.Module):
        from torchmetrics.image.fid import FrechetInceptionDistance
        # `feature` is the Inception network (or a small stand-in in tests); uint8 images go in unchanged
        self.real = FrechetInceptionDistance(feature=feature)
        self.fake = {k: FrechetInceptionDistance(feature=feature) for k in keys}

    @classmethod
    def inception(cls, keys, weights: Path, device="cpu") -> "FidTracker":
        """The standard 2048-d pool features of torch-fidelity's Inception, read from `weights` (no download)."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        net = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights)).inception
        return cls(keys, net).to(device)

    def to(self, device) -> "FidTracker":
        for metric in (self.real, *self.fake.values()):
            metric.to(device)
        return self

    def update_real(self, image: torch.Tensor) -> None:
        self.real.update(to_uint8(image), real=True)

    def update(self, key, image: torch.Tensor) -> None:
        self.fake[key].update(to_uint8(image), real=False)

    def compute(self) -> dict:
        """{key: FID}; NaN where fewer than 2 images were seen."""
        out = {}
        for key, metric in self.fake.items():
            for name in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
                setattr(metric, name, getattr(self.real, name))  # the real statistics, computed once
            enough = min(int(metric.real_features_num_samples), int(metric.fake_features_num_samples)) >= 2
            out[key] = float(metric.compute()) if enough else math.nan
        return out


# ---- decoding and the evaluation loop -----------------------------------------------------------------
@dataclass
class Decoder:
    """A model to evaluate: `branch` False decodes without the masked image (the vanilla SD decoder)."""

    name: str
    model: torch.nn.Module  # an AsymmetricAutoencoderKL in eval mode
    branch: bool = True
    info: dict = field(default_factory=dict)  # what the reports say about it (spec, format, config)


def latent(vae, image: torch.Tensor) -> torch.Tensor:
    """Posterior mean (B,4,H/8,W/8): deterministic, as evaluation must be."""
    return vae.encode(image).mode()


def decode(dec: Decoder, z, image, mask, tile=None) -> torch.Tensor:
    """(B,3,H,W) output clamped to [-1,1] (what an image file would hold); `tile`: tiled decode (latent px)."""
    kw = {"tile": tile} if tile else {}
    out = dec.model.decode(z, image, mask, **kw) if dec.branch else dec.model.decode(z, **kw)
    return out.float().clamp(-1, 1)


class Records:
    """Per-sample metrics of every (decoder, output), kept with the samples' source indices."""

    def __init__(self):
        self.batches = {}  # (decoder, output) -> list of {metric: (B,)}
        self.indices = {}  # (decoder, output) -> list of (B,) source indices (apart: concat_dicts makes float32)

    def add(self, key, metrics: dict, index: torch.Tensor) -> None:
        self.batches.setdefault(key, []).append({k: v.cpu() for k, v in metrics.items()})
        self.indices.setdefault(key, []).append(index.cpu())

    def summary(self) -> dict:
        """{decoder: {output: {bucket: {metric: value}}}}; bucket "all" and each non-empty area bucket, with n."""
        out = {}
        for (name, output), batches in self.batches.items():
            order = torch.argsort(torch.cat(self.indices[name, output]))  # source order, whatever the loader's
            merged = {k: v[order] for k, v in concat_dicts(batches).items()}
            table = {ALL: {**nanmean_dict([merged]), "n": float(len(order))}, **nanmean_by_bucket([merged])}
            out.setdefault(name, {})[output] = table
        return out


@torch.no_grad()
def evaluate(decoders, batches, perceptual=None, encoder=None, fid: Optional[FidTracker] = None,
             grid_images: int = 4, tile: Optional[int] = None):
    """Run every decoder on every batch ({"image", "mask", "index"}); returns (summary, grid uint8 (3,H',W')).

    The latent every decoder decodes: the batch's "latent" (B,C,h,w) where it has one (an inpainting pipeline's,
    ldm/evaluation/generated.py), else the posterior mean of `encoder` (a shared VAE: the frozen SD encoder), else of each
    decoder's own encoder. The grid holds the samples of lowest index of the first one's shape.
    """
    records, shown = Records(), []
    device = next(decoders[0].model.parameters()).device
    for batch in batches:
        image, mask, index = batch["image"].to(device), batch["mask"].to(device), batch["index"]
        z = batch["latent"].to(device) if "latent" in batch else latent(encoder, image) if encoder is not None else None
        recons = [decode(dec, z if z is not None else latent(dec.model, image), image, mask, tile)
                  for dec in decoders]
        scored = {}  # (decoder, output) -> (B,3,H,W)
        for dec, recon in zip(decoders, recons):
            scored[dec.name, "raw"], scored[dec.name, "pasted"] = recon, paste_back(recon, image, mask)
            scored[dec.name, "feathered"] = feather_back(recon, image, mask)
        _score(records, scored, image, mask, index, perceptual)
        if fid is not None:
            fid.update_real(image)
            for key, x in scored.items():
                fid.update(key, x)
        shown = _keep_first(shown, image, mask, recons, index, grid_images)
    summary = records.summary()
    fids = fid.compute() if fid is not None else {}
    for name, outputs in summary.items():
        for output, table in outputs.items():
            table[ALL]["fid"] = fids.get((name, output), math.nan)  # NaN: skipped (the reports say why)
    return summary, grid(shown, len(decoders))


def _score(records, scored, image, mask, index, perceptual):
    """region_metrics of every output in one call: one LPIPS pass per region for all decoders together."""
    k, b = len(scored), image.shape[0]
    metrics = region_metrics(torch.cat(list(scored.values())), image.repeat(k, 1, 1, 1),
                             mask.repeat(k, 1, 1, 1), perceptual)  # each (k*B,), output-major
    for i, key in enumerate(scored):
        records.add(key, {name: value[i * b:(i + 1) * b] for name, value in metrics.items()}, index)


def _keep_first(shown, image, mask, outputs, index, n):
    """The n samples of lowest source index seen so far, of the lowest one's shape (several shapes: one grid):
    [(index, image, mask, [output per decoder])]."""
    for b in range(image.shape[0]):
        shown.append((int(index[b]), image[b].cpu(), mask[b].cpu(), [o[b].cpu() for o in outputs]))
    shown.sort(key=lambda s: s[0])
    return [s for s in shown if s[1].shape == shown[0][1].shape][:n]


def grid(shown, n_decoders, error_gain=4.0) -> Optional[torch.Tensor]:
    """uint8 (3,H',W'): a row per sample: image, masked image (holes grey), then per decoder its raw output
    and |output - image| * error_gain (known-region drift shows there)."""
    if not shown:
        return None
    image, mask = (torch.stack([s[i] for s in shown]) for i in (1, 2))  # (n,3,H,W), (n,1,H,W)
    outputs = [torch.stack([s[3][d] for s in shown]) for d in range(n_decoders)]  # per decoder (n,3,H,W)
    return panel_grid(grid_panels(image, mask, outputs, error_gain))


# ---- reports ------------------------------------------------------------------------------------------
def fmt(value, pattern="{:.4f}") -> str:
    """A table cell: n/a for a metric that is undefined (NaN) or absent."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return pattern.format(value)


def _rows(summary, bucket, columns):
    lines = ["| decoder | output | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for name, outputs in summary.items():
        for output in OUTPUTS:
            values = outputs[output].get(bucket, {})
            cells = [fmt(values.get(key), pattern) for key, _, pattern in columns]
            lines.append(f"| {name} | {output} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary, notes=(), title="Decoder evaluation", generated=None) -> str:
    """Per table (the generated latents' when given, then the reconstruction's): the overall table (one row per
    decoder x output), then one per mask-area bucket."""
    lines = [f"# {title}", "", *[f"- {note}" for note in notes]]
    for name, table in ([("generated", generated)] if generated is not None else []) + [("reconstruction", summary)]:
        lines += ["", f"## {HEADINGS[name]}", "", "### Overall", ""] + _rows(table, ALL, COLUMNS)
        per_bucket = [c for c in COLUMNS if c[0] != "fid"]  # FID needs many images: overall only
        for bucket in BUCKETS:
            lines += ["", f"### Hole area {bucket}", ""]
            if not any(bucket in outputs[o] for outputs in table.values() for o in OUTPUTS):
                lines.append("_no images in this bucket_")
                continue
            lines += _rows(table, bucket, per_bucket)
    return "\n".join(lines) + "\n"


def long_rows(summary):
    """(decoder, output, bucket, metric, value) rows; NaN as None."""
    for name, outputs in summary.items():
        for output, buckets in outputs.items():
            for bucket, values in buckets.items():
                for metric, value in values.items():
                    yield name, output, bucket, metric, (value if math.isfinite(value) else None)


def nested(summary) -> dict:
    """{decoder: {output: {bucket: {metric: value}}}} with NaN as None (results.json's)."""
    out = {}
    for name, output, bucket, metric, value in long_rows(summary):
        out.setdefault(name, {}).setdefault(output, {}).setdefault(bucket, {})[metric] = value
    return out


def write_reports(out_dir, summary, notes, meta, grid_image=None, generated=None) -> list:
    """results.md, results.csv (long, a row per table, decoder, output, bucket and metric), results.json (meta, the
    reconstruction table's "metrics" and the generated table's "generated", NaN as null), grid.png (and
    grid_generated.png), each written atomically; `generated`: (summary, grid) of the generated latents. Returns
    the paths."""
    out_dir = Path(out_dir)
    tables = ([("generated", generated[0])] if generated else []) + [("reconstruction", summary)]
    paths = [out_dir / "results.md", out_dir / "results.csv", out_dir / "results.json"]
    atomic_write_text(paths[0], markdown(summary, notes, generated=generated[0] if generated else None))
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["table", "decoder", "output", "bucket", "metric", "value"])
    for name, table in tables:
        writer.writerows((name, *row[:4], "" if row[4] is None else repr(row[4])) for row in long_rows(table))
    atomic_write_text(paths[1], text.getvalue())
    results = {**meta, "notes": list(notes), "metrics": nested(summary)}
    if generated:
        results["generated"] = nested(generated[0])
    atomic_write_text(paths[2], json.dumps(results, indent=2) + "\n")
    for name, image in (("grid.png", grid_image), ("grid_generated.png", generated and generated[1])):
        if image is not None:
            paths.append(out_dir / name)
            save_grid(image, paths[-1])
    return paths
