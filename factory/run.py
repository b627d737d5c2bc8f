"""One dataset run: servers, the adapted workflow, the scheduler, scoring, the output folder, the summary."""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models import dataset_quality
from ..models.dataset_images import IMAGE_SUFFIXES, contact_sheet, read_image_file, read_png_float
from ..models.asset_export import prompt_stem
from ..models.atomic import write_bytes_atomic
from ..models.png import encode_png

from .jobs import Job
from .output import SHEET, OutputError, OutputFolder, disk_error
from .sample import SampleOptions, build_sample
from .scheduler import Scheduler, SchedulerError, Server, fetch_object_info
from .workflow import Plan, job_prompt, plan_workflow

SERVER_PREFIX = "diffumatting_dataset"


@dataclass
class RunConfig:
    out: Path
    workflow: dict                       # UI or API format
    jobs: list[Job]
    servers: list[Server]
    sample: SampleOptions = field(default_factory=SampleOptions)
    thresholds: dataset_quality.Thresholds = field(default_factory=dataset_quality.Thresholds)
    filter: bool = True
    backgrounds: list = field(default_factory=list)   # from load_backgrounds
    models_dir: Path | None = None
    depth: int = 2
    job_timeout: float = 1800.0
    sheet_max: int = 64
    progress: bool = True


class Progress:
    """One status line on stderr: done/total, rate, ETA, accepted/rejected, per-server counts."""

    def __init__(self, total: int, skipped: int, enabled: bool, servers: list[Server]):
        self.total, self.skipped, self.enabled, self.servers = total, skipped, enabled, servers
        self.done = self.accepted = self.rejected = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, accepted: bool, force: bool = False) -> None:
        self.done += 1
        self.accepted += accepted
        self.rejected += not accepted
        self.show(force)

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        todo = self.total - self.skipped
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (todo - self.done) / rate if rate > 0 else float("inf")
        bar_n = int(20 * (self.skipped + self.done) / max(self.total, 1))
        per = " ".join(f"{s.name}:{s.done}" for s in self.servers)
        eta_s = "--" if math.isinf(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = (f"[dataset] [{'#' * bar_n}{'.' * (20 - bar_n)}] {self.skipped + self.done}/{self.total} "
                f"{rate * 60:.1f}/min ETA {eta_s} ok {self.accepted} rej {self.rejected} | {per}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.show(force=True)
            if self.tty:
                print(file=sys.stderr)


def load_backgrounds(folder: Path | None, limit: int = 256) -> list[tuple[str, object]]:
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"--backgrounds {folder} is not a folder; give a folder of .png/.jpg images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise OutputError(f"--backgrounds {folder} holds no .png/.jpg/.jpeg/.webp image; add some or leave the "
                          f"option out")
    out = []
    for p in paths:
        try:
            img = read_image_file(p)
        except ValueError as e:
            raise OutputError(f"--backgrounds: {e}") from None
        if min(img.shape[:2]) < 16:
            raise OutputError(f"--backgrounds: {p} is {img.shape[1]}x{img.shape[0]}; backgrounds must be at least "
                              f"16 pixels on each side")
        out.append((p.name, img))
    return out


def hash_models(names: list[str], models_dir: Path | None) -> dict[str, str | None]:
    """sha256 of each model file found under models_dir/<any folder>/<name>; None where not visible."""
    out = {}
    for name in names:
        out[name] = None
        if models_dir is None:
            continue
        for folder in sorted(Path(models_dir).iterdir()) if Path(models_dir).is_dir() else []:
            path = folder / name
            if path.is_file():
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
                out[name] = h.hexdigest()
                break
    return out


def asset_names(jobs: list[Job]) -> dict[str, str]:
    """Artist file names: the prompt's words (models/asset_export.prompt_stem, as the Save Transparent Batch
    node names its files) and the sample number; the id's hash where two prompts have the same words."""
    words: dict[str, set] = {}
    for j in jobs:
        words.setdefault(prompt_stem(j.prompt), set()).add(j.prompt)
    out = {}
    for j in jobs:
        w = prompt_stem(j.prompt)
        tail = f"-{j.id.rsplit('-', 1)[-1]}" if len(words[w]) > 1 else ""
        out[j.id] = f"{w}{tail}-{j.index + 1:03d}"
    return out


class Run:
    def __init__(self, cfg: RunConfig, plan: Plan, folder: OutputFolder, log):
        self.cfg, self.plan, self.folder, self.log = cfg, plan, folder, log
        self.run_tag = hashlib.sha256(str(cfg.out.resolve()).encode()).hexdigest()[:10]
        self.backgrounds = cfg.backgrounds
        self.models = hash_models(plan.model_files(), cfg.models_dir)
        self.settings = plan.settings()
        self.workflow_sha = plan.sha256()
        self.assets = asset_names(cfg.jobs) if cfg.sample.assets else {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="dataset-post")
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataset-write")
        self.lock = asyncio.Lock()
        self.hashes = {rid: int(r["scores"]["phash"], 16) for rid, r in folder.records.items()
                       if r["status"] == "accepted"}
        self.progress: Progress | None = None

    def build(self, job: Job):
        prefix = f"{SERVER_PREFIX}/{self.run_tag}/{job.id}"
        return job_prompt(self.plan, job.prompt, job.seed, prefix), dict(self.plan.save_nodes)

    async def commit(self, result) -> None:
        loop = asyncio.get_running_loop()
        job = result.job
        t0 = time.monotonic()
        sample = await loop.run_in_executor(self.pool, build_sample, job, result.files, self.cfg.sample,
                                            self.plan.has_head, self.backgrounds)
        post_s = time.monotonic() - t0
        scores = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sample.scores.items()}
        reasons = dataset_quality.reject_reasons(sample.scores, self.cfg.thresholds) if self.cfg.filter else []
        async with self.lock:  # near-duplicate check and manifest order: one sample at a time
            if self.cfg.filter:
                twin = dataset_quality.nearest_duplicate(scores["phash"], self.hashes,
                                                         self.cfg.thresholds.max_phash_distance)
                if twin is not None:
                    reasons.append(f"near-duplicate of {twin} (perceptual hash within "
                                   f"{self.cfg.thresholds.max_phash_distance} bits)")
            rejected = bool(reasons)
            names = self.folder.file_names(job, list(sample.files), rejected, self.assets.get(job.id))
            record = {
                "id": job.id, "prompt": job.prompt, "seed": job.seed, "index": job.index,
                "status": "rejected" if rejected else "accepted", "reasons": reasons, "files": names,
                "size": list(sample.size), "scores": scores, "models": self.models,
                "workflow_sha256": self.workflow_sha, "settings": self.settings, "server": result.server.name,
                "prompt_id": result.prompt_id,
                "timings": {**result.timings, "post_s": round(post_s, 4)}, **sample.extra,
            }
            await loop.run_in_executor(self.writer, self.folder.commit, record, sample.files)
            if not rejected:
                self.hashes[job.id] = int(scores["phash"], 16)
        self.progress.update(not rejected)

    def write_contact_sheet(self) -> Path | None:
        """contact_sheet.png: the first sheet_max samples in manifest order, rejects framed in red."""
        tiles, marked = [], []
        for rec in list(self.folder.records.values())[:self.cfg.sheet_max]:
            f = rec["files"]
            if "asset.png" in f:
                x = read_png_float((self.cfg.out / f["asset.png"]).read_bytes(), f["asset.png"])
                tiles.append((x[..., :3], x[..., 3]))
            else:
                fg = read_png_float((self.cfg.out / f["fg.png"]).read_bytes(), f["fg.png"])
                alpha = read_png_float((self.cfg.out / f["alpha.png"]).read_bytes(), f["alpha.png"])
                tiles.append((fg, alpha))
            marked.append(rec["status"] == "rejected")
        if not tiles:
            return None
        path = self.cfg.out / SHEET
        try:
            write_bytes_atomic(path, encode_png(contact_sheet(tiles, marked=marked), 8))
        except OSError as e:
            raise disk_error(e, path) from None
        return path


def plan_for(cfg: RunConfig) -> Plan:
    from comfy_client import ui_to_api

    info = asyncio.run(fetch_object_info(cfg.servers[0]))
    return plan_workflow(ui_to_api(cfg.workflow, info), info)


def run_dataset(cfg: RunConfig, log=None, install_sigint: bool = True) -> dict:
    """Make every job's sample not already in cfg.out; returns the summary (also written to summary.json).

    Raises SchedulerError / OutputError / WorkflowPlanError with a message that says what to do.
    Ctrl-C (SIGINT) stops handing out work; running samples finish and are written; the summary has
    "interrupted": true.
    """
    log = log or (lambda m: print(f"[dataset] {m}", file=sys.stderr, flush=True))
    plan = plan_for(cfg)
    for note in plan.notes:
        log(note)
    info = {"workflow_sha256": plan.sha256(), "mode": "assets" if cfg.sample.assets else "dataset",
            "trimap_band": cfg.sample.trimap_band, "composites": cfg.sample.composites,
            "thresholds": cfg.thresholds.as_dict(), "filter": cfg.filter}
    folder = OutputFolder(cfg.out, info, assets=cfg.sample.assets)
    run = Run(cfg, plan, folder, log)
    todo = [j for j in cfg.jobs if j.id not in folder.records]
    skipped = len(cfg.jobs) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(cfg.jobs)} samples already finished, skipped")
    run.progress = Progress(len(cfg.jobs), skipped, cfg.progress, cfg.servers)
    sched = Scheduler(cfg.servers, run.build, run.commit, depth=cfg.depth, job_timeout=cfg.job_timeout, on_event=log)
    t0 = time.monotonic()

    async def main():
        loop = asyncio.get_running_loop()
        if install_sigint:
            loop.add_signal_handler(signal.SIGINT, _on_sigint, sched, log)
        try:
            await sched.run(todo)
        finally:
            if install_sigint:
                loop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(main())
    finally:
        run.pool.shutdown(wait=True)
        run.writer.shutdown(wait=True)
        run.progress.close()
    sheet = run.write_contact_sheet()
    wall = time.monotonic() - t0
    summary = {
        "out": str(cfg.out), "total": len(cfg.jobs), "skipped": skipped, "made": len(sched.committed),
        "accepted": sum(r["status"] == "accepted" for r in folder.records.values()),
        "rejected": sum(r["status"] == "rejected" for r in folder.records.values()),
        "failed": sched.failures, "interrupted": sched.stopping, "duplicates_dropped": sched.duplicates_dropped,
        "wall_s": round(wall, 3), "servers": [s.summary() for s in cfg.servers],
        "contact_sheet": str(sheet) if sheet else None,
    }
    _write_failures(cfg.out, sched.failures)
    return summary


def _on_sigint(sched: Scheduler, log) -> None:
    if sched.stopping:
        raise KeyboardInterrupt
    log("Ctrl-C: finishing the running samples, then stopping (Ctrl-C again to abandon them)")
    sched.stop()


def _write_failures(out: Path, failures: dict) -> None:
    path = out / "failures.jsonl"
    if failures:
        write_bytes_atomic(path, "".join(json.dumps({"id": k, "error": v}) + "\n" for k, v in failures.items())
                           .encode())
    elif path.exists():
        path.unlink()


# --- local servers ---------------------------------------------------------------------------------------
class LocalServers:
    """`--launch N`: N ComfyUI servers of the dev host (.host/ComfyUI), one per GPU when there are GPUs,
    sharing the models and input folders of `comfy_base`, each with its own output/user/temp folders."""

    def __init__(self, n: int, comfy_base: Path, gpus: int = 0):
        from comfy_client import ComfyServer, prepare_base_dir

        self.tmp = Path(tempfile.mkdtemp(prefix="diffumatting_servers_"))
        self.comfy = []
        for i in range(n):
            base = self.tmp / f"server{i}"
            base.mkdir()
            for sub in ("models", "input"):
                (base / sub).symlink_to(Path(comfy_base).resolve() / sub, target_is_directory=True)
            prepare_base_dir(base)
            extra = ("--cuda-device", str(i % gpus)) if gpus else ()
            self.comfy.append(ComfyServer(base, extra_args=extra))
        self.servers: list[Server] = []

    def start(self) -> list[Server]:
        with concurrent.futures.ThreadPoolExecutor(len(self.comfy)) as ex:
            list(ex.map(lambda c: c.start(), self.comfy))
        self.servers = [Server(c.url, name=f"local{i}", restart=_restarter(c)) for i, c in enumerate(self.comfy)]
        return self.servers

    def stop(self) -> None:
        for c in self.comfy:
            c.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _restarter(comfy):
    def restart():
        comfy.stop()
        comfy.start()
    return restart


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0

