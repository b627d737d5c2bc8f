"""Decode time and peak memory of DiffuMatting VAE Decode (matting head, one decoder pass) over core's VAEDecode.

Both run on the same full-size SD1.x KL-f8 VAE architecture (ComfyUI's own AutoencoderKL: ch 128,
ch_mult 1,2,4,4, 2 res blocks; seeded random weights, which time the same as trained ones), on CPU, in one
run of this script: 256x256 by default (12 decodes in one process: a few minutes on the idle 2-core machine,
under 10 under `nice` on the shared, loaded one), 512x512 and 1024x1024 with --full (an hour or more there).
The matting decode goes through core's own VAE.decode with the head's hooks attached for the call.
GreenPost refinement is off (it is a separate step with its own cost); the head, the hooks and the node's
extra outputs (alpha, rgba, transparency mask) are all included. Each path is checked before it is timed:
one decoder call per decode, and the head's alpha present and varying (a broken path fails, it does not
read as 1.00x).

One subprocess per size builds the VAE once, checks and warms up both paths, then:

Time: alternates core / head decodes `--repeats` times; the figures are median(head) / median(core) of the
wall-clock time and of the process's CPU time (all threads; far less disturbed than wall-clock time when
other jobs share the CPU).

Peak memory: then alternates core / head decodes `--mem-repeats` times more, each measured alone: freed heap
pages are handed back (malloc_trim), the kernel's peak-RSS counter is reset (5 written to
/proc/self/clear_refs), the RSS recorded, one decode run and the peak read (VmHWM in /proc/self/status).
A decode's working memory is peak - RSS before; mem_ratio is the largest over the sizes run of
median(head) / median(core) working memory. (tracemalloc cannot see torch's allocations; VmHWM counts every
resident page of the process. torch's CPU allocator returns large blocks to the OS when freed, so one
decode's peak does not hide inside memory an earlier one left.)

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


def child(size: int, repeats: int, mem_repeats: int, threads: int) -> dict:
    torch, runs = _setup(threads)
    latent = _latent(torch, size)
    runs["check"](latent)  # also the warm-up at this size
    out = {"core": [], "head": [], "core_cpu": [], "head_cpu": [], "core_mem": [], "head_mem": []}
    for name in _alternate(repeats):
        t, c = time.perf_counter(), time.process_time()
        runs[name](latent)
        out[name].append(time.perf_counter() - t)
        out[name + "_cpu"].append(time.process_time() - c)
    for name in _alternate(mem_repeats):
        out[name + "_mem"].append(_measure_memory(runs[name], latent))
    return out


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per path and size (median)")
    p.add_argument("--mem-repeats", type=int, default=2, help="memory-measured decodes per path and size (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--full", action="store_true", help="512x512 and 1024x1024 instead of 256x256 (an hour or more "
                                                       "on a loaded 2-core CPU)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    for name in ("repeats", "mem_repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.child:
        print(json.dumps(child(a.size, a.repeats, a.mem_repeats, a.threads)))
        return 0

    started = time.perf_counter()
    print(f"DiffuMatting VAE Decode (head, GreenPost off) vs core VAEDecode; SD1.x VAE architecture, random "
          f"weights; CPU, {a.threads} torch threads; time: median of {a.repeats}, memory: median of "
          f"{a.mem_repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    ratios, cpu_ratios, mem_ratios = {}, {}, {}
    for size in FULL_SIZES if a.full else SIZES:
        t = _spawn(["--child", "--size", str(size), "--repeats", str(a.repeats), "--mem-repeats", str(a.mem_repeats),
                    "--threads", str(a.threads)])
        core_t, head_t = statistics.median(t["core"]), statistics.median(t["head"])
        core_c, head_c = statistics.median(t["core_cpu"]), statistics.median(t["head_cpu"])
        ratios[size], cpu_ratios[size] = head_t / core_t, head_c / core_c
        print(f"{size}x{size} wall time: core {core_t:.2f} s, head {head_t:.2f} s, ratio {ratios[size]:.3f} "
              f"(core {['%.2f' % x for x in t['core']]}, head {['%.2f' % x for x in t['head']]})", flush=True)
        print(f"{size}x{size} CPU time: core {core_c:.2f} s, head {head_c:.2f} s, ratio {cpu_ratios[size]:.3f} "
              f"(core {['%.2f' % x for x in t['core_cpu']]}, head {['%.2f' % x for x in t['head_cpu']]})",
              flush=True)
        mem = {v: t[v + "_mem"] for v in ("core", "head")}
        work = {v: statistics.median(m["work_kb"] for m in mem[v]) for v in mem}
        peak = {v: statistics.median(m["peak_kb"] for m in mem[v]) for v in mem}
        mem_ratios[size] = work["head"] / work["core"]
        print(f"{size}x{size} memory: decode working set core {work['core'] / 1024:.0f} MiB, head "
              f"{work['head'] / 1024:.0f} MiB, ratio {mem_ratios[size]:.3f}; process peak RSS core "
              f"{peak['core'] / 1024:.0f} MiB, head {peak['head'] / 1024:.0f} MiB, ratio "
              f"{peak['head'] / peak['core']:.3f}", flush=True)
    print(f"whole run {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    print(" ".join(f"ratio_{size}={ratios[size]:.3f} cpu_ratio_{size}={cpu_ratios[size]:.3f}" for size in ratios)
          + f" mem_ratio={max(mem_ratios.values()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
