"""Tiny random components of the ControlNet, Control, PAG and editing pipelines ldm/decoding/table.py drives, around
the components of their base's tiny pipeline (tiny_pipelines.components); no hub."""
import diffusers
import torch

import tiny_pipelines

# ControlNetModel takes the UNet's down half: its widths, no sample size or up blocks; a 4-level conditioning
# embedding downsamples the control image 8x, to the latent
CONTROLNET = {k: v for k, v in tiny_pipelines.UNET.items() if k not in ("sample_size", "up_block_types")}
CONDITIONING = dict(conditioning_embedding_out_channels=(8, 16, 16, 16))
SDXL_NET = dict(in_channels=4, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32, **CONDITIONING)
# each class -> (the class whose tiny components it starts from, what it adds or replaces)
BASE_CLASS = {
    "StableDiffusionControlNetInpaintPipeline": "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPAGInpaintPipeline": "StableDiffusionInpaintPipeline",
    "StableDiffusionPAGInpaintPipeline": "StableDiffusionInpaintPipeline",
    "StableDiffusionXLControlNetInpaintPipeline": "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetUnionInpaintPipeline": "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPAGInpaintPipeline": "StableDiffusionXLInpaintPipeline",
    "StableDiffusion3ControlNetInpaintingPipeline": "StableDiffusion3InpaintPipeline",
    "FluxControlInpaintPipeline": "FluxInpaintPipeline",
    "FluxControlNetInpaintPipeline": "FluxInpaintPipeline",
    "QwenImageControlNetInpaintPipeline": "QwenImageInpaintPipeline",
    "ZImageControlNetInpaintPipeline": "ZImageInpaintPipeline",
    "FluxKontextPipeline": "FluxKontextInpaintPipeline",
    "QwenImageEditPipeline": "QwenImageEditInpaintPipeline",
    "QwenImageEditPlusPipeline": "QwenImageEditInpaintPipeline",
    "Flux2KleinPipeline": "Flux2KleinInpaintPipeline",
}


def added(cls: str, vae) -> dict:
    """What `cls` takes beyond its base class's tiny components (seeded: the same weights every build)."""
    torch.manual_seed(5)
    if cls.startswith("StableDiffusionControlNet"):  # the UNet is the 9-channel one; its ControlNet sees 4
        return dict(controlnet=diffusers.ControlNetModel(**CONTROLNET, in_channels=4, cross_attention_dim=32,
                                                         **CONDITIONING), image_encoder=None)
    if cls == "StableDiffusionXLControlNetInpaintPipeline":
        return dict(controlnet=diffusers.ControlNetModel(**CONTROLNET, **SDXL_NET))
    if cls == "StableDiffusionXLControlNetUnionInpaintPipeline":  # its control-type transformer as wide as level 0
        return dict(controlnet=diffusers.ControlNetUnionModel(**CONTROLNET, **SDXL_NET, num_trans_channel=32,
                                                              num_trans_head=2, num_trans_layer=1,
                                                              num_proj_channel=32))
    if cls == "StableDiffusion3ControlNetInpaintingPipeline":  # the control: masked image latents and the mask (+1)
        return dict(controlnet=diffusers.SD3ControlNetModel(
            sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
            extra_conditioning_channels=1))
    c = 4 * vae.config.latent_channels if hasattr(vae.config, "latent_channels") else 64
    if cls == "FluxControlInpaintPipeline":  # the control image's packed latents concatenated: twice the input
        return dict(transformer=diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=2 * c, out_channels=c, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=False))
    if cls == "FluxControlNetInpaintPipeline":
        return dict(controlnet=diffusers.FluxControlNetModel(
            patch_size=1, in_channels=c, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=False))
    if cls == "QwenImageControlNetInpaintPipeline":  # the control: masked image latents and the mask, packed (+4)
        return dict(controlnet=diffusers.QwenImageControlNetModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4), extra_condition_channels=4))
    if cls == "ZImageControlNetInpaintPipeline":  # the control: control latents, mask, masked image latents (33)
        return dict(controlnet=diffusers.ZImageControlNetModel(
            control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=2 * 16 + 1, dim=32,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2))
    if cls == "FluxKontextPipeline":
        return dict(image_encoder=None, feature_extractor=None)
    return {}


def components(cls: str, vae, folder) -> dict:
    """All the tiny components but the VAE of `cls`, one of BASE_CLASS."""
    return {**tiny_pipelines.components(BASE_CLASS[cls], vae, folder), **added(cls, vae)}
