"""Decode time and peak memory of DiffuMatting VAE Decode (matting head, one decoder pass) over core's VAEDecode.

Both run on the same full-size SD1.x KL-f8 VAE architecture (ComfyUI's own AutoencoderKL: ch 128,
ch_mult 1,2,4,4, 2 res blocks; seeded random weights, which time the same as trained ones), on CPU, in one
run of this script: 256x256 by default (16 decodes in three processes: a few minutes on the idle 2-core
machine), 512x512 and 1024x1024 with --full (an hour or more on the shared, loaded one); --size N for one
other size.
The matting decode goes through core's own VAE.decode with the head's hooks attached for the call.
GreenPost refinement is off (it is a separate step with its own cost); the head, the hooks and the node's
extra outputs (alpha, rgba, transparency mask) are all included. Each path is checked before it is timed:
one decoder call per decode, and the head's alpha present and varying (a broken path fails, it does not
read as 1.00x).

Time: one subprocess per size builds the VAE once, checks and warms up both paths, then alternates core /
head decodes `--repeats` times; the figures are median(head) / median(core) of the wall-clock time and of
the process's CPU time (all threads; far less disturbed than wall-clock time when other jobs share the CPU).

Peak memory: one fresh subprocess per (path, size) that has run only that path (a warm-up decode at
128x128), then decodes `--mem-repeats` times at the size, each measured alone: freed heap pages are handed
back (malloc_trim), the kernel's peak-RSS counter is reset (5 written to /proc/self/clear_refs), the RSS
recorded, one decode run and the peak read (VmHWM in /proc/self/status). A decode's working memory is
peak - RSS before; mem_ratio is the largest over the sizes run of median(head) / median(core) working
memory. The first decode at the size is reported as well. (tracemalloc cannot see torch's allocations; VmHWM
counts every resident page of the process. Measuring both paths in one process is not used: there the core
decode measured 358 MiB at 256x256 after head decodes, 298 MiB in a process of its own.)

Allocator (`--allocator`): by default the memory subprocesses (both paths alike; never the timing one) run
with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536), so every tensor buffer is its
own mapping, returned to the system when the tensor is freed: the peak RSS is then the peak of the memory
the decode holds, the same in every process. With glibc's default (`--allocator glibc`) the threshold moves
with the process's history (up to 32 MiB: at 256x256 many of the decoder's buffers are 4 to 32 MiB), freed
heap memory stays resident, and the very same core decode measured 276 to 453 MiB in different fresh
processes (26 Nov): a ratio of two such figures says which process was luckier, not which path holds more.

Last line (machine-readable): `ratio_256=X cpu_ratio_256=C mem_ratio=Z`; with --full the same for 512 and
1024 (mem_ratio: the largest over the sizes run). Targets: time ratios <= 1.10 and Z <= 1.10.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = (256,)
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

    def check(latent) -> None:
        """One decoder call per decode on both paths, and the head's alpha there and varying."""
        calls = []
        handle = vae.first_stage_model.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            run_core(latent)
            core_calls = len(calls)
            image, alpha = run_head(latent)[:2]
        finally:
            handle.remove()
        if core_calls != 1 or len(calls) != 2:
            raise RuntimeError(f"decoder calls: core {core_calls}, head {len(calls) - core_calls}; expected one each")
        if alpha.shape != image.shape[:3] or not float(alpha.std()) > 1e-4:
            raise RuntimeError(f"the head path gave no varying alpha (shape {tuple(alpha.shape)}, "
                               f"std {float(alpha.std()):.2e})")

    return torch, {"core": run_core, "head": run_head, "check": check}


def _latent(torch, size: int):
    g = torch.Generator().manual_seed(size)
    return torch.randn(1, 4, size // 8, size // 8, generator=g)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_memory(run, latent) -> dict:
    """Peak RSS of one decode over the RSS before it (kB)."""
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
    out = run(latent)
    peak = _status_kb("VmHWM")
    del out
    return {"before_kb": before, "peak_kb": peak, "work_kb": peak - before}


def _alternate(repeats: int):
    """"core" and "head" `repeats` times each, alternating which goes first."""
    for i in range(repeats):
        yield from (("core", "head") if i % 2 == 0 else ("head", "core"))


def child_time(size: int, repeats: int, threads: int) -> dict:
    torch, runs = _setup(threads)
    latent = _latent(torch, size)
    runs["check"](latent)  # also the warm-up at this size
    out = {"core": [], "head": [], "core_cpu": [], "head_cpu": []}
    for name in _alternate(repeats):
        t, c = time.perf_counter(), time.process_time()
        runs[name](latent)
        out[name].append(time.perf_counter() - t)
        out[name + "_cpu"].append(time.process_time() - c)
    return out


def child_mem(variant: str, size: int, repeats: int, threads: int) -> list[dict]:
    torch, runs = _setup(threads)
    runs[variant](_latent(torch, 128))  # warm-up of this path only: libraries, thread pools, kernels
    latent = _latent(torch, size)
    return [_measure_memory(runs[variant], latent) for _ in range(repeats)]


# glibc tunable: a fixed threshold also turns off glibc's moving one (see the module doc, "Allocator").
FIXED_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _spawn(args: list[str], malloc_env: dict | None = None) -> dict:
    """Run this script as a child with `args`; glibc's malloc tunables are `malloc_env` only (none inherited)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (malloc_env or {})
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per path and size (median)")
    p.add_argument("--mem-repeats", type=int, default=3, help="memory-measured decodes per path and size, in a "
                                                              "process of that path's own (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--full", action="store_true", help="512x512 and 1024x1024 instead of 256x256 (an hour or more "
                                                       "on a loaded 2-core CPU)")
    p.add_argument("--size", type=int, help="one image size in pixels (a multiple of 8, at least 64) instead of "
                                            "the default 256 / --full")
    p.add_argument("--allocator", choices=["fixed", "glibc"], default="fixed",
                   help="memory subprocesses only: 'fixed' (default) runs both paths with glibc's mmap threshold "
                        "fixed at 64 KiB, so the peak RSS is the memory the decode holds; 'glibc' keeps glibc's "
                        "moving threshold, whose heap reuse makes the same decode differ by up to 60%% between "
                        "processes")
    p.add_argument("--child", choices=["time", "mem"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["core", "head"], help=argparse.SUPPRESS)
    a = p.parse_args()
    for name in ("repeats", "mem_repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.size is not None and (a.size < 64 or a.size % 8):
        p.error(f"--size must be a multiple of 8 and at least 64, got {a.size}")
    if a.child == "time":
        print(json.dumps(child_time(a.size, a.repeats, a.threads)))
        return 0
    if a.child == "mem":
        print(json.dumps(child_mem(a.variant, a.size, a.mem_repeats, a.threads)))
        return 0

    started = time.perf_counter()
    mem_env = FIXED_MMAP_ENV if a.allocator == "fixed" else {}
    mem_desc = " ".join(f"{k}={v}" for k, v in mem_env.items()) or "glibc default"
    print(f"DiffuMatting VAE Decode (head, GreenPost off) vs core VAEDecode; SD1.x VAE architecture, random "
          f"weights; CPU, {a.threads} torch threads; time: median of {a.repeats}, memory: median of "
          f"{a.mem_repeats}, allocator {a.allocator} ({mem_desc}); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    ratios, cpu_ratios, mem_ratios = {}, {}, {}
    for size in (a.size,) if a.size else FULL_SIZES if a.full else SIZES:
        t = _spawn(["--child", "time", "--size", str(size), "--repeats", str(a.repeats), "--threads", str(a.threads)])
        core_t, head_t = statistics.median(t["core"]), statistics.median(t["head"])
        core_c, head_c = statistics.median(t["core_cpu"]), statistics.median(t["head_cpu"])
        ratios[size], cpu_ratios[size] = head_t / core_t, head_c / core_c
        print(f"{size}x{size} wall time: core {core_t:.2f} s, head {head_t:.2f} s, ratio {ratios[size]:.3f} "
              f"(core {['%.2f' % x for x in t['core']]}, head {['%.2f' % x for x in t['head']]})", flush=True)
        print(f"{size}x{size} CPU time: core {core_c:.2f} s, head {head_c:.2f} s, ratio {cpu_ratios[size]:.3f} "
              f"(core {['%.2f' % x for x in t['core_cpu']]}, head {['%.2f' % x for x in t['head_cpu']]})",
              flush=True)
        mem = {v: _spawn(["--child", "mem", "--variant", v, "--size", str(size), "--mem-repeats",
                          str(a.mem_repeats), "--threads", str(a.threads)],
                         mem_env) for v in ("core", "head")}
        work = {v: statistics.median(m["work_kb"] for m in mem[v]) for v in mem}
        peak = {v: statistics.median(m["peak_kb"] for m in mem[v]) for v in mem}
        mem_ratios[size] = work["head"] / work["core"]
        print(f"{size}x{size} memory: decode working set core {work['core'] / 1024:.0f} MiB, head "
              f"{work['head'] / 1024:.0f} MiB, ratio {mem_ratios[size]:.3f} (first decode at the size: core "
              f"{mem['core'][0]['work_kb'] / 1024:.0f}, head {mem['head'][0]['work_kb'] / 1024:.0f} MiB); "
              f"process peak RSS core {peak['core'] / 1024:.0f} MiB, head {peak['head'] / 1024:.0f} MiB, ratio "
              f"{peak['head'] / peak['core']:.3f}", flush=True)
    print(f"whole run {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    print(" ".join(f"ratio_{size}={ratios[size]:.3f} cpu_ratio_{size}={cpu_ratios[size]:.3f}" for size in ratios)
          + f" mem_ratio={max(mem_ratios.values()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
