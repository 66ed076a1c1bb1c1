"""The Qwen-Image family's key layouts (its networks: autoencoder.py beside this file): the Wan
single-file <-> diffusers rename table, diffusers' 3D tensors <-> one frame, and the widths a state dict or a
diffusers config.json implies; and the inverse for export (AutoencoderKLQwenImage's config.json and weights).

Our parameter names are diffusers' AutoencoderKLQwenImage's; our tensors are one frame's (to_frame).
"""
import logging
import re

import torch

from ..common import CheckpointError, diffusers_version, identity_quant_convs
from ...latent_norm import LatentNorm

log = logging.getLogger(__name__)
FAMILY = "qwenimage"
X1_WIDTH = 96  # Qwen-Image's base_dim, built for the preset width ch = 128 (autoencoder.py base_dim)


def preset_width(dim: int, where: str) -> int:
    """The preset width `ch` whose family width is `dim` (base_dim 96 -> 128)."""
    if dim * 128 % X1_WIDTH:
        raise CheckpointError(f"{where}: Qwen-Image width {dim} is not a multiple of 3 (ch = base_dim x 128 / 96)")
    return dim * 128 // X1_WIDTH


# ---- key map: Wan single files <-> diffusers' names; diffusers' 3D tensors <-> one frame --------------------
# (Wan prefix, diffusers prefix); decoder.upsamples.{n} <-> decoder.up_blocks.{k}.(resnets.{j}|upsamplers.0)
WAN_PREFIXES = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."),
                ("encoder.downsamples.", "encoder.down_blocks.")] + [
    (f"{part}.{wan}", f"{part}.{dif}") for part in ("encoder", "decoder") for wan, dif in (
        ("conv1.", "conv_in."), ("middle.0.", "mid_block.resnets.0."), ("middle.1.", "mid_block.attentions.0."),
        ("middle.2.", "mid_block.resnets.1."), ("head.0.", "norm_out."), ("head.2.", "conv_out."))]
# inside a residual block (Wan: residual = [RMS norm, SiLU, conv, RMS norm, SiLU, dropout, conv], shortcut)
WAN_LEAVES = [("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
              ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")]
_WAN_UP = re.compile(r"decoder\.upsamples\.(\d+)\.(.*)")
_DIFFUSERS_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)")


def is_wan(state: dict) -> bool:
    """Wan single-file keys (diffusers detects them by decoder.middle.0.residual.0.gamma)."""
    return any(k.startswith(("encoder.middle.", "decoder.middle.")) for k in state)


def is_qwenimage(state: dict) -> bool:
    """diffusers' AutoencoderKLQwenImage names (or this module's): RMS norms hold `gamma`, GroupNorms `weight`."""
    return any(k.startswith(("encoder.", "decoder.")) and k.endswith(".gamma") for k in state)


def _leaf(rest: str, to_wan: bool) -> str:
    for wan, dif in WAN_LEAVES:
        src, dst = (dif, wan) if to_wan else (wan, dif)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def _rename(key: str, to_wan: bool, per_level: int) -> str:
    """One key through the table; the decoder's flat Wan index n = k (per_level + 1) + j, j = per_level the
    level's upsampler."""
    m = (_DIFFUSERS_UP if to_wan else _WAN_UP).match(key)
    if m and to_wan:
        n = int(m[1]) * (per_level + 1) + (int(m[2]) if m[2] is not None else per_level)
        return f"decoder.upsamples.{n}.{_leaf(m[3], to_wan)}"
    if m:
        k, j = divmod(int(m[1]), per_level + 1)
        return f"decoder.up_blocks.{k}.{'upsamplers.0' if j == per_level else f'resnets.{j}'}.{_leaf(m[2], to_wan)}"
    for wan, dif in WAN_PREFIXES:
        src, dst = (dif, wan) if to_wan else (wan, dif)
        if key.startswith(src):
            return dst + _leaf(key[len(src):], to_wan)
    return key


def wan_keys(state: dict, to_wan: bool = False) -> dict:
    """Wan single-file keys -> diffusers' (to_wan: the reverse); tensors unchanged."""
    if to_wan:
        per = len({m[1] for k in state if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))})
    else:
        ups = sorted(int(m[1]) for k in state if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k)))
        per = ups[0] if ups else len({m[1] for k in state if (m := _WAN_UP.match(k))})
    return {_rename(k, to_wan, per): v for k, v in state.items()}


def to_frame(state: dict) -> tuple[dict, list]:
    """diffusers' tensors -> this module's (idempotent): 3D kernels' last temporal slice, gamma (C,1,1); and the
    time_conv keys dropped (they never run on one frame)."""
    out, dropped = {}, []
    for key, v in state.items():
        if ".time_conv." in key:
            dropped.append(key)
            continue
        out[key] = v[:, :, -1] if v.ndim == 5 else v.reshape(-1, 1, 1) if key.endswith(".gamma") else v
    return out, dropped


def own_keys(state: dict, where: str) -> "tuple[dict, str | None, list] | None":
    """A Qwen-Image-family state dict (Wan single-file or diffusers names) in this family's keys and one frame's
    tensors -> (state, "wan" or "diffusers": the names it had, the time_conv keys dropped); None: not this family."""
    named = None
    if is_wan(state):
        named, state = "wan", wan_keys(state)
    if not is_qwenimage(state):
        return None
    state, dropped = to_frame(state)
    if dropped:
        log.info("%s: dropping %d time_conv tensors (temporal resampling: never runs on one frame)", where,
                 len(dropped))
    return state, named or "diffusers", dropped


def from_frame(state: dict, temporal: list, num_res_blocks: int) -> dict:
    """This module's tensors -> diffusers' AutoencoderKLQwenImage's, the same on one frame: each causal conv a 3D
    kernel zero but for its last temporal slice, gamma in diffusers' shapes, zero time_convs where `temporal`
    (temperal_downsample) puts them."""
    out = {}
    for key, v in state.items():
        if key.endswith(".gamma"):
            v = v.reshape(-1, 1, 1) if ".attentions." in key else v.reshape(-1, 1, 1, 1)
        elif key.endswith(".weight") and v.ndim == 4 and not any(s in key for s in (".resample.", ".attentions.")):
            v = torch.cat([torch.zeros_like(v)[:, :, None]] * (v.shape[-1] - 1) + [v[:, :, None]], dim=2)
        out[key] = v
    for i, on in enumerate(temporal):  # encoder level i's downsampler; decoder up_blocks.k's upsampler
        n, k = (i + 1) * num_res_blocks + i, len(temporal) - 1 - i
        if on:
            dim = out[f"encoder.down_blocks.{n}.resample.1.weight"].shape[0]
            out.update(_zero_conv(f"encoder.down_blocks.{n}.time_conv", dim, dim))
            dim = out[f"decoder.up_blocks.{k}.upsamplers.0.resample.1.weight"].shape[1]
            out.update(_zero_conv(f"decoder.up_blocks.{k}.upsamplers.0.time_conv", dim, 2 * dim))
    return out


def _zero_conv(name: str, c_in: int, c_out: int) -> dict:
    return {f"{name}.weight": torch.zeros(c_out, c_in, 3, 1, 1), f"{name}.bias": torch.zeros(c_out)}


def _levels(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _mult(widths: list, where: str) -> list:
    if not widths or any(w % widths[0] for w in widths):
        raise CheckpointError(f"{where}: level widths {widths} are not multiples of the first")
    return [w // widths[0] for w in widths]


def _encoder_levels(state: dict) -> list:
    """The encoder's flat down_blocks as levels: [[width of each residual block], ...]."""
    levels = [[]]
    for n in range(_levels(state, "encoder.down_blocks.")):
        if f"encoder.down_blocks.{n}.conv1.weight" in state:
            levels[-1].append(state[f"encoder.down_blocks.{n}.conv1.weight"].shape[0])
        else:  # a downsampler closes its level
            levels.append([])
    return levels


def infer_config(state: dict, where: str) -> dict:
    """AsymmetricAutoencoderKLQwenImage kwargs read off one-frame weights in diffusers' names."""
    try:
        kw = {"family": FAMILY}
        if "encoder.conv_in.weight" in state:
            levels = _encoder_levels(state)
            dim = state["encoder.conv_in.weight"].shape[0]
            kw.update(encoder_ch=preset_width(dim, where), encoder_ch_mult=_mult([dim, *(lv[0] for lv in levels)],
                                                                                 where)[1:],
                      encoder_num_res_blocks=len(levels[0]),
                      z_channels=state["encoder.conv_out.weight"].shape[0] // 2)
        if "decoder.conv_in.weight" in state:
            count = _levels(state, "decoder.up_blocks.")
            outs = [state[f"decoder.up_blocks.{k}.resnets.0.conv1.weight"].shape[0] for k in range(count)][::-1]
            kw.update(ch=preset_width(outs[0], where), ch_mult=_mult(outs, where),
                      num_res_blocks=_levels(state, "decoder.up_blocks.0.resnets.") - 1,
                      z_channels=state["decoder.conv_in.weight"].shape[1])
        if "post_quant_conv.weight" in state:
            kw["embed_dim"] = state["post_quant_conv.weight"].shape[1]
        elif "z_channels" in kw:
            kw.update(embed_dim=kw["z_channels"], use_quant_conv=False)
        return kw
    except (KeyError, IndexError) as err:
        raise CheckpointError(f"{where}: incomplete Qwen-Image autoencoder weights, missing {err}") from None


def config_from_diffusers(cfg: dict, where: str) -> dict:
    """diffusers AutoencoderKLQwenImage config.json -> AsymmetricAutoencoderKLQwenImage kwargs."""
    for key, want in (("attn_scales", []), ("input_channels", 3)):
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{where}: config.json has {key}={cfg[key]!r}; this model needs {want!r}")
    dim, z = preset_width(cfg.get("base_dim", X1_WIDTH), where), cfg.get("z_dim", 16)
    mult, blocks = list(cfg.get("dim_mult", [1, 2, 4, 4])), cfg.get("num_res_blocks", 2)
    norm = cfg.get("_latent_norm") or (n.as_config() if (n := LatentNorm.from_diffusers_config(cfg)) else None)
    return dict(family=FAMILY, ch=dim, ch_mult=mult, num_res_blocks=blocks, encoder_ch=dim, encoder_ch_mult=mult,
                encoder_num_res_blocks=blocks, z_channels=z, embed_dim=z, **({"latent_norm": norm} if norm else {}),
                **({"base": cfg["_base"]} if cfg.get("_base") else {}))


def diffusers_form(kw: dict, state: dict) -> tuple[dict, dict]:
    """(config.json, weights) of diffusers' AutoencoderKLQwenImage for a model's config and state dict. It holds
    the branch-off decoder of the encoder's widths only: its decode takes latents alone (no masked image, no
    mask; the Qwen-Image pipelines call it so), and one base_dim, dim_mult and num_res_blocks serve encoder and
    decoder. The time_convs (temporal resampling, never run on one frame) are written as zeros: the export
    decodes and encodes images as ours, not videos as the Wan VAE."""
    if kw["use_condition"]:
        raise CheckpointError("diffusers' AutoencoderKLQwenImage has no masked-image branch (its decode takes "
                              "latents only, as the Qwen-Image pipelines call it): export --format decoder, "
                              "or train with model.autoencoder.use_condition=false")
    if (kw["ch"], kw["ch_mult"], kw["num_res_blocks"]) != (kw["encoder_ch"], kw["encoder_ch_mult"],
                                                           kw["encoder_num_res_blocks"]):
        raise CheckpointError(f"diffusers' AutoencoderKLQwenImage has one width for encoder and decoder; this "
                              f"decoder's (ch {kw['ch']}, ch_mult {kw['ch_mult']}, num_res_blocks "
                              f"{kw['num_res_blocks']}) are not the encoder's: export --format decoder")
    norm = LatentNorm.from_config(kw["latent_norm"])
    if norm.patch_size != 1:
        raise CheckpointError(f"diffusers' AutoencoderKLQwenImage states per-channel statistics, not "
                              f"{norm.describe()}")
    z, levels = kw["z_channels"], len(kw["ch_mult"])
    if not kw["use_quant_conv"]:  # diffusers always has both: exact identity 1x1 convs
        state = {**state, **identity_quant_convs(z)}
    temporal = [False] + [True] * (levels - 2)  # diffusers' default
    config = {"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": diffusers_version(),
              "base_dim": kw["ch"] * X1_WIDTH // 128, "z_dim": z, "dim_mult": kw["ch_mult"],
              "num_res_blocks": kw["num_res_blocks"], "attn_scales": [], "temperal_downsample": temporal,
              "dropout": 0.0, "input_channels": 3,
              "latents_mean": [norm.shift[c % len(norm.shift)] for c in range(z)],
              "latents_std": [1 / norm.scale[c % len(norm.scale)] for c in range(z)],
              "_latent_norm": norm.as_config(), "_base": kw.get("base")}
    return config, from_frame(state, temporal, kw["num_res_blocks"])
