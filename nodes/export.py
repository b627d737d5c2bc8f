"""Transparent export and alpha-convention nodes: save RGBA PNG, preview, join and split alpha.

Convention (models/alpha.py): sockets named `alpha` carry opacity (1 = opaque object); sockets named
`transparency_mask` carry core's LoadImage / JoinImageWithAlpha convention (1 = transparent).
"""
from __future__ import annotations

import json
import os
import re
import time
from enum import Enum

import torch
from comfy_api.latest import io, ui

from ..models.alpha import checkerboard, join_alpha, over, parse_hex_color, split_alpha, trim_to_alpha
from ..models.atomic import write_all_atomic
from ..models.png import encode_png
from ._alpha_sockets import alpha_inputs, alpha_output, transparency_mask_output
from ._schema import CATEGORY, enum_options, enum_value, schema

FAMILY = f"{CATEGORY}/io"


class BitDepth(str, Enum):
    EIGHT = "8"
    SIXTEEN = "16"


class Backdrop(str, Enum):
    CHECKERBOARD = "checkerboard"
    COLOR = "color"
    TRANSPARENT = "transparent"


IMAGE_TIP = "IMAGE with 3 (RGB), 4 (straight RGBA) or 1 (grey) channels."


NAME_MAX = 255           # bytes in one file or folder name on common file systems
NAME_RESERVE = 24        # room the saved name adds to the prefix: "_00001_" + "_matte" + ".png" (and more digits)
_DATE_TOKEN = re.compile(r"%date:([^%]*)%")
_DATE_PARTS = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


def format_date(fmt: str, now: time.struct_time) -> str:
    """The frontend's %date:FORMAT% rule: yyyy, yy, MM/M, dd/d, hh/h (24 h), mm/m, ss/s."""
    values = {"d": now.tm_mday, "M": now.tm_mon, "h": now.tm_hour, "m": now.tm_min, "s": now.tm_sec}

    def part(match) -> str:
        text = match.group(0)
        if text == "yyyy":
            return f"{now.tm_year:04}"
        if text == "yy":
            return f"{now.tm_year % 100:02}"
        if text[0] in values:
            return str(values[text[0]]).zfill(len(text))
        return text
    return _DATE_PARTS.sub(part, fmt)


def expand_filename_tokens(prefix: str, now: time.struct_time | None = None) -> str:
    """%date:FORMAT% tokens filled in here, so they work from every client (the page fills them only for
    core's own save nodes; API clients never). %year%, %width% ... are filled by core's folder_paths."""
    now = time.localtime() if now is None else now
    return _DATE_TOKEN.sub(lambda m: format_date(m.group(1), now), str(prefix))


def _check_name_parts(prefix: str, original: str) -> None:
    if "\0" in prefix:
        raise ValueError(f"filename_prefix {original!r} contains a NUL byte; remove it")
    parts = [p for p in prefix.replace("\\", "/").split("/") if p]
    for i, part in enumerate(parts):
        limit = NAME_MAX - (NAME_RESERVE if i == len(parts) - 1 else 0)
        size = len(part.replace("%batch_num%", "9999").encode("utf-8", "surrogatepass"))
        if size > limit:
            raise ValueError(f"filename_prefix part {part[:40]!r}... is {size} bytes long; file and folder names "
                             f"may have at most {limit} bytes here (the counter and '.png' are added): shorten it")


def _resolve_output_path(filename_prefix: str, output_dir: str) -> str:
    """Reject prefixes that would leave the output folder, with a message that says what to write."""
    prefix = expand_filename_tokens(str(filename_prefix).strip())
    if not prefix:
        raise ValueError("filename_prefix is empty; write a name such as 'diffumatting/asset'")
    _check_name_parts(prefix, filename_prefix)
    if os.path.isabs(prefix) or prefix.startswith(("~", "\\")):
        raise ValueError(f"filename_prefix {filename_prefix!r} is an absolute path; write a path relative to "
                         f"ComfyUI's output folder such as 'diffumatting/asset'")
    root = os.path.realpath(output_dir)
    target = os.path.realpath(os.path.join(root, prefix))
    if os.path.commonpath([root, target]) != root or target == root:
        raise ValueError(f"filename_prefix {filename_prefix!r} points outside ComfyUI's output folder; remove "
                         f"'..' parts and write a relative name such as 'diffumatting/asset'")
    return prefix


def _stem(name: str, index: int, counter: int) -> str:
    return f"{name.replace('%batch_num%', str(index))}_{counter + index:05}_"


def free_counter(folder: str, name: str, counter: int, count: int) -> int:
    """The first counter >= `counter` (core's) past every file this name already wrote, %batch_num% filled
    in: core's own scan looks for the literal token and would start at 1 again, overwriting a run's files."""
    names = {name.replace("%batch_num%", str(i)) for i in range(count)}
    pattern = re.compile(r"(?P<name>.*)_(?P<n>\d+)_(?:_matte)?\.png$")
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        m = pattern.match(entry)
        if m and m.group("name") in names:
            counter = max(counter, int(m.group("n")) + 1)
    return counter


def _png_text(cls) -> dict[str, str]:
    """prompt + workflow metadata, as core's SaveImage embeds them (unless --disable-metadata)."""
    from comfy.cli_args import args

    text = {}
    hidden = getattr(cls, "hidden", None)
    if args.disable_metadata or hidden is None:
        return text
    if hidden.prompt is not None:
        text["prompt"] = json.dumps(hidden.prompt)
    if hidden.extra_pnginfo:
        for key, value in hidden.extra_pnginfo.items():
            text[str(key)] = json.dumps(value)
    return text


class SaveRGBA(io.ComfyNode):
    """Save transparent PNGs (straight alpha, 8 or 16 bit) into ComfyUI's output folder."""

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingSaveRGBA",
            display_name="Save Transparent PNG (RGBA)",
            category=FAMILY,
            description="Saves each image as a transparent PNG with straight (not premultiplied) alpha, the "
                        "prompt and workflow embedded as core's Save Image does, in the output folder with "
                        "core's counter naming. Optional trim to the object and separate matte file.",
            search_aliases=["save png alpha", "save transparent", "export rgba", "save matte", "save cutout"],
            is_output_node=True,
            inputs=[
                io.Image.Input("image", tooltip="Image to save. " + IMAGE_TIP + " A 4th channel is used as "
                               "alpha unless `alpha` or `transparency_mask` is connected."),
                io.String.Input("filename_prefix", default="DiffuMatting/asset",
                                tooltip="File name prefix, relative to ComfyUI's output folder; subfolders "
                                        "allowed, '..' and absolute paths are refused. Tokens: "
                                        "%date:yyyy-MM-dd% (also hh, mm, ss), %year% %month% %day%, "
                                        "%width% %height%, %batch_num%, and in the page %Node.widget%."),
                io.Combo.Input("bit_depth", options=enum_options(BitDepth), default=BitDepth.EIGHT.value,
                               tooltip="8 bits per channel (small files) or 16 (smooth gradients, for "
                                       "compositing and print)."),
                io.Boolean.Input("trim", default=False,
                                 tooltip="Crop each image to its alpha's bounding box (plus padding)."),
                io.Int.Input("padding", default=8, min=0, max=4096,
                             tooltip="Transparent pixels kept around the object when trimming."),
                io.Boolean.Input("save_matte", default=False,
                                 tooltip="Also write the alpha as a grey PNG beside each image "
                                         "(<name>_matte.png), white = opaque."),
                *alpha_inputs(),
            ],
            outputs=[],
        )

    # Validators name only the inputs they check: ComfyUI skips its own min/max/option checks for every
    # input a validator names (and for all of them when it takes **kwargs), and repeats its message once
    # per named input.
    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        if filename_prefix is not None:
            import folder_paths

            try:
                _resolve_output_path(filename_prefix, folder_paths.get_output_directory())
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, image, filename_prefix="DiffuMatting/asset", bit_depth="8", trim=False, padding=8,
                save_matte=False, alpha=None, transparency_mask=None) -> io.NodeOutput:
        import folder_paths

        output_dir = folder_paths.get_output_directory()
        prefix = _resolve_output_path(filename_prefix, output_dir)
        rgba = join_alpha(image.float().cpu(), alpha, transparency_mask)
        bits = int(enum_value(BitDepth, bit_depth, "bit_depth").value)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, output_dir, rgba.shape[2], rgba.shape[1])
        counter = free_counter(folder, name, counter, rgba.shape[0])
        text = _png_text(cls)
        files, results = [], []
        for i, item in enumerate(rgba):
            if trim:
                item = trim_to_alpha(item, padding=int(padding))
            stem = _stem(name, i, counter)
            files.append((os.path.join(folder, stem + ".png"), encode_png(item.numpy(), bits, text)))
            results.append(ui.SavedResult(stem + ".png", subfolder, io.FolderType.output))
            if save_matte:
                files.append((os.path.join(folder, stem + "_matte.png"), encode_png(item[..., 3].numpy(), bits)))
        write_all_atomic(files)
        return io.NodeOutput(ui=ui.SavedImages(results))


class PreviewRGBA(io.ComfyNode):
    """Preview transparent images over a checkerboard or a colour."""

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingPreviewRGBA",
            display_name="Preview Transparent (checkerboard)",
            category=FAMILY,
            description="Shows images with alpha over a checkerboard or a chosen colour (nothing is saved to "
                        "the output folder) and outputs that composite.",
            search_aliases=["preview alpha", "checkerboard", "preview transparent", "preview matte"],
            is_output_node=True,
            inputs=[
                io.Image.Input("image", tooltip=IMAGE_TIP + " A 4th channel is used as alpha unless `alpha` or "
                               "`transparency_mask` is connected."),
                io.Combo.Input("backdrop", options=enum_options(Backdrop), default=Backdrop.CHECKERBOARD.value,
                               tooltip="checkerboard: grey squares; color: the colour below; transparent: show "
                                       "the RGBA as is (the page draws its own checkerboard under it)."),
                io.String.Input("color", default="#202020",
                                tooltip="Backdrop colour as #RRGGBB, used when backdrop is 'color'."),
                io.Int.Input("cell", default=16, min=1, max=512,
                             tooltip="Checkerboard square size in pixels."),
                *alpha_inputs(),
            ],
            outputs=[io.Image.Output("composite", display_name="composite",
                                     tooltip="The image over the backdrop (RGB), or the RGBA for 'transparent'.")],
        )

    @classmethod
    def validate_inputs(cls, color=None):
        if color is not None:
            try:
                parse_hex_color(color)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, image, backdrop="checkerboard", color="#202020", cell=16, alpha=None,
                transparency_mask=None) -> io.NodeOutput:
        rgba = join_alpha(image.float(), alpha, transparency_mask)
        mode = enum_value(Backdrop, backdrop, "backdrop")
        if mode is Backdrop.TRANSPARENT:
            out = rgba
        elif mode is Backdrop.COLOR:
            out = over(rgba, torch.tensor(parse_hex_color(color)))
        else:
            out = over(rgba, checkerboard(rgba.shape[1], rgba.shape[2], int(cell), device=rgba.device))
        out = out.cpu()
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls))


class JoinAlpha(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingJoinAlpha",
            display_name="Join Image + Alpha (RGBA)",
            category=FAMILY,
            description="Makes a straight RGBA IMAGE from an image and either an opacity `alpha` (this pack, "
                        "segmenters) or a core-style `transparency_mask` (LoadImage, SplitImageWithAlpha): "
                        "no InvertMask needed either way.",
            search_aliases=["join alpha", "add alpha", "rgba", "merge mask", "apply alpha"],
            inputs=[
                io.Image.Input("image", tooltip=IMAGE_TIP),
                *alpha_inputs(),
            ],
            outputs=[io.Image.Output("rgba", display_name="rgba",
                                     tooltip="IMAGE with 4 channels, straight alpha (1 = opaque).")],
        )

    @classmethod
    def execute(cls, image, alpha=None, transparency_mask=None) -> io.NodeOutput:
        if alpha is None and transparency_mask is None:
            raise ValueError("Join Image + Alpha needs `alpha` (1 = opaque) or `transparency_mask` "
                             "(1 = transparent, from LoadImage); connect one of them")
        return io.NodeOutput(join_alpha(image, alpha, transparency_mask))


class SplitAlpha(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingSplitAlpha",
            display_name="Split RGBA (image, alpha, transparency mask)",
            category=FAMILY,
            description="Splits an IMAGE into RGB and its alpha in both conventions. RGB or grey inputs count "
                        "as fully opaque.",
            search_aliases=["split alpha", "extract alpha", "get mask", "rgba to mask"],
            inputs=[io.Image.Input("image", tooltip=IMAGE_TIP)],
            outputs=[
                io.Image.Output("rgb", display_name="rgb", tooltip="The colour channels (straight)."),
                alpha_output(),
                transparency_mask_output(),
            ],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        return io.NodeOutput(*split_alpha(image))


NODES = [SaveRGBA, PreviewRGBA, JoinAlpha, SplitAlpha]
