"""Speed of the refiner's training-data generator (training/refiner_data.py make_sample), on one core.

Peer: the project's first generator, models/synthetic.py make_composite (REALISTIC), same size, same run.
Samples alternate (ours, peer) seed by seed, so a busy shared CPU slows both alike; time is the process's
CPU time (time.process_time) with OpenCV held to one thread, so waiting for a shared core is not counted.

Prints per-kind medians, the medians and 90th percentiles of both generators and their ratio.
Last line: `refiner_data_ms=<median ms per sample> peer_ms=<median> ratio=<ours/peer>`.
Target (issue 8, the refiner trainer generates tens of thousands): median <= 50 ms per 256x256 sample
(other sizes: scaled by area).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))
import _package  # noqa: E402  the pack as `diffumatting` (see _package.py)

_package.register()


def _cpu_ms(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return (time.process_time() - t) * 1000.0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=110, help="seeds timed (each generator once per seed)")
    p.add_argument("--size", type=int, default=256, help="side of each sample in pixels")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples={args.samples}: expected at least 1")
    if not 32 <= args.size <= 2048:
        p.error(f"--size={args.size}: expected 32..2048")

    import cv2

    cv2.setNumThreads(1)
    from diffumatting.models import synthetic
    from diffumatting.training.refiner_data import make_sample

    make_sample(10 ** 6, args.size)  # warm-up: imports, first allocations
    synthetic.make_composite(args.size, args.size, 10 ** 6, synthetic.REALISTIC)
    ours, peer, per_kind = [], [], {}
    for seed in range(args.samples):
        ms, d = _cpu_ms(lambda: make_sample(seed, args.size))
        ours.append(ms)
        per_kind.setdefault(d["kind"], []).append(ms)
        peer.append(_cpu_ms(lambda: synthetic.make_composite(args.size, args.size, seed, synthetic.REALISTIC))[0])

    def q90(xs):
        return sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))]

    print(f"{args.samples} samples of {args.size}x{args.size}, CPU ms per sample, OpenCV on one thread")
    for kind, xs in sorted(per_kind.items()):
        print(f"  {kind:9s} n={len(xs):3d} median {statistics.median(xs):6.1f}  max {max(xs):6.1f}")
    m_ours, m_peer = statistics.median(ours), statistics.median(peer)
    print(f"refiner_data: median {m_ours:.1f} ms  p90 {q90(ours):.1f} ms  ({1000.0 / m_ours:.0f} samples/s/core)")
    print(f"models.synthetic (peer): median {m_peer:.1f} ms  p90 {q90(peer):.1f} ms")
    target = 50.0 * args.size * args.size / 256 ** 2  # 50 ms at 256x256, scaled by area
    print(f"target median <= {target:.0f} ms (50 ms at 256x256, by area): {'met' if m_ours <= target else 'NOT met'}")
    print(f"refiner_data_ms={m_ours:.2f} peer_ms={m_peer:.2f} ratio={m_ours / m_peer:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
