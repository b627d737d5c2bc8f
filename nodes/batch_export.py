"""Batch asset export: a batch of transparent images saved as trimmed PNGs named after their prompt, plus a
contact sheet over a checkerboard (the node form of `make_dataset.py --assets`; both use models/asset_export)."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from ..models.alpha import join_alpha
from ..models.asset_export import (SHEET_STEM, PromptLines, asset_png, assets_sheet, batch_prompts, numbered_names,
                                   output_subfolder, prompt_stem)
from ..models.atomic import write_all_atomic
from ..models.png import encode_png
from ._schema import enum_options, enum_value, schema
from ._alpha_sockets import alpha_inputs
from .export import FAMILY, BitDepth, _png_text, expand_filename_tokens


def _target_folder(folder: str) -> tuple[str, str]:
    import folder_paths

    return output_subfolder(expand_filename_tokens(folder), folder_paths.get_output_directory())


def _taken_names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


class SaveTransparentBatch(io.ComfyNode):
    """Save a batch as trimmed transparent PNGs named after the prompt, and its contact sheet."""

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingSaveTransparentBatch",
            display_name="Save Transparent Batch (named by prompt)",
            category=FAMILY,
            description="Saves every image of a batch as a transparent PNG cut to its object (straight alpha, "
                        "8 or 16 bit), named after its prompt (a-glass-bottle-001.png, numbered past the files "
                        "already in the folder), plus a contact sheet of the batch over a checkerboard. The "
                        "whole batch is written or nothing is. Shows the sheet and the files.",
            search_aliases=["batch export", "export assets", "save cutouts", "contact sheet", "save by prompt",
                            "sprite export", "asset folder"],
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The batch to save: straight RGBA (a 4th channel is the alpha) "
                               "or RGB/grey with `alpha` or `transparency_mask` connected."),
                io.String.Input("prompts", multiline=True, default="",
                                placeholder="a glass bottle\n(one line per image, or one line for all)",
                                tooltip="The prompt(s) the files are named after: one line per image, or one "
                                        "line for the whole batch (or connect Green Canvas Prompt's `prompt` "
                                        "output). Only the prompt's words are kept in the name, without the "
                                        "green-screen phrase."),
                io.Combo.Input("prompt_lines", options=enum_options(PromptLines),
                               default=PromptLines.ONE_PER_LINE.value,
                               tooltip="'one per line': line i names image i (one line names them all); "
                                       "'whole text': the whole text names every image (a prompt written over "
                                       "several lines)."),
                io.String.Input("folder", default="DiffuMatting/assets",
                                tooltip="Folder inside ComfyUI's output folder (subfolders allowed, created when "
                                        "missing; '..' and absolute paths are refused). %date:yyyy-MM-dd% "
                                        "tokens are filled in."),
                io.Combo.Input("bit_depth", options=enum_options(BitDepth), default=BitDepth.EIGHT.value,
                               tooltip="8 bits per channel (small files) or 16 (smooth gradients, for "
                                       "compositing and print)."),
                io.Int.Input("padding", default=8, min=0, max=4096,
                             tooltip="Transparent pixels kept around the object after trimming."),
                io.Float.Input("trim_threshold", default=0.0, min=0.0, max=0.5, step=0.001,
                               tooltip="Alpha at or below this counts as empty when trimming; raise it (e.g. "
                                       "0.01) when a faint haze keeps the whole frame."),
                io.Boolean.Input("save_contact_sheet", default=True,
                                 tooltip="Also write contact_sheet-NNN.png (the batch over a checkerboard) "
                                         "beside the files."),
                *alpha_inputs(),
            ],
            outputs=[io.Image.Output("contact_sheet", display_name="contact_sheet",
                                     tooltip="The batch's trimmed images over a checkerboard, in a grid (RGB).")],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        """The folder, at queue time (ComfyUI repeats a validator's message once per input it names, so it
        names only this one; the prompts are checked when the batch size is known)."""
        if folder is not None:
            try:
                _target_folder(folder)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, images, prompts="", prompt_lines=PromptLines.ONE_PER_LINE.value, folder="DiffuMatting/assets",
                bit_depth=BitDepth.EIGHT.value, padding=8, trim_threshold=0.0, save_contact_sheet=True, alpha=None,
                transparency_mask=None) -> io.NodeOutput:
        target, subfolder = _target_folder(folder)
        rgba = join_alpha(images.float().cpu(), alpha, transparency_mask)
        lines = enum_value(PromptLines, prompt_lines, "prompt_lines")
        bits = int(enum_value(BitDepth, bit_depth, "bit_depth").value)
        stems = [prompt_stem(p) for p in batch_prompts(prompts, rgba.shape[0], lines)]
        taken = _taken_names(target)
        names = numbered_names(stems, taken)
        text = _png_text(cls)
        files, trimmed = [], []
        for name, item in zip(names, rgba):
            data, asset = asset_png(item, int(padding), bits, float(trim_threshold), text)
            files.append((os.path.join(target, name), data))
            trimmed.append(asset)
        sheet = assets_sheet(trimmed)
        shown = list(names)
        if save_contact_sheet:
            sheet_name = numbered_names([SHEET_STEM], taken)[0]
            files.append((os.path.join(target, sheet_name), encode_png(sheet, 8, text)))
            shown.insert(0, sheet_name)
        try:
            write_all_atomic(files)
        except OSError as e:
            raise RuntimeError(f"could not write the batch into {target}: {e.strerror or e}; nothing was saved. Free "
                               f"disk space or choose another folder") from None
        results = [ui.SavedResult(n, subfolder, io.FolderType.output) for n in shown]
        return io.NodeOutput(torch.from_numpy(sheet)[None], ui=ui.SavedImages(results))


NODES = [SaveTransparentBatch]
