"""The nodes (ComfyUI's V3 schema): load an asymmetric decoder, decode a LATENT with the image and its mask."""
import os
from pathlib import Path

import comfy.model_management as model_management
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io

from . import layouts
from .library import Library, find_root

FOLDER = "asymmetric_decoders"  # models/asymmetric_decoders: this pack's own model folder
SEARCHED = ("vae", FOLDER)  # listed as "<folder>/<file>"
Decoder = io.Custom("ASYMMETRIC_DECODER")  # what the loader gives the decode node: (decoder, its name)

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
LIBRARY = Library(find_root(Path(__file__).parent))
LIBRARY.module("ldm")  # at load: a library that does not import fails the pack's import, not the first prompt


def _folders_of(kind: str) -> list:
    return folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []


def decoder_files() -> list:
    """Every weight file in the searched folders, and every diffusers-style folder (config.json) in ours."""
    names = [f"{kind}/{n}" for kind in SEARCHED for n in folder_paths.get_filename_list(kind)]
    for folder in _folders_of(FOLDER):
        if os.path.isdir(folder):
            names += [f"{FOLDER}/{d}" for d in sorted(os.listdir(folder))
                      if os.path.isfile(os.path.join(folder, d, "config.json"))
                      or os.path.isfile(os.path.join(folder, d, "vae", "config.json"))]
    return sorted(set(names))


def resolve(name: str) -> str:
    kind, _, rel = name.partition("/")
    if kind not in SEARCHED:
        raise ValueError(f"{name!r}: not a file of the {' or '.join(SEARCHED)} model folders")
    for folder in _folders_of(kind):
        path = os.path.join(folder, rel)
        if os.path.exists(path):
            return path
    raise ValueError(f"{name!r}: no such decoder file in the {kind} model folders")


class LoadAsymmetricDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadAsymmetricDecoder", display_name="Load Asymmetric Decoder", category="loaders",
            description="An asymmetric decoder (run checkpoint, decoder export, diffusers or official format) "
                        "from the vae or asymmetric_decoders model folders; shows the base it decodes.",
            inputs=[io.Combo.Input("decoder_name", options=decoder_files())],
            outputs=[Decoder.Output(display_name="DECODER"), io.String.Output(display_name="base")])

    @classmethod
    def execute(cls, decoder_name) -> io.NodeOutput:
        path = resolve(decoder_name)
        with LIBRARY.active():
            import ldm
            try:
                decoder = ldm.load_autoencoder(path)
            except ldm.CheckpointError as err:
                raise ValueError(f"{decoder_name} is no decoder this pack can load: {err}") from None
            base = layouts.base_of(decoder)
        return io.NodeOutput((decoder, decoder_name), base, ui={"text": [base]})


class AsymmetricDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AsymmetricDecode", display_name="Asymmetric Decode (inpaint)", category="latent",
            description="Decodes a LATENT with the original IMAGE and MASK (1 = inpainted) through the decoder's "
                        "masked-image branch: the unmasked region keeps its colours.",
            inputs=[Decoder.Input("decoder"), io.Latent.Input("samples"), io.Image.Input("image"),
                    io.Mask.Input("mask"),
                    io.Int.Input("tile", default=0, min=0, max=4096, step=8,
                                 tooltip="latent tile side for large images (0: the whole latent at once)"),
                    io.Boolean.Input("paste_back", default=False,
                                     tooltip="put the image's own pixels back where the mask is 0")],
            outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, decoder, samples, image, mask, tile, paste_back) -> io.NodeOutput:
        model, name = decoder
        device = model_management.get_torch_device()  # ComfyUI's compute device; the decoder waits on the host
        with LIBRARY.active(), torch.no_grad():
            try:
                out = layouts.decode(model.to(device), samples["samples"].to(device), image, mask, tile=tile,
                                     paste=paste_back, name=name)
            finally:
                model.to(model_management.unet_offload_device())  # the VRAM back to the samplers
        return io.NodeOutput(out.to(model_management.intermediate_device()))


class AsymmetricDecoderExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return [LoadAsymmetricDecoder, AsymmetricDecode]
