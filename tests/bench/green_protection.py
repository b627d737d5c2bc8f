"""Green token k/v protection vs. the LoRA alone and vs. damping all cross-attention, on the tiny SD1.5
checkpoint (CPU), with each stack's CLIP output used for the prompt (the text-encoder half applied).

The base model: the tiny checkpoint after a short fit of the paper's green-token attention loss on its
cross-attention query/key weights (tests/green_measure.fit_green_attention), so that, like a DiffuMatting
UNet's, its "green" token attends to the background of keyed images (a random model's map is at chance).
Measured on held-out placements and prompts, one euler step at denoise 0.4 (cfg 1):

- IoU: models.losses.attention_iou (the trainer's measure: map above its median vs. background) of the
  green token's attention, averaged over the cross-attention layers; "keep" = IoU / the base model's IoU.
- green left: |k,v(protected) - k,v(base)| / |k,v(LoRA) - k,v(base)| at the green token (0 = the LoRA's
  change there is removed); others moved: |k,v(protected) - k,v(LoRA)| / |k,v(LoRA) - k,v(base)| at every
  other token (0 = the LoRA's change there is kept). Over all layers, keys and values.
- map corr: Pearson correlation of the green token's map with the base model's map for the same input
  (mean over layers and samples; 1 = the base model's map).

Two LoRAs: a random "style" LoRA on every layer (UNet and CLIP, the test LoRAs' scale) and a random LoRA on
the cross-attention keys/values and the text encoder only, scale 1.5 (one that rewrites what the words,
"green" among them, mean to the image). The last line is machine-readable.
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

SEEDS = range(4)
FIT_STEPS = 60


def map_corr(records: dict, base: dict) -> float:
    """Mean over layers of the Pearson correlation between two records' green-token maps."""
    import torch

    out = []
    for layer, r in records.items():
        a, b = r["map"].flatten(), base[layer]["map"].flatten()
        out.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    return sum(out) / len(out)


def main() -> int:
    import torch

    conftest.add_host_to_path()
    torch.set_num_threads(1)
    import comfy.sd
    import folder_paths
    from green_measure import (GREEN_PROMPTS, HELD_OUT_PLACEMENTS, encode_green, fit_green_attention,
                               keyed_latent, kv_change, record_step, recorded_positions)

    from diffumatting.models.losses import attention_iou
    from diffumatting.nodes.lora import LoraStack
    from support.tiny_sd15 import _kohya_name_map, cached_tiny_sd15_checkpoint, random_kohya_lora, write_random_lora
    from diffumatting.training.tiny_checkpoint import save_safetensors_atomic

    tmp = Path(tempfile.mkdtemp(prefix="dm_bench_"))
    path = cached_tiny_sd15_checkpoint(tmp)
    loras = tmp / "loras"
    loras.mkdir()
    write_random_lora(loras / "style.safetensors", seed=21)
    names = {k: v for k, v in _kohya_name_map().items()
             if k.startswith("lora_te") or k.endswith(("attn2_to_k", "attn2_to_v"))}
    save_safetensors_atomic(random_kohya_lora(31, scale=1.5, name_map=names), loras / "words.safetensors", {})
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]

    t0 = time.perf_counter()
    first, last = fit_green_attention(model, clip, vae, steps=FIT_STEPS)
    print(f"base fit: {FIT_STEPS} steps of the green attention loss, {first:.3f} -> {last:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")
    held_out = [keyed_latent(vae, 64, r) for r in HELD_OUT_PLACEMENTS]

    def measure(m, c):
        ious, records = [], []
        for lat, alpha in held_out:
            for text in GREEN_PROMPTS:
                cond = encode_green(c, text)
                pos = recorded_positions(cond)
                for seed in SEEDS:
                    r = record_step(m, cond, pos, seed, lat)
                    mean_map = torch.stack([v["map"] for v in r.values()]).mean(0)
                    ious.append(float(attention_iou(mean_map, alpha)[0]))
                    records.append((r, pos))
        return ious, records

    base_iou, base_rec = measure(model, clip)
    print(f"\nbase model green-token IoU with the background: {statistics.mean(base_iou):.3f} "
          f"({len(base_iou)} placements x prompts x seeds)")
    summary = []
    for lora in ("style", "words"):
        print(f"\n== {lora}.safetensors (model and clip strength 1, protection 1)")
        rows = {"LoRA alone": {}, "all cross-attention": {"green_protection": 1.0},
                "green token k/v": {"green_protection": 1.0, "protection_mode": "green token k/v"}}
        out = {}
        for label, kw in rows.items():
            m, c, _ = LoraStack.execute(model, clip, lora_stack=None, model_only=False, lora_1=f"{lora}.safetensors",
                                        **{"green_protection": 0.0, **kw}).result
            out[label] = measure(m, c)
        alone = out["LoRA alone"][0]
        for label, (iou, rec) in out.items():
            keep = statistics.mean(iou) / statistics.mean(base_iou)
            diff = [a - b for a, b in zip(iou, alone)]
            corr = statistics.mean(map_corr(r[0], b[0]) for r, b in zip(rec, base_rec))
            line = f"  {label:20s} IoU {statistics.mean(iou):.3f}  keep {keep:.3f}  map corr {corr:.3f}"
            if label != "LoRA alone":
                sem = statistics.stdev(diff) / len(diff) ** 0.5
                pairs = [kv_change(b[0], l[0], p[0], b[1]) for b, l, p in zip(base_rec, out["LoRA alone"][1], rec)]
                green, others = max(g for g, _ in pairs), max(o for _, o in pairs)
                line += (f"  vs LoRA alone {statistics.mean(diff):+.3f} +- {sem:.3f}  green left {green:.2e}  "
                         f"others moved {others:.2e}")
                if label == "green token k/v":
                    alone_corr = statistics.mean(map_corr(r[0], b[0]) for r, b in zip(out["LoRA alone"][1], base_rec))
                    summary.append(f"{lora}_kv_corr={corr:.3f} {lora}_alone_corr={alone_corr:.3f} "
                                   f"{lora}_kv_keep={keep:.3f} {lora}_alone_keep="
                                   f"{statistics.mean(alone) / statistics.mean(base_iou):.3f} {lora}_green_left="
                                   f"{green:.1e} {lora}_others_moved={others:.1e}")
            print(line)
    print("\n" + " ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
