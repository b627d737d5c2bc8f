"""GreenPost and the matting head on a CUDA GPU against the CPU: agreement, fp16/bf16 inputs, time, memory.

    python scripts/gpu_keying_check.py --make-sample DIR     # here (needs OpenCV): DIR/photo1024.npy, alpha1024.npy
    python3 scripts/gpu_keying_check.py --sample DIR         # on the GPU machine (torch, numpy, safetensors)

The sample is the keying benchmark's speed image (tests/bench/keying.py: a procedural object shot over the
photographic backing of tests/bench/photo_backing.py), 1024 x 1024, 8-bit. Prints one JSON line per path
(classical, refiner) and one line per matting-head precision; the README's Performance table quotes them.
Imports only the pack's models/ (plain torch), so ComfyUI is not needed on the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
import _package  # noqa: E402  the pack as `diffumatting` without ComfyUI (see _package.py)

_package.register()


def make_sample(out: Path) -> None:
    import numpy as np

    sys.path[:0] = [str(ROOT / "tests" / "bench"), str(ROOT / "tests")]
    import keying

    x = keying._speed_sample(1024)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "photo1024.npy", (np.clip(x["image"], 0, 1) * 255 + 0.5).astype(np.uint8))
    np.save(out / "alpha1024.npy", (x["alpha"] * 65535 + 0.5).astype(np.uint16))


def check(sample: Path, device: str, big: int = 4096, head_size: int = 1024, repeats: int = 5) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from diffumatting.models import greenpost as gp
    from diffumatting.models import matting_head as mh

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn, n=repeats):
        fn()
        sync()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            sync()
            ts.append(time.perf_counter() - t)
        return out, statistics.median(ts)

    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    img = torch.from_numpy(np.load(sample / "photo1024.npy")).float().div(255)[None]
    gt = torch.from_numpy(np.load(sample / "alpha1024.npy").astype(np.float32) / 65535)
    for refiner in ("off", "greenpost_refiner"):
        opt = gp.GreenPostOptions(refiner=refiner)
        t = time.perf_counter()
        fg_cpu, a_cpu = gp.greenpost(img, options=opt)
        r = {"path": refiner, "cpu_s_1mp": round(time.perf_counter() - t, 3)}
        (fg, a), r["device_s_1mp"] = timed(lambda: gp.greenpost(img.to(dev), options=opt))
        a, fg = a.cpu(), fg.cpu()
        r["max_alpha_diff_vs_cpu"] = float((a - a_cpu).abs().max())
        r["frac_8bit_alpha_diff_vs_cpu"] = float(((a * 255).round() != (a_cpu * 255).round()).float().mean())
        r["max_fg_diff_vs_cpu"] = float((fg - fg_cpu).abs().max())
        r["sad_cpu"], r["sad_device"] = (round(float((x[0] - gt).abs().sum()) / 1000, 3) for x in (a_cpu, a))
        for dt in (torch.float16, torch.bfloat16):
            a_half = gp.greenpost(img.to(dev, dt), options=opt)[1]
            a_same = gp.greenpost(img.to(dt).float().to(dev), options=opt)[1]
            r[f"{str(dt)[6:]}_input_max_diff_vs_fp32_of_same_values"] = float((a_half - a_same).abs().max())
        big_img = F.interpolate(img.permute(0, 3, 1, 2).to(dev), size=(big, big), mode="bicubic")
        big_img = big_img.clamp(0, 1).permute(0, 2, 3, 1).contiguous()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        _, r[f"device_s_{big}px"] = timed(lambda: gp.greenpost(big_img, options=opt), n=min(3, repeats))
        if dev.type == "cuda":
            r[f"peak_gib_{big}px_above_input"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 3)
        del big_img
        print(json.dumps(r), flush=True)
    head = mh.MattingHead(mh.HeadConfig()).reset_parameters(0).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    fine = torch.randn(1, 128, head_size, head_size, device=dev, generator=g)
    coarse = torch.randn(1, 256, head_size // 2, head_size // 2, device=dev, generator=g)
    with torch.no_grad():
        a32 = head(fine, [coarse])
        for dt in (torch.float16, torch.bfloat16):
            h = mh.MattingHead(head.config).to(dev, dt)
            h.load_state_dict(head.state_dict())
            a_h, t_h = timed(lambda: h(fine.to(dt), [coarse.to(dt)]))
            print(json.dumps({"head": str(dt)[6:], "alpha_dtype": str(a_h.dtype)[6:], f"s_{head_size}px": round(t_h, 4),
                              "max_diff_vs_fp32": float((a_h.float() - a32).abs().max())}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-sample", type=Path, metavar="DIR", help="write the 1024 px sample into DIR and exit")
    ap.add_argument("--sample", type=Path, metavar="DIR", help="folder with photo1024.npy and alpha1024.npy")
    ap.add_argument("--device", default="cuda", help="torch device to check against the CPU (default cuda)")
    ap.add_argument("--big", type=int, default=4096, help="side of the upscaled image timed on the device (default "
                                                          "4096: 16 MP)")
    ap.add_argument("--head-size", type=int, default=1024, help="matting head test size in pixels (default 1024)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement, median (default 5)")
    args = ap.parse_args(argv)
    for flag, v, lo in (("--big", args.big, 64), ("--head-size", args.head_size, 16), ("--repeats", args.repeats, 1)):
        if v < lo:
            ap.error(f"{flag} {v}: expected at least {lo}")
    if args.make_sample:
        make_sample(args.make_sample)
        return 0
    if args.sample is None or not (args.sample / "photo1024.npy").is_file():
        ap.error(f"--sample {args.sample}: expected a folder holding photo1024.npy (make it with --make-sample DIR)")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA GPU here; run it on a GPU machine or pass --device cpu")
    check(args.sample, args.device, args.big, args.head_size, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
