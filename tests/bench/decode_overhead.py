"""Decode time and peak memory of DiffuMatting VAE Decode (matting head, one decoder pass) over core's VAEDecode.

Both run on the same full-size SD1.x KL-f8 VAE architecture (ComfyUI's own AutoencoderKL: ch 128,
ch_mult 1,2,4,4, 2 res blocks; seeded random weights, which time the same as trained ones), on CPU, in one
run of this script: 512x512 by default (minutes on a 2-core machine), 512x512 and 1024x1024 with --full.
The matting decode goes through core's own VAE.decode with the head's hooks attached for the call. GreenPost refinement is off (it is a separate
step with its own cost); the head, the hooks and the node's extra outputs (alpha, rgba, transparency mask)
are all included.

Time: one subprocess per size builds the VAE once, warms both paths up, then alternates core / head
decodes `--repeats` times; the figure is median(head) / median(core).

Peak memory: one fresh subprocess per (path, size, repeat). After building the VAE and a small warm-up
decode, it resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs), records the current
RSS, decodes once, and reads the peak (VmHWM in /proc/self/status). The decode's working memory is
peak - RSS before (freed heap pages are handed back with malloc_trim first); mem_ratio is the larger of the two sizes' median(head) / median(core) working memory.
(tracemalloc cannot see torch's allocations; VmHWM counts every resident page of the process.)

Last line (machine-readable): `ratio_512=X mem_ratio=Z`, with --full `ratio_512=X ratio_1024=Y mem_ratio=Z`
(mem_ratio: the largest over the sizes run). Targets: X, Y <= 1.10 and Z <= 1.10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = (512,)
FULL_SIZES = (512, 1024)


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # registers the pack as `diffumatting`; puts the host on sys.path below

    conftest.add_host_to_path()
    torch.set_num_threads(threads)
    import nodes as host_nodes  # core's VAEDecode
    from diffumatting.models.matting_head import HeadConfig, LoadedHead, MattingHead
    from diffumatting.nodes.matting import MattingVAEDecode
    from matting_fixtures import small_vae

    vae = small_vae(seed=0, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)  # SD1.x architecture
    head = LoadedHead(MattingHead(HeadConfig()).reset_parameters(0), "sd1")
    core = host_nodes.VAEDecode()

    def run_core(latent):
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return core.decode(vae, {"samples": latent})[0]

    def run_head(latent):
        with torch.inference_mode():
            return MattingVAEDecode.execute({"samples": latent}, vae, head, refine_with_greenpost=False,
                                            tiling="never").result

    return torch, {"core": run_core, "head": run_head}


def _latent(torch, size: int):
    g = torch.Generator().manual_seed(size)
    return torch.randn(1, 4, size // 8, size // 8, generator=g)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_mem(variant: str, size: int, threads: int) -> dict:
    torch, runs = _setup(threads)
    runs[variant](_latent(torch, 128))  # warm-up: libraries, thread pools, kernels
    latent = _latent(torch, size)
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap pages back to the OS so "before" is the live memory of both paths alike
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    out = runs[variant](latent)
    peak = _status_kb("VmHWM")
    del out
    return {"before_kb": before, "peak_kb": peak, "work_kb": peak - before}


def child_time(size: int, repeats: int, threads: int) -> dict:
    torch, runs = _setup(threads)
    latent = _latent(torch, size)
    for name in ("core", "head"):
        runs[name](latent)  # warm-up at this size
    times = {"core": [], "head": []}
    for i in range(repeats):
        order = ("core", "head") if i % 2 == 0 else ("head", "core")
        for name in order:
            t = time.perf_counter()
            runs[name](latent)
            times[name].append(time.perf_counter() - t)
    return times


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per path and size (median)")
    p.add_argument("--mem-repeats", type=int, default=3, help="fresh processes per path and size for memory")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--full", action="store_true", help="also 1024x1024 (tens of minutes on a 2-core CPU)")
    p.add_argument("--child", choices=["mem", "time"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["core", "head"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "mem":
        print(json.dumps(child_mem(a.variant, a.size, a.threads)))
        return 0
    if a.child == "time":
        print(json.dumps(child_time(a.size, a.repeats, a.threads)))
        return 0

    print(f"DiffuMatting VAE Decode (head, GreenPost off) vs core VAEDecode; SD1.x VAE architecture, random "
          f"weights; CPU, {a.threads} torch threads; time: median of {a.repeats}, memory: median of "
          f"{a.mem_repeats} fresh processes", flush=True)
    ratios, mem_ratios = {}, {}
    for size in FULL_SIZES if a.full else SIZES:
        t = _spawn(["--child", "time", "--size", str(size), "--repeats", str(a.repeats), "--threads", str(a.threads)])
        core_t, head_t = statistics.median(t["core"]), statistics.median(t["head"])
        ratios[size] = head_t / core_t
        print(f"{size}x{size} time: core {core_t:.2f} s, head {head_t:.2f} s, ratio {ratios[size]:.3f} "
              f"(core {['%.2f' % x for x in t['core']]}, head {['%.2f' % x for x in t['head']]})", flush=True)
        mem = {"core": [], "head": []}
        for _ in range(a.mem_repeats):
            for variant in ("core", "head"):
                mem[variant].append(_spawn(["--child", "mem", "--variant", variant, "--size", str(size),
                                            "--threads", str(a.threads)]))
        work = {v: statistics.median(m["work_kb"] for m in mem[v]) for v in mem}
        peak = {v: statistics.median(m["peak_kb"] for m in mem[v]) for v in mem}
        mem_ratios[size] = work["head"] / work["core"]
        print(f"{size}x{size} memory: decode working set core {work['core'] / 1024:.0f} MiB, head "
              f"{work['head'] / 1024:.0f} MiB, ratio {mem_ratios[size]:.3f}; process peak RSS core "
              f"{peak['core'] / 1024:.0f} MiB, head {peak['head'] / 1024:.0f} MiB, ratio "
              f"{peak['head'] / peak['core']:.3f}", flush=True)
    print(" ".join(f"ratio_{size}={r:.3f}" for size, r in ratios.items())
          + f" mem_ratio={max(mem_ratios.values()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
