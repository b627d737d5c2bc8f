"""Every ComfyUI symbol the pack uses (nodes/, training/), in one list.

tests/test_core_symbols.py resolves each one on the host ComfyUI and scans the pack's sources for core
symbols missing from this list, so that a rename in core, or a new use that nobody reviewed, fails loudly.

Tested: ComfyUI 0.3.75 (the copy the tests run), every name below. Reviewed by reading the newest
Comfy-Org/ComfyUI source (version 0.38.1, 26 Nov 2026): comfy/sd.py (VAE.__init__ defaults, VAE.decode,
VAE.decode_tiled, decode_tiled_, memory_used_decode, output_channels, process_output (in place there),
vae_output_dtype, spacial_compression_decode, throw_exception_if_invalid, CLIP.tokenize/clone/
encode_from_tokens/encode_from_tokens_scheduled, load_lora_for_models, comfy.lora.model_lora_keys_unet and
ModelPatcher.add_patches as it calls them, ops.disable_weight_init and the sd1_clip and AutoencoderKL imports),
comfy/utils.py (tiled_scale, get_tiled_scale_steps, ProgressBar, set_progress_bar_global_hook,
load_torch_file (read-only memory maps under DynamicVRAM), unet_to_diffusers), comfy/model_management.py
(throw_exception_if_processing_interrupted, interrupt_current_processing, InterruptProcessingException (a
BaseException), dtype_size, intermediate_device, intermediate_dtype, get_torch_device, load_models_gpu),
comfy/model_patcher.py (ModelPatcher.clone, get_model_object, set_model_sampler_post_cfg_function,
set_model_attn2_replace), comfy/cli_args.py (args.cpu, disable_metadata, disable_smart_memory,
use_pytorch_cross_attention; it reads comfy.options.args_parsing), folder_paths.py (every name listed) and
comfy_api/latest/__init__.py (ComfyExtension; io and ui are now the public re-export modules _io_public and
_ui_public, which are not in the searchable copy: Schema's search_aliases and the ui classes were read in
_io.py / _ui.py), comfy/ldm/modules/attention.py (BasicTransformerBlock's attn2 replacement call: q, k, v
projected, then to_out), comfy/samplers.py (CALC_COND_BATCH wrappers; transformer_options["uuids"]),
comfy/lora.py (calculate_weight(patches, weight, key, ...)), ModelPatcher.add_wrapper_with_key. Not re-read
in the newest source, tested on 0.3.75 only: comfy/options.py (not in the searchable copy),
model_base.BaseModel.process_latent_in, clip_model.CLIPTextModel, openaimodel.UNetModel,
sd.load_checkpoint_guess_config.

CORE_SYMBOLS maps a module to dotted names inside it (classes' methods included). VAE_INSTANCE_ATTRIBUTES
are set in comfy.sd.VAE.__init__ and can only be checked on a VAE object.
"""
from __future__ import annotations

import importlib

CORE_SYMBOLS: dict[str, tuple[str, ...]] = {
    "comfy_api.latest": (
        "ComfyExtension",
        "io.ComfyNode", "io.Schema", "io.NodeOutput", "io.Custom", "io.FolderType",
        "io.Boolean.Input", "io.Combo.Input", "io.Float.Input", "io.Int.Input", "io.String.Input",
        "io.String.Output",
        "io.Image.Input", "io.Image.Output", "io.Mask.Input", "io.Mask.Output", "io.Latent.Input",
        "io.Latent.Output", "io.Vae.Input", "io.Model.Input", "io.Model.Output", "io.Clip.Input",
        "io.Clip.Output", "io.Conditioning.Input", "io.Conditioning.Output",
        "ui.PreviewImage", "ui.PreviewText", "ui.SavedImages", "ui.SavedResult",
    ),
    "folder_paths": (
        "add_model_folder_path", "get_folder_paths", "get_full_path", "get_filename_list",
        "get_save_image_path", "get_output_directory", "models_dir", "folder_names_and_paths",
    ),
    "comfy.cli_args": ("args", "args.cpu", "args.disable_metadata", "args.disable_smart_memory",
                       "args.use_pytorch_cross_attention"),
    "comfy.options": ("enable_args_parsing",),
    "comfy.model_management": (
        "dtype_size", "throw_exception_if_processing_interrupted", "intermediate_device", "get_torch_device",
        "load_models_gpu",
    ),
    "comfy.utils": ("ProgressBar", "tiled_scale", "get_tiled_scale_steps", "load_torch_file", "unet_to_diffusers"),
    "comfy.sd": (
        "VAE", "VAE.decode", "VAE.decode_tiled", "VAE.throw_exception_if_invalid", "VAE.spacial_compression_decode",
        "CLIP.tokenize", "CLIP.encode_from_tokens", "CLIP.encode_from_tokens_scheduled", "CLIP.clone", "CLIP.clip_layer",
        "load_lora_for_models", "load_checkpoint_guess_config",
    ),
    "comfy.model_patcher": (
        "ModelPatcher.clone", "ModelPatcher.add_patches", "ModelPatcher.get_model_object",
        "ModelPatcher.set_model_sampler_post_cfg_function", "ModelPatcher.set_model_attn2_replace",
        "ModelPatcher.add_wrapper_with_key", "ModelPatcher.get_wrappers", "ModelPatcher.set_attachments",
        "ModelPatcher.get_attachment",
    ),
    "comfy.patcher_extension": ("WrappersMP.CALC_COND_BATCH",),
    "comfy.model_base": ("BaseModel.process_latent_in",),
    "comfy.lora": ("model_lora_keys_unet", "calculate_weight"),
    "comfy.ops": ("disable_weight_init",),
    "comfy.clip_model": ("CLIPTextModel",),
    "comfy.sd1_clip": (),
    "comfy.ldm.models.autoencoder": ("AutoencoderKL",),
    "comfy.ldm.modules.diffusionmodules.openaimodel": ("UNetModel",),
}

VAE_INSTANCE_ATTRIBUTES = ("first_stage_model", "first_stage_model.decoder", "first_stage_model.decoder.conv_out",
                           "memory_used_decode", "output_channels", "vae_dtype", "latent_dim", "patcher",
                           "process_output", "upscale_ratio", "output_device", "device")


def _resolve(root, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def missing_symbols() -> list[str]:
    """`module:name` for every listed symbol the running ComfyUI lacks (empty when all resolve)."""
    missing = []
    for module_name, names in CORE_SYMBOLS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name} (module)")
            continue
        for name in names:
            try:
                _resolve(module, name)
            except AttributeError:
                missing.append(f"{module_name}:{name}")
    return missing


def missing_vae_attributes(vae) -> list[str]:
    """VAE_INSTANCE_ATTRIBUTES that the VAE object `vae` lacks."""
    missing = []
    for name in VAE_INSTANCE_ATTRIBUTES:
        try:
            _resolve(vae, name)
        except AttributeError:
            missing.append(name)
    return missing


def listed(path: str) -> bool:
    """Whether `path` (module.name...) is one of CORE_SYMBOLS, inside one (an attribute of a listed name), on
    the way to one (`io` for `io.Schema`), or a listed module itself."""
    for module_name, names in CORE_SYMBOLS.items():
        if path == module_name:
            return True
        if path.startswith(module_name + "."):
            rest = path[len(module_name) + 1:]
            if any(rest == n or rest.startswith(n + ".") or n.startswith(rest + ".") for n in names):
                return True
    return False
