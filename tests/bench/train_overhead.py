"""Training-step time and peak memory with the green-background and detail losses over the plain diffusion loss.

The shipped default config (configs/default.toml: LoRA, green factors [2, 4], detail 0.1, no latent cache) on
the real SD1.5 UNet architecture with random weights (tests/support/sd15_full.py), 256x256 images (32x32
latents), through the trainer's own UNet stage (training/unet_stage.py: data, VAE encode, forward, losses,
backward, clipping, AdamW step):
- plain: loss.green = 0 and loss.detail = 0 (ComfyUI's own attention everywhere, PyTorch SDPA);
- losses: the default config's weights (the fused green capture on the latent/2 and latent/4 blocks, the
  Sobel detail loss).

Time: one subprocess alternates plain and losses steps on the same model (the loss weights switch between
steps; both share the warm-up, the weights and the optimizer), so a busy shared CPU slows both alike.
time_ratio = median over `--pairs` adjacent (plain, losses) pairs of losses / plain step time. The green and
detail loss values of the timed losses steps are checked present, finite and non-zero.

Peak memory: one fresh subprocess per (case, repeat), cases alternating; after a 2-step warm-up (which also
allocates the AdamW state) the kernel's peak-RSS counter is reset (5 written to /proc/self/clear_refs; freed
heap handed back with malloc_trim first) and the RSS recorded; after the timed steps VmHWM is the peak.
mem_ratio = the step's working memory (peak - RSS before the steps), losses / plain. With --device cuda
the same with torch.cuda.max_memory_allocated / memory_allocated, and autocast as the config says (auto).

On the 2-core CPU machine this takes minutes (an SD1.5 step is seconds; each subprocess loads the 2 GB
checkpoint; building it once takes about 2 minutes unless --checkpoint names one).
Last line: `time_ratio=X mem_ratio=Y green=G detail=D`. Targets: X <= 1.15, Y <= 1.20.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import _package  # noqa: E402

_package.register()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(case: str, ckpt: str, steps: int, threads: int, resolution: int, batch: int, device: str) -> dict:
    """case 'plain' / 'losses': peak memory of `steps` steps; case 'time': alternating timed pairs."""
    import torch

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    from diffumatting.training import config
    from diffumatting.training.distributed import Dist
    from diffumatting.training.session import Session
    from diffumatting.training.unet_stage import UnetStage

    torch.set_num_threads(threads)
    cfg = config.build(None, str(ROOT / "configs" / "default.toml"), {
        "run": {"out": tempfile.mkdtemp(prefix="dm_bench_"), "threads": threads, "device": device},
        "model": {"checkpoint": ckpt}, "unet": {"batch_size": batch, "warmup": 0},
        "data": {"source": "synthetic", "resolution": resolution, "synthetic_count": batch, "holdout": 0}})
    config.validate(cfg)
    weights = {"plain": (0.0, 0.0), "losses": (cfg.loss.green, cfg.loss.detail)}
    session = Session(cfg, Dist(), log=lambda *a: None)
    session.load_models()
    session.build_items()
    stage = UnetStage(session)
    stage.setup()
    batch_data = session.step_data("unet", batch, None).batch(0)
    seen = {"green": [], "detail": []}

    def step(name):
        cfg.loss.green, cfg.loss.detail = weights[name]
        total, parts = stage.step(0, batch_data)
        total.backward()
        torch.nn.utils.clip_grad_norm_(stage.params, cfg.unet.grad_clip)
        stage.optimizer.step()
        stage.optimizer.zero_grad(set_to_none=True)
        return parts

    if case == "time":
        for name in ("plain", "losses", "plain", "losses"):
            step(name)
        pairs = []
        for i in range(steps):
            row = {}
            for name in (("plain", "losses") if i % 2 == 0 else ("losses", "plain")):
                sync()
                t0 = time.perf_counter()
                parts = step(name)
                sync()
                row[name] = time.perf_counter() - t0
                if name == "losses":
                    for k in seen:
                        seen[k].append(float(parts[k]) if k in parts else float("nan"))
            pairs.append(row)
        return {"pairs": pairs, "seen": seen}
    for _ in range(2):
        step(case)
    if cuda:       # GPU memory: what the caching allocator hands out (weights, optimizer state, activations)
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step(case)
        sync()
        return {"before": before, "peak": torch.cuda.max_memory_allocated()}
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    for _ in range(steps):
        step(case)
    return {"before": before, "peak": _status("VmHWM")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="memory subprocesses per case (alternating)")
    p.add_argument("--steps", type=int, default=2, help="steps per memory subprocess")
    p.add_argument("--pairs", type=int, default=4, help="alternating (plain, losses) step pairs timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpoint", help="an SD1.5-architecture checkpoint to use (default: build a random one)")
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (torch.cuda.max_memory_allocated; "
                   "autocast per run.mixed_precision = auto)")
    p.add_argument("--child", choices=["plain", "losses", "time"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.checkpoint, a.steps, a.threads, a.resolution, a.batch,
                                           a.device)))
        return 0

    with tempfile.TemporaryDirectory(prefix="dm_bench_ckpt_") as tmp:
        ckpt = a.checkpoint
        if not ckpt:
            ckpt = str(Path(tmp) / "sd15_random.safetensors")
            subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "sd15_full.py"), ckpt], check=True,
                           capture_output=True)

        def run_child(case, steps):
            proc = subprocess.run([sys.executable, __file__, "--child", case, "--checkpoint", ckpt,
                                   "--steps", str(steps), "--threads", str(a.threads),
                                   "--resolution", str(a.resolution), "--batch", str(a.batch),
                                   "--device", a.device],
                                  capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(1)
            return json.loads(line[0][7:])

        timed = run_child("time", a.pairs)
        for i, row in enumerate(timed["pairs"]):
            print(f"pair {i:2d}: plain {row['plain'] * 1000:8.1f} ms  losses {row['losses'] * 1000:8.1f} ms",
                  flush=True)
        results = {"plain": [], "losses": []}
        for r in range(a.repeats):
            for case in results:
                res = run_child(case, a.steps)
                results[case].append(res)
                print(f"memory repeat {r} {case:6s}: peak {res['peak'] / 2**20:8.1f} MiB, working memory "
                      f"{(res['peak'] - res['before']) / 2**20:7.1f} MiB", flush=True)

    green, detail = (statistics.mean(timed["seen"][k]) for k in ("green", "detail"))
    for name, v in (("green", green), ("detail", detail)):
        if not (math.isfinite(v) and v > 0):
            print(f"FAIL: the {name} loss was {v} in the timed steps (expected present, finite and > 0)")
            return 1

    def med(case, fn):
        return statistics.median(fn(r) for r in results[case])

    t_plain = statistics.median(r["plain"] for r in timed["pairs"])
    t_loss = statistics.median(r["losses"] for r in timed["pairs"])
    time_ratio = statistics.median(r["losses"] / r["plain"] for r in timed["pairs"])
    peak_ratio = med("losses", lambda r: r["peak"]) / med("plain", lambda r: r["peak"])
    work_ratio = med("losses", lambda r: r["peak"] - r["before"]) / med("plain", lambda r: r["peak"] - r["before"])
    print(f"SD1.5 UNet architecture (random weights), default config (LoRA, green factors [2, 4]), "
          f"{a.resolution}px batch {a.batch}, {a.threads} threads, {a.device}")
    print(f"step time (medians)  plain {t_plain * 1000:.1f} ms   losses {t_loss * 1000:.1f} ms")
    print(f"peak memory ratio {peak_ratio:.3f}   working-memory ratio {work_ratio:.3f}")
    print(f"time_ratio={time_ratio:.3f} mem_ratio={work_ratio:.3f} green={green:.4g} detail={detail:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
