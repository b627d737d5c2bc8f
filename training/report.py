"""What a run reports: the CSV log, sample grids, summary.json and the final lines.

log.csv is appended to after each logged step and cut back on `--resume` to the checkpoint's step. A
kill or a full disk can leave its last line half-written; such a line (no trailing newline, or fields
that do not parse) is dropped when the log is read back, never turned into an error.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..models.atomic import atomic_path
from .state import STAGE_ORDER

CSV_FIELDS = ["time", "stage", "step", "lr", "loss", "diffusion", "green", "detail", "l1", "grad", "comp", "bce"]


class CsvLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file() or self.path.stat().st_size == 0
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in CSV_FIELDS})
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            if not new and not self._ends_with_newline():
                fh.write("\n")        # a half-written line from a killed run stays its own (dropped) line
            fh.write(text.getvalue())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, 2)
            return fh.read(1) == b"\n"

    def rows(self) -> list[dict]:
        """The complete, well-formed rows (a half-written or damaged line is skipped)."""
        if not self.path.is_file():
            return []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        if lines and lines[-1] != "":
            lines = lines[:-1]            # no trailing newline: the last line was cut off
        out = []
        for r in csv.DictReader(lines):
            if r.get("stage") in STAGE_ORDER and (r.get("step") or "").isdigit() and None not in r.values() \
                    and None not in r:
                out.append(r)
        return out

    def truncate(self, stage: str, step: int) -> None:
        """Keep the rows up to (stage, step): the ones after a checkpoint are written again on resume."""
        if not self.enabled or not self.path.is_file():
            return
        order = STAGE_ORDER[stage]
        keep = [r for r in self.rows() if (STAGE_ORDER[r["stage"]], int(r["step"])) <= (order, step)]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, lineterminator="\n")
                w.writeheader()
                w.writerows(keep)


def over_checker(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    """RGB composited with alpha over a grey checkerboard."""
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cell = max(4, min(h, w) // 8)
    board = np.where(((yy // cell + xx // cell) % 2) == 0, 0.8, 0.6).astype(np.float32)[..., None]
    return rgb * a[..., None] + board * (1 - a[..., None])


def write_grid(path: Path, rows: list[list[np.ndarray]]) -> None:
    """A PNG of equally sized tiles (HxWx3 or HxW in [0, 1]), one list of tiles per row."""
    if not rows:
        return
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.ones((h * len(rows), w * cols, 3), np.float32)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            im = im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=2)
            grid[i * h:(i + 1) * h, j * w:(j + 1) * w] = im[:h, :w]
    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)).save(tmp, format="PNG")


def write_summary(path: Path, complete: bool, measures: dict, final_losses: dict, files: dict, bad: list,
                  timing: dict, error: str | None = None) -> None:
    summary = {"complete": complete, "measures": measures, "final_losses": final_losses, "files": files,
               "bad_samples": bad, "timing": timing}
    if error:
        summary["error"] = error
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")


def _f(m: dict, k: str) -> str:
    v = m.get(k, float("nan"))
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def final_lines(measures: dict, final_losses: dict, timing: dict, bad: list) -> list[str]:
    """The lines printed at the end of a run: losses, the learning check, step time and memory."""
    lines = [f"final {stage} losses: " + " ".join(f"{k}={v:.4f}" for k, v in vals.items())
             for stage, vals in final_losses.items()]
    m = measures
    checks = (
        ("green_iou", "green attention IoU (held-out, median threshold)", "constant map: distance from the centre"),
        ("edge_sharpness", "edge sharpness near the object (decoded x0 at t=200 / VAE reconstruction)",
         "flat answer"),
        ("head_error", "head alpha error (held-out MAE)", "best constant answer"),
    )
    for key, text, const in checks:
        if f"{key}_before" in m or f"{key}_after" in m:
            lines.append(f"{text}: before={_f(m, key + '_before')} after={_f(m, key + '_after')} "
                         f"({const}: {_f(m, key + '_constant')})")
    for stage, t in timing.items():
        mem = f", peak {t['device']} memory {t['peak_mem_gib']:.2f} GiB" if t.get("peak_mem_gib") is not None else ""
        lines.append(f"{stage} stage: median step {t['median_step_s']:.3f} s over {t['steps']} steps{mem}")
    lines.append(f"bad samples skipped: {len(bad)}")
    return lines


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"
