"""The SD family's asymmetric KL-f8 autoencoder: frozen SD encoder, heavy decoder with a masked-image branch."""
from typing import Optional, Sequence

from ..common import AsymmetricAutoencoder, identity_quant_convs, latent_convs
from .keys import diffusers_config, ldm_to_diffusers
from .vae import AsymmetricDecoder, Encoder

SD_LATENT_NORM = {"patch_size": 1, "shift": [0.0], "scale": [0.18215]}  # SD 1.x's scaling_factor

# Widths of DESIGN.md; `ch` is channel width, not parameter count. Every family reads them (its own x1 width
# for ch = 128: ldm/modules/families.py).
PRESETS = {
    "x1": dict(ch=128, num_res_blocks=2),
    "x1.5": dict(ch=192, num_res_blocks=3),
    "x2": dict(ch=256, num_res_blocks=5),
}


class AsymmetricAutoencoderKL(AsymmetricAutoencoder):
    """The SD layout (SD 1.x, SDXL, SD3, FLUX.1: GroupNorm, ldm parameter names); see AsymmetricAutoencoder.

    A base (configs/bases/) sets z_channels = embed_dim, use_quant_conv (false: no 1x1 convs around the latent,
    as SD3 and FLUX.1), latent_norm and its name; latent_norm and the name are carried into checkpoints and
    exports, never used here.
    """

    family = "sd"
    default_latent_norm = SD_LATENT_NORM  # None: SD's, as the widths

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 use_condition: bool = True, gradient_checkpointing: bool = False,
                 encoder_ch: int = 128, encoder_ch_mult: Sequence[int] = (1, 2, 4, 4),
                 encoder_num_res_blocks: int = 2, z_channels: int = 4, embed_dim: int = 4,
                 use_quant_conv: bool = True, latent_norm: Optional[dict] = None, base: Optional[str] = None,
                 family: str = "sd"):
        super().__init__(dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                              use_condition=use_condition, encoder_ch=encoder_ch,
                              encoder_ch_mult=list(encoder_ch_mult),
                              encoder_num_res_blocks=encoder_num_res_blocks, z_channels=z_channels,
                              embed_dim=embed_dim, use_quant_conv=use_quant_conv,
                              latent_norm=latent_norm, base=base, family=family))
        self.encoder = Encoder(encoder_ch, encoder_ch_mult, encoder_num_res_blocks, z_channels=z_channels)
        self.quant_conv, self.post_quant_conv = latent_convs(z_channels, embed_dim, use_quant_conv)
        self.decoder = AsymmetricDecoder(ch, ch_mult, num_res_blocks, z_channels=z_channels,
                                         use_condition=use_condition,
                                         gradient_checkpointing=gradient_checkpointing)

    def diffusers_form(self) -> tuple[dict, dict]:
        """(config.json, weights in diffusers keys) of diffusers' AsymmetricAutoencoderKL; a VAE without quant
        convs (sd3, flux) gets identity 1x1 convs, config.json names the base and its latent normalisation."""
        state = self.state_dict()
        if not self.config["use_quant_conv"]:
            state = {**state, **identity_quant_convs(self.config["z_channels"])}
        return diffusers_config(self.config), ldm_to_diffusers(state)

    @staticmethod
    def width_must(mults: str) -> str:
        """What a width must be times the multipliers `mults` (config checks, ldm/training/checks.py)."""
        return f"a width that GroupNorm(32) can split times each of {mults} (each product a multiple of 32)"

    @staticmethod
    def width_ok(ch: int, mults) -> bool:
        return all(ch * m % 32 == 0 for m in mults)
