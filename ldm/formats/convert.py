"""Checkpoints in: format detection and loading (key tables: each family's keys.py; writers: export.py beside this).

Formats (`Source.format`): sd (full SD, `first_stage_model.*`), ldm (standalone VAE), diffusers (AutoencoderKL,
AutoencoderKLFlux2, AsymmetricAutoencoderKL or AutoencoderKLQwenImage folder, pipeline folder with vae/, or weights
file), wan (the Wan / Qwen-Image VAE single file), official (asymmetric-VQGAN Lightning checkpoint), run (this
codebase's `vae.*` checkpoints), decoder (this codebase's decoder export). A state dict's keys tell its family
(ldm/modules/families.py own_keys). FLUX.2's batch-norm statistics (bn.*) become the Source's
latent_norm, with its config.json's eps. Plain VAE weights initialise the frozen encoder, the quant convs and, where
the layout is the VAE's own, the decoder core.
"""
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from ..modules.common import AsymmetricAutoencoder, CheckpointError
from ..modules.families import (BATCH_NORM, DIFFUSERS_CLASSES, build_autoencoder, infer_config,
                                latent_norm_from_batch_norm, own_keys, upgrade)

log = logging.getLogger(__name__)
DECODER_FORMAT = "asymmetric-vqgan-decoder"  # marks a decoder export (config.json and safetensors metadata)
PARTS = ("encoder", "quant_conv", "post_quant_conv", "decoder")
SKIPPED = ("loss.",)  # official LPIPS/discriminator weights: not part of the autoencoder
EXPECTED = ("expected a .ckpt/.safetensors with ldm autoencoder keys (SD, ldm VAE, official asymmetric or "
            "run checkpoint) or a Wan / Qwen-Image VAE, a diffusers AutoencoderKL/AutoencoderKLFlux2/"
            "AsymmetricAutoencoderKL/AutoencoderKLQwenImage folder (or pipeline folder with vae/), or a decoder export")

# ---- reading: file or folder -> Source (ldm keys, autoencoder only) -------------------------------------
@dataclass
class Source:
    """Autoencoder weights read from one checkpoint, in ldm keys, with the kwargs that fit them."""

    path: Path
    format: str  # sd | ldm | diffusers | wan | official | run | decoder
    state: dict
    config: dict
    dropped: list = field(default_factory=list)  # removed by name (decoder.up_layers.*)
    skipped: list = field(default_factory=list)  # not autoencoder weights (loss.*, UNet, discriminator)
    ema_state: Optional[dict] = None  # `ema_state_dict`: EMA decoder weights to overlay
    live: Optional["Source"] = None  # Lightning WeightAveraging: state_dict is the EMA, this the live weights
    ema: bool = False
    batch_norm: dict = field(default_factory=dict)  # bn.* buffers (FLUX.2): latent statistics, not model weights
    run: Optional[dict] = None  # a run checkpoint's {"config": its resolved run config, "global_step": steps done}

    @property
    def plain_vae(self) -> bool:
        """A VAE's own weights (sd, ldm, diffusers or wan, without a masked-image branch `decoder.encoder.*`)."""
        return self.format in ("sd", "ldm", "diffusers", "wan") and not any(k.startswith("decoder.encoder.")
                                                                             for k in self.state)


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_BLOCKED = re.compile(r"GLOBAL ([\w.]+) whose module \w+ is blocked")
_PICKLE_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)\n")


def _reason(err: Exception) -> str:
    """torch's load errors are paragraphs; keep the line that says what is wrong."""
    text = str(err)
    m = _PICKLE_REASON.search(text)
    return f"{type(err).__name__}: {(m.group(1) if m else text.split('. ')[0]).strip()[:160]}"


def _stub(name: str) -> type:
    """An inert class standing for a pickled global we do not need (e.g. a Lightning callback's class)."""
    return type(name.rsplit(".", 1)[-1], (), {"__init__": lambda self, *a, **k: None,
                                               "__setstate__": lambda self, state: None})


def _torch_load(path: Path):
    """torch.load(weights_only=True); foreign classes in the pickle (callbacks, loggers) load as inert stubs."""
    stubs = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            m = _UNSUPPORTED.search(str(err))
            blocked = _BLOCKED.search(str(err))  # os, subprocess, builtins ...: never stubbed
            if blocked is not None:
                raise CheckpointError(f"{path}: not loaded: its pickle calls for {blocked.group(1)} (unpickling it "
                                      f"could run code); {EXPECTED}") from None
            if m is None:
                raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(err)}); "
                                      f"{EXPECTED}") from None
            stubs.append((_stub(m.group(1)), m.group(1)))
        except Exception as err:  # truncated zip, garbage bytes, empty file
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(err)}); {EXPECTED}") from None
    raise CheckpointError(f"{path}: too many foreign classes pickled in it; {EXPECTED}")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); {EXPECTED}") from None


QUANT_CONVS = ("quant_conv", "post_quant_conv")


def _is_identity(weight, bias) -> bool:
    """Whether a 1x1 conv is exactly the identity: how a diffusers export holds "no quant convs" (SD3, FLUX.1)."""
    if weight is None or bias is None or weight.ndim != 4 or weight.shape[0] != weight.shape[1] \
            or weight.shape[2:] != (1, 1):
        return False
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)
    return torch.equal(weight[:, :, 0, 0], eye) and not bias.any()


def _from_state(path: Path, state: dict, top: dict) -> Source:
    """Classify a flat state dict (SD, ldm, official, run, diffusers, Wan keys) into a Source."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    fmt, sub, skipped = "ldm", tensors, []
    for prefix, name in (("first_stage_model.", "sd"), ("vae.", "run")):
        if any(k.startswith((prefix + "encoder.", prefix + "decoder.")) for k in tensors):
            fmt, sub = name, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            skipped = [k for k in tensors if not k.startswith(prefix)]  # UNet, text encoder, discriminator
            break
    sub, named, dropped = own_keys(sub, str(path))  # its family's keys: Wan, diffusers names renamed
    fmt = named if named and fmt == "ldm" or named == "wan" else fmt
    if not any(k.startswith(("encoder.", "decoder.")) for k in sub):
        found = ", ".join(list(state)[:3]) or "nothing"
        raise CheckpointError(f"{path}: no autoencoder weights in it (found {found}); {EXPECTED}")
    if fmt == "ldm" and any(k.startswith("decoder.encoder.") for k in sub):
        fmt = "official"
    more = [k for k in sub if k.startswith(SKIPPED)]
    sub = {k: v for k, v in sub.items() if k not in more}
    batch_norm = {k[len(BATCH_NORM):]: sub.pop(k) for k in [k for k in sub if k.startswith(BATCH_NORM)]}
    stray = [k for k in sub if k.split(".")[0] not in PARTS]  # e.g. model_ema.decay: listed in the report, unused
    if stray:
        log.warning("%s: skipping %d tensors that are not autoencoder weights (%s, ...)", path, len(stray), stray[0])
        sub = {k: v for k, v in sub.items() if k.split(".")[0] in PARTS}
    if all(_is_identity(sub.get(f"{name}.weight"), sub.get(f"{name}.bias")) for name in QUANT_CONVS):
        sub = {k: v for k, v in sub.items() if k.split(".")[0] not in QUANT_CONVS}  # an export's stand-ins
    config = infer_config(sub, str(path))
    declared = top.get("config")  # run checkpoints and official exports: config["model"]["autoencoder"]
    if isinstance(declared, dict) and isinstance(declared.get("model"), dict):
        config.update(upgrade(declared["model"].get("autoencoder") or {}))
    ema_state = top.get("ema_state_dict") if isinstance(top.get("ema_state_dict"), dict) else None
    run = {"config": declared, "global_step": top.get("global_step")} if fmt == "run" and isinstance(declared, dict) \
        else None
    return Source(path, fmt, sub, config, dropped, skipped + more + stray, ema_state, batch_norm=batch_norm, run=run)


def _decoder_source(path: Path, tensors: dict, declared: dict) -> Source:
    stray = next((k for k in tensors if not k.startswith(("decoder.", "post_quant_conv."))), None)
    if stray:
        raise CheckpointError(f"{path}: decoder export holding {stray}; expected decoder.* and post_quant_conv.*")
    return Source(path, "decoder", tensors, {**infer_config(tensors, str(path)), **upgrade(declared)})


def _read_file(path: Path) -> Source:
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        if meta.get("format") == DECODER_FORMAT:
            return _decoder_source(path, tensors, json.loads(meta.get("autoencoder", "{}")))
        return _from_state(path, tensors, {})
    obj = _torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict; {EXPECTED}")
    src = _from_state(path, state, obj)
    if isinstance(obj.get("current_model_state"), dict):
        src.live = _from_state(path, obj["current_model_state"], obj)
    return src


def _read_folder(path: Path) -> Source:
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path  # pipeline folder
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: folder without config.json (or vae/config.json); {EXPECTED}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({err})") from None
    if isinstance(cfg, dict) and cfg.get("format") == DECODER_FORMAT:
        weights = folder / "decoder.safetensors"
        return _decoder_source(weights, _read_safetensors(weights)[0], cfg.get("autoencoder", {}))
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if cls not in DIFFUSERS_CLASSES:
        raise CheckpointError(f"{cfg_path}: describes {cls!r}; expected a diffusers AutoencoderKL, AutoencoderKLFlux2, "
                              "AsymmetricAutoencoderKL or AutoencoderKLQwenImage (or a decoder export)")
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no {' or '.join(names)} beside config.json")
    src = _read_file(weights)
    try:
        src.config.update(DIFFUSERS_CLASSES[cls](cfg, str(cfg_path)))
    except KeyError as err:
        raise CheckpointError(f"{cfg_path}: lacks {err}") from None
    if src.batch_norm or "batch_norm_eps" in cfg:  # the latent statistics are weights: bn.running_mean, running_var
        src.config["latent_norm"] = latent_norm_from_batch_norm(cfg, src.batch_norm, str(weights))
    return src


def _with_ema(src: Source, ema: Optional[bool]) -> Source:
    """Use the run's EMA weights (ema=None: when present; True: required; False: never)."""
    if src.live is not None:  # the EMA is the checkpoint's state_dict itself
        if ema is False:
            return src.live
        src.ema = True
        return src
    if ema is False or src.ema_state is None:
        if ema is True:
            raise CheckpointError(f"{src.path}: ema=True but it holds no EMA weights (neither ema_state_dict "
                                  "nor Lightning's current_model_state)")
        return src
    for key, value in src.ema_state.items():
        key = key.removeprefix("vae.")
        if key not in src.state or src.state[key].shape != value.shape:
            raise CheckpointError(f"{src.path}: EMA weight {key} {tuple(value.shape)} matches no model weight")
        src.state[key] = value
    src.ema = True
    return src


def read_checkpoint(path, ema: Optional[bool] = None) -> Source:
    """Detect the format of a file or folder and read its autoencoder weights in its family's keys (SD: ldm's)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; {EXPECTED}")
    src = _read_folder(path) if path.is_dir() else _read_file(path)
    if src.batch_norm and not path.is_dir():  # their eps and patch size are in a config.json
        raise CheckpointError(f"{path}: batch-norm latent statistics ({BATCH_NORM}running_mean: an original FLUX.2 VAE "
                              "file?) without a config.json; diffusers 0.42 has no single-file loader for it: give "
                              "a diffusers AutoencoderKLFlux2 folder (or the FLUX.2 pipeline folder holding it)")
    return _with_ema(src, ema)


# ---- loading into a model ------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What one load did: tensors loaded, left fresh (random init), dropped by name, skipped as foreign."""

    path: str
    format: str
    loaded: list
    fresh: list
    dropped: list
    skipped: list
    ema: bool = False
    run: Optional[dict] = None  # a run checkpoint's resolved config and step (Source.run): what its model card says

    def __str__(self) -> str:
        def groups(keys):  # e.g. ['decoder.encoder.layers']
            return sorted({".".join(k.split(".")[:3]) for k in keys})
        return (f"{self.path} [{self.format}{', EMA decoder' if self.ema else ''}]: loaded {len(self.loaded)} "
                f"tensors; fresh {len(self.fresh)} {groups(self.fresh)}; dropped {len(self.dropped)} "
                f"{groups(self.dropped)}; skipped {len(self.skipped)}")


def _mismatch(target: dict, state: dict) -> Optional[str]:
    """The first key of `state` (in model order) missing from the model or of another shape, described."""
    for key in [k for k in target if k in state] + [k for k in state if k not in target]:
        if key not in target:
            return f"{key} is not in the model"
        if tuple(state[key].shape) != tuple(target[key].shape):
            return (f"{key} has shape {tuple(state[key].shape)} in the checkpoint but "
                    f"{tuple(target[key].shape)} in the model")
    return None


def _apply(model: AsymmetricAutoencoder, src: Source, parts) -> LoadReport:
    """Copy src's weights (restricted to `parts`) into model; refuse anything that does not fit exactly."""
    target = model.state_dict()
    want = {k: v for k, v in src.state.items() if k.split(".")[0] in parts}
    core = {k: v for k, v in want.items() if src.plain_vae and k.startswith("decoder.")}
    strict = {k: v for k, v in want.items() if k not in core}
    problem = _mismatch(target, strict)
    if problem:
        raise CheckpointError(f"{src.path}: does not fit the model ({model.config}): {problem}")
    if core:  # the VAE's decoder: loads only onto a decoder core of exactly its layout (x1 warm start)
        model_core = {k: v for k, v in target.items() if k.startswith("decoder.")
                      and not k.startswith("decoder.encoder.")}
        problem = _mismatch(model_core, core) or next(
            (f"{k} is not in the checkpoint" for k in model_core if k not in core), None)
        if problem:
            log.warning("%s: the VAE's decoder not loaded, widths differ (%s); the decoder starts fresh", src.path,
                        problem)
        else:
            strict.update(core)
    fresh = [k for k in target if k.split(".")[0] in parts and k not in strict]
    allowed = "decoder." if src.plain_vae else ("encoder.", "quant_conv.") if src.format == "decoder" else None
    bad = [k for k in fresh if allowed is None or not k.startswith(allowed)]
    if bad:
        raise CheckpointError(f"{src.path}: {src.format} checkpoint lacks {bad[0]} (and {len(bad) - 1} more) "
                              f"that the model ({model.config}) needs")
    model.load_state_dict({**target, **strict}, strict=True)
    return LoadReport(str(src.path), src.format, sorted(strict), fresh, src.dropped, src.skipped, src.ema, src.run)


def load_into(model: AsymmetricAutoencoder, path, parts=PARTS, ema: Optional[bool] = None) -> LoadReport:
    """Load the weights of any readable checkpoint (a path, or a Source read_checkpoint returned) into an
    already-built model, restricted to `parts`.

    Tensors must fit exactly (else CheckpointError naming the first key and both shapes). A VAE's own weights
    (SD, Qwen-Image) load the encoder and quant convs, and the decoder core only where its layout is exactly the
    VAE's. Use parts=("encoder", "quant_conv") to add the frozen VAE encoder to a decoder export.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"load_into: unknown parts {sorted(unknown)}; choose from {PARTS}")
    src = path if isinstance(path, Source) else read_checkpoint(path, ema)
    report = _apply(model, src, tuple(parts))
    log.info("%s", report)
    return report


def load_autoencoder(path, device="cpu", ema: Optional[bool] = None,
                     autoencoder_kwargs: Optional[dict] = None) -> AsymmetricAutoencoder:
    """Any readable checkpoint -> its family's autoencoder (eval, fp32, on `device`), widths read from it.

    `autoencoder_kwargs` override the widths read from the checkpoint (a checkpoint that then does not fit
    is refused). A VAE's own weights give its family's x1 layout with a fresh masked-image branch; a decoder
    export gives a RANDOM encoder (warned; add one with load_into(vae, the_vae, parts=("encoder", "quant_conv"))).
    The LoadReport is kept as `vae.load_report`.
    """
    src = read_checkpoint(path, ema)
    kwargs = {**src.config, **(autoencoder_kwargs or {})}
    try:
        model = build_autoencoder(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config {kwargs} does not build an autoencoder ({err})") from None
    report = _apply(model, src, PARTS)
    log.info("%s", report)
    if src.format == "decoder":
        warnings.warn(f"{path}: decoder export, so the ENCODER AND quant_conv ARE RANDOM: encode() is "
                      "meaningless until you load_into(vae, <its VAE>, parts=('encoder', 'quant_conv'))")
    model.load_report = report
    return model.to(device=device, dtype=torch.float32).eval()
