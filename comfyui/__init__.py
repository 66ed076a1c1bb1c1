"""A ComfyUI node pack: asymmetric decoders trained with this repository, in ComfyUI's inpainting workflows.

Link (or copy) this folder into ComfyUI's custom_nodes/ (README: ComfyUI). ComfyUI is imported by nodes.py
only, when ComfyUI loads the pack; library.py and layouts.py import none of it (the tests use them without).
"""


async def comfy_entrypoint():
    from .nodes import AsymmetricDecoderExtension
    return AsymmetricDecoderExtension()
