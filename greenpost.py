"""Headless GreenPost: key every green-screen image in a folder to transparent PNGs.

    python greenpost.py INPUT_DIR OUTPUT_DIR [options]

Every .png/.jpg/.jpeg/.webp file directly in INPUT_DIR becomes OUTPUT_DIR/<same stem>.png: RGBA, 8 bit,
straight (not premultiplied) alpha, the same size, written atomically. A file that cannot be read is
reported by name on stderr and the rest are still keyed; the exit status is 1 if any file failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _package  # this script's folder is on sys.path (Python puts it there), see _package.py

_package.register()

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def build_parser() -> argparse.ArgumentParser:
    from diffumatting.models.cli_args import number
    from diffumatting.models.greenpost import OPTION_DOCS, RefinerChoice
    from diffumatting.models.image_file import BYTES_PER_PIXEL

    def unit(flag):
        return number(flag, 0, 1)

    p = argparse.ArgumentParser(prog="greenpost.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input_dir", type=Path, help="folder with the green-screen images (png, jpg, jpeg, webp)")
    p.add_argument("output_dir", type=Path,
                   help="folder for the transparent PNGs (created if missing; must differ from INPUT_DIR)")
    p.add_argument("--key-color", default=None, metavar="#RRGGBB",
                   help="backing colour to key, e.g. #1fb83a; default: estimated from each image. "
                        + OPTION_DOCS["key_color"].split(". ", 1)[1])
    p.add_argument("--spill-strength", type=unit("--spill-strength"), default=1.0, metavar="0..1",
                   help=OPTION_DOCS["spill_strength"] + " Default 1.")
    p.add_argument("--edge-detail", type=unit("--edge-detail"), default=0.5, metavar="0..1",
                   help=OPTION_DOCS["edge_detail"] + " Default 0.5.")
    p.add_argument("--clip-black", type=unit("--clip-black"), default=0.0, metavar="0..1",
                   help=OPTION_DOCS["clip_black"] + " Default 0.")
    p.add_argument("--clip-white", type=unit("--clip-white"), default=1.0, metavar="0..1",
                   help=OPTION_DOCS["clip_white"] + " Default 1.")
    p.add_argument("--refiner", choices=[c.value for c in RefinerChoice], default=RefinerChoice.SHIPPED.value,
                   help=OPTION_DOCS["refiner"] + " Pass --refiner off for the classical key alone.")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing OUTPUT_DIR/<stem>.png files (default: refuse to start if any exists)")
    p.add_argument("--max-megapixels", type=number("--max-megapixels", 0, lo_open=True, example=64), default=None, metavar="MP",
                   help="refuse images above this many megapixels, read from the file's header before decoding "
                        "(default: what the memory available now can key, about "
                        f"{BYTES_PER_PIXEL} bytes per pixel)")
    p.add_argument("--threads", type=number("--threads", 0, kind=int), default=0, metavar="N",
                   help="CPU threads for torch (default 0: torch's own choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (errors are still printed)")
    return p


def parse_args(argv):
    from diffumatting.models.alpha import parse_hex_color
    from diffumatting.models.greenpost import GreenPostOptions

    p = build_parser()
    a = p.parse_args(argv)
    if not a.input_dir.exists():
        p.error(f"INPUT_DIR {a.input_dir} does not exist; give the folder that holds the green-screen images")
    if not a.input_dir.is_dir():
        p.error(f"INPUT_DIR {a.input_dir} is a file, not a folder; give the folder that holds it")
    if a.output_dir.exists() and not a.output_dir.is_dir():
        p.error(f"OUTPUT_DIR {a.output_dir} is a file; give a folder (it is created if missing)")
    if a.output_dir.resolve() == a.input_dir.resolve():
        p.error(f"OUTPUT_DIR is the same folder as INPUT_DIR ({a.input_dir}); the PNGs would replace the "
                f"inputs: give another folder")
    key = None
    if a.key_color is not None:
        try:
            key = parse_hex_color(a.key_color)
        except ValueError as e:
            p.error(f"--key-color: {e}")
    try:
        a.options = GreenPostOptions(key_color=key, spill_strength=a.spill_strength, edge_detail=a.edge_detail,
                                     clip_black=a.clip_black,
                                     clip_white=a.clip_white, refiner=a.refiner)
    except ValueError as e:
        p.error(str(e))
    a.files = sorted(f for f in a.input_dir.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
    if not a.files:
        p.error(f"INPUT_DIR {a.input_dir} holds no .png/.jpg/.jpeg/.webp files")
    if not a.overwrite:
        clash = [f.stem + ".png" for f in a.files if (a.output_dir / (f.stem + ".png")).exists()]
        if clash:
            p.error(f"OUTPUT_DIR already has {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}; pass "
                    f"--overwrite to replace them or choose an empty folder")
    stems = {}
    for f in a.files:
        stems.setdefault(f.stem, []).append(f.name)
    dup = [names for names in stems.values() if len(names) > 1]
    if dup:
        p.error(f"files {', '.join(dup[0])} would both write {Path(dup[0][0]).stem}.png; rename one of them")
    try:
        a.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"cannot create OUTPUT_DIR {a.output_dir} ({e.strerror or e}); give a folder you can write to")
    if not os.access(a.output_dir, os.W_OK | os.X_OK):
        p.error(f"OUTPUT_DIR {a.output_dir} is not writable; give a folder you can write to or fix its permissions")
    return a


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.enabled, self.width, self.done = total, enabled, width, 0
        self.start = time.monotonic()

    def step(self, name: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / max(1, self.total)
        bar = "#" * int(frac * self.width)
        el = time.monotonic() - self.start
        eta = el / self.done * (self.total - self.done)
        sys.stderr.write(f"\r[{bar:<{self.width}}] {self.done}/{self.total} {el:5.1f}s eta {eta:5.1f}s "
                         f"{name[:30]:<30}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def key_file(path: Path, out_dir: Path, options, max_pixels: int | None = None) -> Path:
    import numpy as np
    import torch
    from PIL import Image

    from diffumatting.models.atomic import atomic_path
    from diffumatting.models.greenpost import greenpost
    from diffumatting.models.image_file import read_image

    arr = read_image(path, max_pixels=max_pixels)
    warnings = []
    fg, alpha = greenpost(torch.from_numpy(arr)[None], None, options, warnings=warnings)
    for msg in warnings:
        sys.stderr.write(f"\nwarning: {path.name}: {msg}\n")
    rgba = torch.cat([fg[0], alpha[0, ..., None]], -1).clamp(0, 1).numpy()
    out = out_dir / f"{path.stem}.png"
    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(tmp, format="PNG")
    return out


def main(argv=None) -> int:
    try:
        return run(parse_args(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted (Ctrl-C): the images written so far are complete, no partial file is "
                         "left; run again with --overwrite to redo them\n")
        return 130


def run(args) -> int:
    import torch

    from diffumatting.models.image_file import default_max_pixels

    if args.threads:
        torch.set_num_threads(args.threads)
    max_pixels = default_max_pixels() if args.max_megapixels is None else int(args.max_megapixels * 1e6)
    bar = Progress(len(args.files), enabled=not args.quiet)
    failed = []
    for f in args.files:
        try:
            key_file(f, args.output_dir, args.options, max_pixels)
        except (ValueError, OSError) as e:  # one bad file must not stop the rest
            failed.append(f.name)
            sys.stderr.write(f"\nerror: {f.name}: {e}\n")
        except Exception as e:
            failed.append(f.name)
            sys.stderr.write(f"\nerror: {f.name}: {type(e).__name__}: {e}\n")
        bar.step(f.name)
    ok = len(args.files) - len(failed)
    print(f"{ok} of {len(args.files)} images keyed into {args.output_dir}" +
          (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
