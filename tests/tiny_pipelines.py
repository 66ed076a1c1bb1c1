"""Tiny random inpainting pipelines of every pipeline ldm/decoding/table.py drives (the ControlNet, Control, PAG and
editing ones: tiny_variants.py), saved with save_pretrained; tokenizers written to disk (no hub)."""
import json
from pathlib import Path

import diffusers
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


def t5_text():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(2)
    return T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def qwen_text(folder: Path, layers: int = 2, causal_lm: bool = False):
    """Z-Image's text side (FLUX.2 Klein's: a Qwen3ForCausalLM, read at its hidden states 9, 18 and 27): a tiny Qwen3
    and a word tokenizer with a chat template (the pipeline applies one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate("<pad> <unk> a an the cat dog".split())},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    torch.manual_seed(3)
    text = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=8, max_position_embeddings=512))
    return text.eval(), tokenizer


def qwen_vl(folder: Path, processor: bool = False) -> dict:
    """Qwen-Image's text side: a tiny Qwen2.5-VL and a byte-level BPE tokenizer without merges (one token a byte)
    holding Qwen2.5-VL's special tokens; with `processor`, the Qwen2-VL processor (its image processor small)
    that Qwen-Image-Edit encodes the image with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=special, model_max_length=1024)
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(special[2:])))
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                rope_theta=1e6, vocab_size=len(tokenizer),
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    torch.manual_seed(4)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, hidden_size=16, vocab_size=len(tokenizer), **ids)).eval()
    out = dict(text_encoder=encoder, tokenizer=tokenizer)
    if processor:
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
        out["processor"] = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56,
                                                                                  max_pixels=56 * 56),
                                            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    return out


def flux_transformer(vae, fill=False):
    """FLUX.1's transformer over packed latents (4C); Fill's also takes the packed masked-image latents (4C) and
    the 8x8 mask (256)."""
    c = 4 * vae.config.latent_channels
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=2 * c + 4 * 64 if fill else c, out_channels=c, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=False)


def components(cls: str, vae, folder: Path) -> dict:
    """The tiny components but the VAE of the diffusers pipeline class `cls` around `vae`."""
    torch.manual_seed(0)
    clip = dict(tokenizer=clip_tokenizer(folder / "tokenizers" / "clip"))
    if cls == "StableDiffusionInpaintPipeline":  # the 9-channel inpainting UNet
        return dict(**clip, text_encoder=clip_text(False), unet=diffusers.UNet2DConditionModel(
            **UNET, in_channels=9, out_channels=4, cross_attention_dim=32), scheduler=diffusers.DDIMScheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if cls == "StableDiffusionXLInpaintPipeline":  # a base-model UNet (4 channels): the known latents blended in
        unet = diffusers.UNet2DConditionModel(**UNET, in_channels=4, out_channels=4, cross_attention_dim=64,
                                              addition_embed_type="text_time", addition_time_embed_dim=8,
                                              projection_class_embeddings_input_dim=6 * 8 + 32)
        return dict(**clip, text_encoder=clip_text(False), text_encoder_2=clip_text(True),
                    tokenizer_2=clip["tokenizer"], unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
                    requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    if cls == "StableDiffusion3InpaintPipeline":  # no T5 (text_encoder_3 None: zeros of joint_attention_dim)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64)
        return dict(**clip, transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                    text_encoder=clip_text(True), text_encoder_2=clip_text(True), tokenizer_2=clip["tokenizer"],
                    text_encoder_3=None, tokenizer_3=None)
    flow = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    t5 = dict(text_encoder=t5_text(), tokenizer=t5_tokenizer(folder / "tokenizers" / "t5"))
    if cls in ("FluxFillPipeline", "FluxInpaintPipeline", "FluxKontextInpaintPipeline"):
        return dict(**clip, **flow, text_encoder=clip_text(False), text_encoder_2=t5["text_encoder"],
                    tokenizer_2=t5["tokenizer"], transformer=flux_transformer(vae, fill=cls == "FluxFillPipeline"))
    if cls == "ChromaInpaintPipeline":  # T5 only; the transformer over packed latents (4C)
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
            approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)
        # diffusers 0.42's ChromaInpaintPipeline reads config.guidance_embeds, which the class lacks and
        # Chroma1-HD's transformer/config.json carries (false; diffusers issue #12112 quotes it)
        transformer.register_to_config(guidance_embeds=False)
        return dict(**flow, **t5, transformer=transformer)
    if cls == "ZImageInpaintPipeline":  # latents in 2x2 patches inside the transformer, not packed outside it
        transformer = diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=vae.config.latent_channels, dim=32, n_layers=1,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
            axes_lens=[256, 32, 32])
        with torch.no_grad():  # created with torch.empty: uninitialised memory
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
        text, tokenizer = qwen_text(folder)
        return dict(**flow, text_encoder=text, tokenizer=tokenizer, transformer=transformer)
    if cls == "Flux2KleinInpaintPipeline":  # packed 2x2 patches (4C); the text: 3 Qwen3 hidden states of 16 stacked
        transformer = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * 16, axes_dims_rope=[4, 4, 4, 4],
            guidance_embeds=False)
        text, tokenizer = qwen_text(folder, layers=27, causal_lm=True)
        # step-distilled, as Klein 4B and 9B: no classifier-free guidance, so the 512 text tokens are encoded once
        return dict(**flow, text_encoder=text, tokenizer=tokenizer, transformer=transformer, is_distilled=True)
    if cls in ("QwenImageInpaintPipeline", "QwenImageEditInpaintPipeline"):  # packed 2x2 patches (4 x 16 = 64)
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
        return dict(**flow, **qwen_vl(folder, processor=cls == "QwenImageEditInpaintPipeline"),
                    transformer=transformer)
    raise ValueError(cls)


def build(cls: str, vae, folder: Path):
    """(the pipeline, its folder): a random diffusers `cls` pipeline around `vae` (its family's AutoencoderKL,
    AutoencoderKLFlux2 or AutoencoderKLQwenImage), saved with save_pretrained."""
    import tiny_variants  # the ControlNet, Control, PAG and editing pipelines, over their base class's components
    made = tiny_variants.components if cls in tiny_variants.BASE_CLASS else components
    pipe = getattr(diffusers, cls)(vae=vae, **made(cls, vae, folder))
    pipe.save_pretrained(folder / "pipeline")
    return pipe, folder / "pipeline"


def around_checkpoint(checkpoint, folder: Path) -> Path:
    """A random SD 1.x inpainting pipeline around the VAE of one of our checkpoints (its encoder, its decoder without
    the branch: a diffusers AutoencoderKL), saved to folder/pipeline; its UNet takes 4 channels, so the pipeline
    blends the image's own latents into the known region at every step (diffusers' legacy inpainting), as a
    denoiser that keeps the known region and invents the hole. For the levers table (docs/evaluation.md)."""
    from ldm import load_autoencoder
    from ldm.modules.sd.keys import ldm_to_diffusers
    ours = load_autoencoder(checkpoint)
    c, norm = ours.config, ours.latent_norm
    if (c["ch"], c["num_res_blocks"], list(c["ch_mult"])) != (c["encoder_ch"], c["encoder_num_res_blocks"],
                                                              list(c["encoder_ch_mult"])) or norm.channels:
        raise ValueError(f"{checkpoint}: an AutoencoderKL has one width for encoder and decoder and scalar factors")
    blocks = len(c["ch_mult"])
    vae = diffusers.AutoencoderKL(
        block_out_channels=[c["ch"] * m for m in c["ch_mult"]], layers_per_block=c["num_res_blocks"],
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=c["z_channels"], norm_num_groups=32, scaling_factor=norm.scale[0],
        shift_factor=norm.shift[0] or None, use_quant_conv=c["use_quant_conv"], use_post_quant_conv=c["use_quant_conv"])
    state = ldm_to_diffusers(ours.state_dict())
    vae.load_state_dict({k: v for k, v in state.items() if not k.startswith("decoder.condition_encoder.")})
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=vae.eval(), text_encoder=clip_text(False), tokenizer=clip_tokenizer(folder / "tokenizers" / "clip"),
        unet=diffusers.UNet2DConditionModel(**UNET, in_channels=4, out_channels=4, cross_attention_dim=32),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


if __name__ == "__main__":  # python tests/tiny_pipelines.py CHECKPOINT OUT: OUT/pipeline (around_checkpoint)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(around_checkpoint(sys.argv[1], Path(sys.argv[2])))
