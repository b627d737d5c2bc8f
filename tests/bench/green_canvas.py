"""Green canvas and green protection, measured in latent space on the tiny SD1.5 checkpoint (CPU).

Peers measured in the same run: sampling without the green canvas (for the canvas) and the LoRA applied
without protection (for green protection). Distances are mean L2 (over the 4 latent channels, model
space) between each latent pixel and the key colour's latent, outside the object region ("bg") and inside
it ("centre"). The tiny model has random weights: the figures show the mechanism acts as designed, not
image quality on a real checkpoint.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402  registers the pack as `diffumatting`

REGION = dict(center_x=0.5, center_y=0.5, width=0.6, height=0.7, feather=0.15)
KEY = "#00b140"
SEEDS = range(4)


def main() -> int:
    import torch

    conftest.add_host_to_path()
    torch.set_num_threads(1)
    import comfy.sd
    import folder_paths
    from green_measure import background_distance, sample_latent

    from diffumatting.models.green_canvas import background_weight, hex_to_rgb
    from diffumatting.nodes import generate
    from diffumatting.nodes.lora import LoraStack
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint, write_random_lora

    tmp = Path(tempfile.mkdtemp(prefix="dm_bench_"))
    t0 = time.perf_counter()
    path = cached_tiny_sd15_checkpoint(tmp)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    load_s = time.perf_counter() - t0
    print(f"tiny checkpoint: build {build_s:.2f} s, core load {load_s:.2f} s, {path.stat().st_size / 1e6:.0f} MB")
    key = generate.key_colour_latent(vae, model, hex_to_rgb(KEY))

    print("\n== green canvas (3 euler steps, cfg 5, 64x64) vs. no canvas")
    off = [background_distance(sample_latent(model, clip, s), key, REGION) for s in SEEDS]
    bg_off, in_off = statistics.mean(d[0] for d in off), statistics.mean(d[1] for d in off)
    print(f"  off                      bg {bg_off:7.2f}  centre {in_off:7.2f}")
    for strength, end in ((0.5, 0.35), (0.8, 0.35), (1.0, 0.35), (0.8, 0.6)):
        on_model = generate.green_canvas_model(model, vae, KEY, strength, end, REGION, "fixed ellipse")
        on = [background_distance(sample_latent(on_model, clip, s), key, REGION) for s in SEEDS]
        bg, cen = statistics.mean(d[0] for d in on), statistics.mean(d[1] for d in on)
        print(f"  strength {strength:.1f} end {end:.2f}  bg {bg:7.2f} (x{bg / bg_off:.2f})  centre {cen:7.2f} "
              f"(x{cen / in_off:.2f})")

    print("\n== green protection (canvas 0.8/0.35 on, one random kohya LoRA at 1.0) vs. protection off")
    loras = tmp / "loras"
    names = []
    for i in range(2):
        names.append(write_random_lora(loras / f"style{i}.safetensors", seed=21 + i).name)
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
    canvas = generate.green_canvas_model(model, vae, KEY, 0.8, 0.35, REGION, "fixed ellipse")
    plain = {s: sample_latent(canvas, clip, s) for s in SEEDS}
    no_lora_bg = statistics.mean(background_distance(plain[s], key, REGION)[0] for s in SEEDS)
    print(f"  no LoRA                  bg {no_lora_bg:7.2f}")
    results = {}
    for p in (0.0, 0.5, 1.0):
        bgs, centre_change = [], []
        for name in names:
            # Both halves of the LoRA: the patched MODEL and the patched CLIP that encodes the prompt.
            styled, styled_clip = LoraStack.execute(canvas, clip, None, False, p, lora_1=name).result[:2]
            for s in SEEDS:
                lat = sample_latent(styled, styled_clip, s)
                bgs.append(background_distance(lat, key, REGION)[0])
                fg = background_weight(*lat.shape[-2:], **REGION) <= 0.5
                centre_change.append(float((lat - plain[s]).pow(2).sum(1).sqrt()[0][fg].mean()))
        results[p] = (statistics.mean(bgs), statistics.mean(centre_change))
    base_bg, base_change = results[0.0]
    for p, (bg, change) in results.items():
        print(f"  protection {p:.1f}           bg {bg:7.2f} (x{bg / base_bg:.2f})  LoRA's change in the centre "
              f"{change:7.2f} (x{change / base_change:.2f} of unprotected)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
