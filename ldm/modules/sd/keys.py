"""The SD family's key layouts: the one ldm <-> diffusers rename table, the widths that a state dict or config.json
implies, and FLUX.2's batch-norm latent statistics."""
import logging
import re

from ...latent_norm import LatentNorm
from ..common import CheckpointError, diffusers_version

log = logging.getLogger(__name__)
BATCH_NORM = "bn."  # a frozen BatchNorm's running statistics over the patchified latent (FLUX.2): latent_norm data
DIFFUSERS_PREFIXES = ("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.")

# ---- the rename table: (ldm, diffusers, exported) key-prefix templates --------------------------------
# {part}: encoder|decoder; {i}, {j}: indices copied; decoder levels flip: ldm up.{i} <-> up_blocks.{k},
# k = levels - 1 - i (ldm up.0 is full resolution, diffusers up_blocks.0 the lowest).
# Rows with exported=False are read only (diffusers < 0.15 attention names).
RENAMES = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}.", True),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0.", True),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{k}.resnets.{j}.", True),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{k}.upsamplers.0.", True),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0.", True),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1.", True),
    ("{part}.mid.attn_1.norm.", "{part}.mid_block.attentions.0.group_norm.", True),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.to_q.", True),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.to_k.", True),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.to_v.", True),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.to_out.0.", True),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.query.", False),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.key.", False),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.value.", False),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.proj_attn.", False),
    ("{part}.norm_out.", "{part}.conv_norm_out.", True),
    ("decoder.encoder.layers.", "decoder.condition_encoder.layers.", True),
]
LEAF_RENAMES = [("nin_shortcut.", "conv_shortcut.")]  # inside residual blocks, both encoder and decoder
# ldm attention projections are 1x1 convs (C,C,1,1); diffusers' are Linear (C,C)
ATTN_WEIGHT = re.compile(r"^(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
DROPPED = ("decoder.up_layers.",)  # official ConvTranspose2d weights, never used in forward: dropped by name
SKIPPED = ("loss.",)  # official LPIPS/discriminator weights: not part of the autoencoder

_GROUPS = {"part": r"(?P<part>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "k": r"(?P<k>\d+)"}


def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, group in _GROUPS.items():
        out = out.replace(re.escape("{" + name + "}"), group)
    return re.compile(out)


_TABLE = [(_pattern(ldm), _pattern(dif), ldm, dif, exported) for ldm, dif, exported in RENAMES]


def _rename(key: str, to_diffusers: bool, levels: int) -> str:
    """One key through the table (keys no row matches are the same in both layouts)."""
    for ldm_re, dif_re, ldm, dif, exported in _TABLE:
        if to_diffusers and not exported:
            continue
        m = (ldm_re if to_diffusers else dif_re).match(key)
        if m is None:
            continue
        g = {k: v for k, v in m.groupdict().items() if v is not None}
        if "i" in g and "k" not in g:
            g["k"] = str(levels - 1 - int(g["i"]))
        elif "k" in g:
            g["i"] = str(levels - 1 - int(g["k"]))
        rest = key[m.end():]
        for old, new in LEAF_RENAMES:
            src, dst = (old, new) if to_diffusers else (new, old)
            if rest.startswith(src):
                rest = dst + rest[len(src):]
        return (dif if to_diffusers else ldm).format(**g) + rest
    return key


def _levels(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def ldm_to_diffusers(state: dict) -> dict:
    """ldm autoencoder keys -> diffusers keys (attention 1x1 conv weights squeezed to Linear)."""
    levels = _levels(state, "decoder.up.")
    out = {}
    for key, value in state.items():
        if ATTN_WEIGHT.match(key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # (C,C,1,1) -> (C,C)
        out[_rename(key, True, levels)] = value
    return out


def diffusers_to_ldm(state: dict) -> dict:
    """diffusers keys (current or legacy attention names) -> ldm keys (attention weights as 1x1 convs)."""
    levels = _levels(state, "decoder.up_blocks.")
    out = {}
    for key, value in state.items():
        new = _rename(key, False, levels)
        out[new] = value[:, :, None, None] if ATTN_WEIGHT.match(new) and value.ndim == 2 else value
    return out


# ---- widths: from ldm weights or from diffusers config.json ---------------------------------------------
def _level_widths(state: dict, prefix: str) -> list[int]:
    """Output width of each level's first resnet, e.g. encoder.down.{i}.block.0.conv1 -> [128, 256, ...]."""
    return [state[f"{prefix}{i}.block.0.conv1.weight"].shape[0] for i in range(_levels(state, prefix))]


def _mult(widths: list[int], where: str) -> list[int]:
    if not widths or any(w % widths[0] for w in widths):
        raise CheckpointError(f"{where}: level widths {widths} are not multiples of the first")
    return [w // widths[0] for w in widths]


def infer_config(state: dict, where: str) -> dict:
    """AsymmetricAutoencoderKL kwargs read off ldm-key weights (encoder kwargs only when it is present)."""
    try:
        kw = {"family": "sd"}
        if "encoder.conv_in.weight" in state:
            enc = _level_widths(state, "encoder.down.")
            kw.update(encoder_ch=enc[0], encoder_ch_mult=_mult(enc, where),
                      encoder_num_res_blocks=_levels(state, "encoder.down.0.block."),
                      z_channels=state["encoder.conv_out.weight"].shape[0] // 2)
        if "decoder.conv_in.weight" in state:
            dec = _level_widths(state, "decoder.up.")
            kw.update(ch=dec[0], ch_mult=_mult(dec, where),
                      num_res_blocks=_levels(state, "decoder.up.0.block.") - 1,
                      z_channels=state["decoder.conv_in.weight"].shape[1])
        if "post_quant_conv.weight" in state:
            kw["embed_dim"] = state["post_quant_conv.weight"].shape[1]
        elif "z_channels" in kw:  # no quant convs (SD3, FLUX.1): z goes straight into the decoder
            kw.update(embed_dim=kw["z_channels"], use_quant_conv=False)
        return kw
    except (KeyError, IndexError) as err:
        raise CheckpointError(f"{where}: incomplete autoencoder weights, missing {err}") from None


def config_from_diffusers(cfg: dict, where: str) -> dict:
    """diffusers AutoencoderKL / AutoencoderKLFlux2 / AsymmetricAutoencoderKL config.json -> our kwargs (a decoder
    of other widths than the encoder, AutoencoderKLFlux2's decoder_block_out_channels, as its widths)."""
    asym = cfg.get("_class_name") == "AsymmetricAutoencoderKL"
    down = cfg["down_block_out_channels"] if asym else cfg["block_out_channels"]
    up = cfg["up_block_out_channels"] if asym else cfg.get("decoder_block_out_channels") or cfg["block_out_channels"]
    checks = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_num_groups": 32,
              "mid_block_add_attention": True, "use_post_quant_conv": cfg.get("use_quant_conv", True)}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{where}: config.json has {key}={cfg[key]!r}; this model needs {want!r}")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != want for t in cfg.get(key, [want])):
            raise CheckpointError(f"{where}: config.json {key}={cfg[key]}; this model needs {want} blocks")
    layers_down = cfg["layers_per_down_block"] if asym else cfg["layers_per_block"]
    layers_up = cfg["layers_per_up_block"] if asym else cfg["layers_per_block"]
    z = cfg.get("latent_channels", 4)
    # use_quant_conv is read off the weights (absent, or identity 1x1 convs in an export: ldm/formats/convert.py)
    # our exports state the whole latent normalisation in _latent_norm (diffusers skips "_" keys), others their factors
    norm = cfg.get("_latent_norm") or (n.as_config() if (n := LatentNorm.from_diffusers_config(cfg)) else None)
    base = cfg.get("_base") or cfg.get("base")  # "base": exports before 2026-12
    return dict(family="sd", ch=up[0], ch_mult=_mult(up, where), num_res_blocks=layers_up, encoder_ch=down[0],
                encoder_ch_mult=_mult(down, where), encoder_num_res_blocks=layers_down, z_channels=z, embed_dim=z,
                **({"latent_norm": norm} if norm else {}), **({"base": base} if base else {}))


def latent_norm_from_batch_norm(cfg: dict, stats: dict, where: str) -> dict:
    """The latent_norm a VAE's batch-norm statistics (running_mean, running_var; bn.* weights) and its config.json
    (batch_norm_eps, patch_size) state: latents = (patchify(z) - mean) / sqrt(var + eps), as FLUX.2's pipelines."""
    for key in ("running_mean", "running_var"):
        if key not in stats:
            raise CheckpointError(f"{where}: batch-norm latent statistics without {BATCH_NORM}{key}")
    patch = cfg.get("patch_size", [2, 2])
    patch = [patch, patch] if isinstance(patch, int) else list(patch)
    if len(patch) != 2 or patch[0] != patch[1]:
        raise CheckpointError(f"{where}: config.json has patch_size={cfg['patch_size']!r}; square patches expected")
    channels = cfg.get("latent_channels", 4) * patch[0] ** 2
    if stats["running_mean"].numel() != channels or stats["running_var"].numel() != channels:
        raise CheckpointError(f"{where}: {BATCH_NORM}running_mean holds {stats['running_mean'].numel()} values, the "
                              f"{patch[0]}x{patch[0]}-patchified latent {channels} channels")
    eps = float(cfg.get("batch_norm_eps", 1e-4))  # AutoencoderKLFlux2's default
    return LatentNorm.from_batch_norm(stats["running_mean"], stats["running_var"], eps, patch[0]).as_config()


def diffusers_config(kw: dict) -> dict:
    """Our kwargs -> diffusers' config.json (DESIGN.md keys), the inverse of config_from_diffusers: an
    AsymmetricAutoencoderKL, or for a decoder without the masked-image branch (use_condition=False) an
    AutoencoderKL, whose one width list serves its encoder and decoder."""
    if kw["z_channels"] != kw["embed_dim"]:
        raise CheckpointError(f"diffusers' autoencoders need z_channels == embed_dim; got {kw}")
    norm = LatentNorm.from_config(kw.get("latent_norm"))
    down, up = [kw["encoder_ch"] * m for m in kw["encoder_ch_mult"]], [kw["ch"] * m for m in kw["ch_mult"]]
    config = {"_diffusers_version": diffusers_version(), "in_channels": 3, "out_channels": 3,
              "down_block_types": ["DownEncoderBlock2D"] * len(down), "up_block_types": ["UpDecoderBlock2D"] * len(up),
              "act_fn": "silu", "latent_channels": kw["z_channels"], "norm_num_groups": 32, "sample_size": 256,
              # scaling_factor: what diffusers' SD pipelines read (1 where the statistics are per channel); the
              # whole normalisation and the base's name for readers, in keys diffusers skips without a warning
              "scaling_factor": norm.scale[0] if norm.channels is None and norm.patch_size == 1 else 1.0,
              "_latent_norm": norm.as_config(), "_base": kw.get("base")}
    if kw["use_condition"]:
        return {"_class_name": "AsymmetricAutoencoderKL", **config, "down_block_out_channels": down,
                "layers_per_down_block": kw["encoder_num_res_blocks"], "up_block_out_channels": up,
                "layers_per_up_block": kw["num_res_blocks"]}
    if down != up or kw["encoder_num_res_blocks"] != kw["num_res_blocks"]:
        raise CheckpointError(f"diffusers' AutoencoderKL has one width for encoder and decoder; this decoder without "
                              f"the masked-image branch has {up} x {kw['num_res_blocks']} against {down} x "
                              f"{kw['encoder_num_res_blocks']}")
    return {"_class_name": "AutoencoderKL", **config, "block_out_channels": up,
            "layers_per_block": kw["num_res_blocks"]}


def own_keys(state: dict, where: str) -> tuple[dict, "str | None", list]:
    """An SD-family state dict in ldm keys: diffusers' names renamed, attention weights as 1x1 convs, the official
    checkpoints' unused decoder.up_layers.* dropped by name -> (state, "diffusers" where its names were, dropped)."""
    named = None
    if any(k.startswith(DIFFUSERS_PREFIXES) for k in state):
        named, state = "diffusers", diffusers_to_ldm(state)
    dropped = [k for k in state if k.startswith(DROPPED)]
    if dropped:
        log.warning("%s: dropping %d decoder.up_layers.* tensors (official ConvTranspose2d weights that the "
                    "decoder never uses in forward)", where, len(dropped))
    return ({k: v.reshape(v.shape[0], -1, 1, 1) if ATTN_WEIGHT.match(k) and v.ndim < 4 else v  # Linear, conv1d
             for k, v in state.items() if k not in dropped}, named, dropped)
