"""Tiny random inpainting pipelines of the four bases, saved with save_pretrained; tokenizers written to disk
(no hub)."""
import json
from pathlib import Path

import torch

CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=32)


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=16)


def t5_tokenizer(folder: Path):
    """A unigram T5 tokenizer over a few words (tokenizer.json from the `tokenizers` library), as T5's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast
    words = "a an the cat dog".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_ids=0, model_max_length=16)


def clip_text(projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**CLIP)).eval()


def build(kind: str, vae, folder: Path) -> Path:
    """A random `kind` pipeline (sd1 | sdxl | sd3 | flux) around `vae` (its family's AutoencoderKL), saved."""
    import diffusers
    torch.manual_seed(0)
    tok = clip_tokenizer(folder / "tokenizers" / "clip")
    if kind == "sd1":  # the 9-channel inpainting UNet
        pipe = diffusers.StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=clip_text(False), tokenizer=tok, unet=diffusers.UNet2DConditionModel(
                **UNET, in_channels=9, out_channels=4, cross_attention_dim=32),
            scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    elif kind == "sdxl":  # a base-model UNet (4 channels): the inpainting pipeline blends the known latents
        unet = diffusers.UNet2DConditionModel(**UNET, in_channels=4, out_channels=4, cross_attention_dim=64,
                                              addition_embed_type="text_time", addition_time_embed_dim=8,
                                              projection_class_embeddings_input_dim=6 * 8 + 32)
        pipe = diffusers.StableDiffusionXLInpaintPipeline(
            vae=vae, text_encoder=clip_text(False), text_encoder_2=clip_text(True), tokenizer=tok, tokenizer_2=tok,
            unet=unet, scheduler=diffusers.EulerDiscreteScheduler(), requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=True)
    elif kind == "sd3":  # no T5 (text_encoder_3 None: zeros of joint_attention_dim)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64)
        pipe = diffusers.StableDiffusion3InpaintPipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
            text_encoder=clip_text(True), tokenizer=tok, text_encoder_2=clip_text(True), tokenizer_2=tok,
            text_encoder_3=None, tokenizer_3=None)
    elif kind == "flux":  # Fill: packed latents (4C) + packed masked-image latents (4C) + the 8x8 mask (256)
        from transformers import T5Config, T5EncoderModel
        c = 4 * vae.config.latent_channels
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=2 * c + 4 * 64, out_channels=c, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8], guidance_embeds=False)
        t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
        pipe = diffusers.FluxFillPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip_text(False),
            tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tokenizer(folder / "tokenizers" / "t5"),
            transformer=transformer)
    else:
        raise ValueError(kind)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
