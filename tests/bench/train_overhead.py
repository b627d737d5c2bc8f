"""Training-step time and peak memory with the green-background and detail losses over the plain diffusion loss.

Same model, batch and code path (training/loop.py Trainer.unet_losses + backward + AdamW step), in one run:
- model: the tiny SD1.5-shaped checkpoint (training/tiny_checkpoint.py: UNet with 320 channels, context 768,
  one level; CLIP-L; SD VAE), LoRA mode (the default config), 256x256 images (32x32 latents), batch 2;
- plain: loss.green = 0 and loss.detail = 0 (ComfyUI's own attention everywhere, PyTorch SDPA);
- losses: loss.green = 1 on every cross-attention block (the fused green capture) and loss.detail = 0.1.

Time: one subprocess alternates plain and losses steps on the same model (the loss weights switch between
steps; both share the warm-up, the weights and the optimizer), so a busy shared CPU slows both alike.
time_ratio = median over `--pairs` adjacent (plain, losses) pairs of losses / plain step time.

Peak memory: one fresh subprocess per (case, repeat), cases alternating; after a 2-step warm-up (which also
allocates the AdamW state) the kernel's peak-RSS counter is reset (5 written to
/proc/self/clear_refs; freed heap handed back with malloc_trim first) and the RSS recorded; after the timed
steps VmHWM (/proc/self/status) is the peak. Reported: the peak RSS ratio (weights, optimizer state and
activations, what torch.cuda.max_memory_allocated would count on a GPU) and the step's working memory ratio
(peak - RSS before the steps). mem_ratio on the last line is the working-memory ratio, the stricter one.
(tracemalloc cannot see torch's allocations; VmHWM counts every resident page.)

Last line: `time_ratio=X mem_ratio=Y`. Targets: X <= 1.15, Y <= 1.20.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = {"plain": {"green": 0.0, "detail": 0.0}, "losses": {"green": 1.0, "detail": 0.1}}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(case: str, ckpt: str, steps: int, threads: int, resolution: int, batch: int) -> dict:
    """case 'plain' / 'losses': peak memory of `steps` steps; case 'time': alternating timed pairs."""
    import torch

    torch.set_num_threads(threads)
    sys.path.append(str(ROOT))
    import _package

    _package.register()
    from diffumatting.training import config as C
    from diffumatting.training.distributed import Dist
    from diffumatting.training.loop import Trainer

    out = tempfile.mkdtemp(prefix="dm_bench_")
    over = {"run": {"out": out, "threads": threads}, "model": {"tiny": False, "checkpoint": ckpt},
            "data": {"resolution": resolution, "synthetic_count": batch, "holdout": 0},
            "unet": {"batch_size": batch, "mode": "lora", "warmup": 0},
            "loss": {"green": CASES.get(case, CASES["losses"])["green"],
                     "detail": CASES.get(case, CASES["losses"])["detail"], "green_factors": [1]}}
    cfg = C.validate(C.build("tiny", None, over))
    tr = Trainer(cfg, Dist())
    tr.load_models()
    tr.build_items()
    tr.setup_unet()
    tr.scaler = None
    data = tr.step_data(batch, None)
    b = data.batch(0)
    x0 = tr.batch_latents(b, False)
    alpha = tr._alpha(b)
    noise, t, _ = tr.per_sample_noise("unet", 0, x0.shape[1:], range(batch))
    captions = tr.captions_with_phrase(b, [False] * batch)
    tr.encode_text(captions[0])

    def step():
        total, _ = tr.unet_losses(x0, alpha, captions, noise, t)
        total.backward()
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)

    def use(name):
        tr.cfg.loss.green, tr.cfg.loss.detail = CASES[name]["green"], CASES[name]["detail"]

    if case == "time":
        for name in ("plain", "losses", "plain", "losses"):
            use(name)
            step()
        pairs = []
        for i in range(steps):
            row = {}
            for name in (("plain", "losses") if i % 2 == 0 else ("losses", "plain")):
                use(name)
                t0 = time.perf_counter()
                step()
                row[name] = time.perf_counter() - t0
            pairs.append(row)
        return {"pairs": pairs}
    for _ in range(2):
        step()
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status("VmHWM")
    return {"times": times, "before": before, "peak": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="memory subprocesses per case (alternating)")
    p.add_argument("--steps", type=int, default=3, help="steps per memory subprocess")
    p.add_argument("--pairs", type=int, default=10, help="alternating (plain, losses) step pairs timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", choices=sorted(CASES) + ["time"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.ckpt, a.steps, a.threads, a.resolution, a.batch)))
        return 0

    with tempfile.TemporaryDirectory(prefix="dm_bench_ckpt_") as tmp:
        ckpt = Path(tmp) / "tiny_sd15.safetensors"
        build = ("import sys; sys.path.append(%r); import _package; _package.register();"
                 "from diffumatting.training.host import import_comfy; import_comfy();"
                 "from diffumatting.training.tiny_checkpoint import build_tiny_sd15_checkpoint;"
                 "build_tiny_sd15_checkpoint(%r)") % (str(ROOT), str(ckpt))
        subprocess.run([sys.executable, "-c", build], check=True, capture_output=True)
        def run_child(case, steps):
            proc = subprocess.run([sys.executable, __file__, "--child", case, "--ckpt", str(ckpt),
                                   "--steps", str(steps), "--threads", str(a.threads),
                                   "--resolution", str(a.resolution), "--batch", str(a.batch)],
                                  capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(1)
            return json.loads(line[0][7:])

        timing = run_child("time", a.pairs)["pairs"]
        for i, row in enumerate(timing):
            print(f"pair {i:2d}: plain {row['plain'] * 1000:7.1f} ms  losses {row['losses'] * 1000:7.1f} ms", flush=True)
        results = {c: [] for c in CASES}
        for r in range(a.repeats):
            for case in CASES:
                res = run_child(case, a.steps)
                results[case].append(res)
                print(f"memory repeat {r} {case:6s}: peak RSS {res['peak'] / 2**20:7.1f} MiB, working memory "
                      f"{(res['peak'] - res['before']) / 2**20:6.1f} MiB", flush=True)

    def med(case, fn):
        return statistics.median(fn(r) for r in results[case])

    t_plain = statistics.median(r["plain"] for r in timing)
    t_loss = statistics.median(r["losses"] for r in timing)
    time_ratio = statistics.median(r["losses"] / r["plain"] for r in timing)
    peak_ratio = med("losses", lambda r: r["peak"]) / med("plain", lambda r: r["peak"])
    work_ratio = med("losses", lambda r: r["peak"] - r["before"]) / med("plain", lambda r: r["peak"] - r["before"])
    print(f"tiny SD1.5-shaped UNet, LoRA, {a.resolution}px batch {a.batch}, {a.threads} threads, CPU")
    print(f"step time (medians)  plain {t_plain * 1000:.1f} ms   losses {t_loss * 1000:.1f} ms")
    print(f"peak RSS ratio {peak_ratio:.3f}   working-memory ratio {work_ratio:.3f}")
    print(f"time_ratio={time_ratio:.3f} mem_ratio={work_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
