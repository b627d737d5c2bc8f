"""Artist asset export: trimmed transparent PNGs named after their prompt, and a contact sheet.

Shared by `make_dataset.py --assets` (factory/) and the Save Transparent Batch node (nodes/batch_export.py).
Plain numpy/torch, no ComfyUI. A name is made from the prompt's words only (letters and digits of any
script, joined by '-'), so it never holds a path separator, a dot or a control character and cannot leave
its folder; numbers make it unique in its folder.
"""
from __future__ import annotations

import os
import re
import unicodedata
from enum import Enum
from typing import Iterable

import numpy as np
import torch

from .alpha import trim_to_alpha
from .dataset_images import contact_sheet
from .png import encode_png
from .prompting import DEFAULT_GREEN_PHRASE, find_subsequence

STEM_CHARS = 60           # characters of the prompt kept in a file name
STEM_BYTES = 180          # and at most this many UTF-8 bytes (file names may hold 255; "-0001.png" and the
                          # atomic writer's temporary suffix need the rest)
FALLBACK_STEM = "prompt"  # a prompt without letters or digits
SHEET_STEM = "contact_sheet"  # never a prompt's stem: those hold no '_'


class PromptLines(str, Enum):
    """How a prompt text names a batch of images."""
    ONE_PER_LINE = "one per line"   # line i names image i; a single line names every image
    WHOLE_TEXT = "whole text"       # the whole text (all lines) names every image


def _words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", str(text)).lower()
    return "".join(c if c.isalnum() else " " for c in text).split()


def prompt_stem(prompt: str) -> str:
    """The file-name stem for a prompt: its lower-case words (any script) joined by '-'.

    'A Glass Bottle, studio light' -> 'a-glass-bottle-studio-light'. The green-screen phrase that Green Canvas
    Prompt appends is left out (its `prompt` output can name the files). Cut at STEM_CHARS characters and
    STEM_BYTES bytes; FALLBACK_STEM when the prompt has no letter or digit.
    """
    words, phrase = _words(prompt), _words(DEFAULT_GREEN_PHRASE)
    at = find_subsequence(words, phrase)
    if at:
        del words[at[0]:at[0] + len(phrase)]
    stem = "-".join(words)[:STEM_CHARS]
    while len(stem.encode("utf-8")) > STEM_BYTES:
        stem = stem[:-1]
    return stem.strip("-") or FALLBACK_STEM


def batch_prompts(text: str, count: int, mode: PromptLines = PromptLines.ONE_PER_LINE) -> list[str]:
    """The prompt of each of `count` images, from a prompt text (blank lines ignored in ONE_PER_LINE)."""
    text = "" if text is None else str(text)
    if not text.strip():
        raise ValueError("prompts is empty; type the prompt (or connect the text that went into the text "
                         "encoder): the files are named after it")
    if mode is PromptLines.WHOLE_TEXT:
        return [text.strip()] * count
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"prompts has {len(lines)} lines for a batch of {count} images; give one line per image, "
                         f"or one line for all of them, or set prompt_lines to '{PromptLines.WHOLE_TEXT.value}' "
                         f"when the text is one prompt written over several lines")
    return lines


def numbered_names(stems: list[str], taken: Iterable[str], digits: int = 3) -> list[str]:
    """`<stem>-<n>.png` for each stem, numbered past every `<stem>-<n>.png` in `taken` (a folder's file
    names) and past the earlier stems of the list: the names are new and distinct."""
    pattern = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)\.png$")
    last: dict[str, int] = {}
    for name in taken:
        m = pattern.match(name.lower())  # case-insensitive file systems: 'Robot-002.png' takes robot's 2
        if m:
            last[m.group("stem")] = max(last.get(m.group("stem"), 0), int(m.group("n")))
    out = []
    for stem in stems:
        last[stem] = last.get(stem, 0) + 1
        out.append(f"{stem}-{last[stem]:0{digits}d}.png")
    return out


def trimmed_asset(rgba: torch.Tensor | np.ndarray, padding: int, threshold: float = 0.0) -> np.ndarray:
    """One straight RGBA image (H,W,4) cut to its alpha's bounding box plus `padding` transparent pixels."""
    rgba = torch.as_tensor(np.asarray(rgba, np.float32)) if not isinstance(rgba, torch.Tensor) else rgba.float()
    return trim_to_alpha(rgba.cpu(), padding=int(padding), threshold=float(threshold)).numpy()


def asset_png(rgba, padding: int, bits: int, threshold: float = 0.0,
              text: dict[str, str] | None = None) -> tuple[bytes, np.ndarray]:
    """(PNG bytes, the trimmed RGBA) of one asset."""
    trimmed = trimmed_asset(rgba, padding, threshold)
    return encode_png(trimmed, bits, text), trimmed


def assets_sheet(assets: list[np.ndarray], cell: int = 128) -> np.ndarray:
    """The contact sheet (RGB float) of trimmed RGBA assets, each over a checkerboard."""
    return contact_sheet([(a[..., :3], a[..., 3]) for a in assets], cell=cell)


def output_subfolder(folder: str, root: str) -> tuple[str, str]:
    """(absolute path, '/'-separated path relative to `root`) of a user-given subfolder of `root`.

    Refuses (ValueError naming the value and the fix) empty names, NUL bytes, absolute or '~' paths, parts
    longer than a file name may be, and anything that resolves outside `root` ('..', links leading out).
    """
    given = "" if folder is None else str(folder)
    name = given.strip().replace("\\", "/")
    example = "write a relative folder name such as 'DiffuMatting/assets'"
    if not name.strip("/"):
        raise ValueError(f"folder {given!r} is empty; {example}")
    if "\0" in name:
        raise ValueError(f"folder {given!r} contains a NUL byte; {example}")
    if name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"folder {given!r} is an absolute path; {example} (inside ComfyUI's output folder)")
    long = [p for p in name.split("/") if len(p.encode("utf-8", "surrogatepass")) > 255]
    if long:
        raise ValueError(f"folder part {long[0][:40]!r}... is longer than 255 bytes; shorten it")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([real_root, target]) != real_root or target == real_root:
        raise ValueError(f"folder {given!r} points outside ComfyUI's output folder; remove '..' parts (and links "
                         f"that lead out) and {example}")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"folder {given!r} is a file in ComfyUI's output folder; {example}")
    return target, os.path.relpath(target, real_root).replace(os.sep, "/")
