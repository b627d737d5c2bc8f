#!/usr/bin/env python
"""Dataset factory: matting-annotated objects at scale (or, with --assets, a folder of transparent PNGs).

Runs a generation workflow once per (prompt, seed) on one or more ComfyUI servers (one per GPU, on this
machine or others) through ComfyUI's HTTP + websocket API, keys each image with the pack's GreenPost,
scores it, and writes per sample: fg.png (16-bit straight despilled foreground), alpha.png (16-bit),
trimap.png (0/128/255), green.png (the green original), optional composites; plus manifest.jsonl (one line
per sample) and contact_sheet.png. Ids are deterministic: run the same command again to resume.

  python make_dataset.py --out ds --servers http://gpu1:8188,http://gpu2:8188 --samples-per-prompt 4
  python make_dataset.py --out ds --launch 2 --comfy-base ~/ComfyUI --prompts my_prompts.txt
  python make_dataset.py --out assets --assets --prompts props.txt --servers http://127.0.0.1:8188
  python make_dataset.py --demo --out demo_ds     # 2 local servers, tiny test model, 8 samples

The output folder is printed on the last line. Exit status: 0 done, 1 error, 3 some samples failed
(see failures.jsonl; rerun to retry them), 130 stopped by Ctrl-C (rerun to resume).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import _package  # this script's folder is on sys.path (Python puts it there), see _package.py

_package.register()
ROOT = _package.ROOT
sys.path.insert(0, str(ROOT / "scripts"))  # comfy_client

DEFAULT_WORKFLOW = ROOT / "workflows" / "transparent_sd15_diffumatting.json"
THRESHOLD_HELP = {
    "max_backing_residual": "reject when the clear backing's mean RGB distance from the key colour is above this",
    "min_head_iou": "reject when the matting head's alpha and GreenPost's overlap (IoU at 0.5) less than this",
    "max_border_touch": "reject when the object covers more than this share of the image border",
    "max_objects": "reject when there are more separate objects than this",
    "min_coverage": "reject when the mean alpha is below this (empty or tiny object)",
    "max_green_object": "reject when more than this share of the solid object is key-coloured",
    "max_phash_distance": "reject as a near-duplicate of an accepted sample within this many perceptual-hash bits",
}


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated whole numbers, e.g. 1,2,3")


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers LO,HI such as 0.5,0.9") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    from diffumatting.models.dataset_quality import Thresholds

    p = argparse.ArgumentParser(prog="make_dataset.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (new, or an earlier run's to resume)")
    g = p.add_argument_group("what to make")
    g.add_argument("--prompts", type=Path, help="text file, one prompt per line (# comments, blank lines ignored)")
    g.add_argument("--categories", type=Path, help="text file of categories, one per line (default: hard edges: "
                   "hair, fur, feathers, foliage, glass, smoke, mesh, thin wires, clear plastic)")
    g.add_argument("--templates", type=Path, help="text file of templates with {category}, one per line")
    g.add_argument("--samples-per-prompt", type=int, default=1, help="samples per prompt (default 1)")
    g.add_argument("--seed", type=int, default=0, help="base seed; each sample's seed derives from it, the prompt "
                   "and the sample number (default 0)")
    g.add_argument("--seeds", type=_seeds, help="explicit seeds, comma-separated, used for every prompt "
                   "(overrides --samples-per-prompt)")
    g.add_argument("--limit", type=int, help="make only the first N samples of the list")
    g.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW,
                   help="workflow JSON (UI or API format) with a sampler, a prompt node and GreenPost or "
                        "DiffuMatting VAE Decode (default: workflows/transparent_sd15_diffumatting.json)")
    w = p.add_argument_group("where to run")
    w.add_argument("--servers", help="comma-separated ComfyUI URLs (one server per GPU), e.g. "
                   "http://127.0.0.1:8188,http://127.0.0.1:8189")
    w.add_argument("--launch", type=int, help="start N local ComfyUI servers of the dev host (.host/ComfyUI), "
                   "one per GPU if there are GPUs; they are restarted if they die")
    w.add_argument("--comfy-base", type=Path, help="with --launch: a ComfyUI base folder whose models/ and "
                   "input/ the servers use")
    w.add_argument("--models-dir", type=Path, help="ComfyUI models folder, to record the model files' sha256 "
                   "in the manifest (default with --launch: the base's models)")
    w.add_argument("--depth", type=int, default=2, help="prompts queued per server at once (default 2)")
    w.add_argument("--job-timeout", type=float, default=1800.0, help="seconds before a sample counts its server "
                   "as hung (default 1800)")
    o = p.add_argument_group("outputs")
    o.add_argument("--trimap-band", type=int, default=8, help="unknown band around the edge, in pixels (default 8)")
    o.add_argument("--composites", type=int, default=0, help="composites over --backgrounds per sample")
    o.add_argument("--backgrounds", type=Path, help="folder of background images for --composites")
    o.add_argument("--composite-scale", type=_range, default=(0.5, 0.9),
                   help="object size as a share of the background's shorter side, LO,HI (default 0.5,0.9)")
    o.add_argument("--key-color", default="#00b140", help="the backing's key colour for the scores (#RRGGBB)")
    o.add_argument("--assets", action="store_true", help="artist mode: one trimmed transparent PNG per sample, "
                   "named after its prompt, plus the contact sheet")
    o.add_argument("--asset-bits", type=int, choices=(8, 16), default=8, help="bit depth of --assets PNGs")
    o.add_argument("--asset-padding", type=int, default=8, help="transparent pixels kept around trimmed assets")
    o.add_argument("--sheet-max", type=int, default=64, help="samples on the contact sheet (default 64)")
    f = p.add_argument_group("quality filters (rejects go to rejected/ with the reason)")
    f.add_argument("--no-filter", action="store_true", help="score every sample but reject none")
    for name in Thresholds.names():
        default = getattr(Thresholds(), name)
        f.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{THRESHOLD_HELP[name]} (default {default})")
    p.add_argument("--demo", action="store_true", help="2 local servers with the tiny test model, 8 samples")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.demo:
        if a.servers or a.launch:
            p.error("--demo starts its own 2 servers; leave out --servers and --launch")
    elif bool(a.servers) == bool(a.launch):
        p.error("give exactly one of --servers URL[,URL...] (running servers) or --launch N (start them)")
    if a.launch is not None and a.launch < 1:
        p.error(f"--launch {a.launch}: give 1 or more servers")
    if a.launch and not a.comfy_base:
        p.error("--launch needs --comfy-base, the ComfyUI folder with the models (models/checkpoints, ...)")
    if a.comfy_base and not (a.comfy_base / "models").is_dir():
        p.error(f"--comfy-base {a.comfy_base} has no models/ folder; give a ComfyUI base folder")
    if a.servers:
        for url in a.servers.split(","):
            if not url.strip().startswith(("http://", "https://")):
                p.error(f"--servers entry {url!r} is not an http(s) URL; write e.g. http://127.0.0.1:8188")
    for name, lo in (("samples_per_prompt", 1), ("depth", 1), ("trimap_band", 0), ("composites", 0),
                     ("asset_padding", 0), ("sheet_max", 1)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected {lo} or more")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit {a.limit}: expected 1 or more")
    if a.job_timeout <= 0:
        p.error(f"--job-timeout {a.job_timeout}: expected a positive number of seconds")
    if a.composites and not a.backgrounds:
        p.error("--composites needs --backgrounds, a folder of background images")
    lo, hi = a.composite_scale
    if not 0 < lo <= hi <= 1:
        p.error(f"--composite-scale {lo},{hi}: expected 0 < LO <= HI <= 1")
    if not a.workflow.is_file():
        p.error(f"--workflow {a.workflow} does not exist; pick one of {ROOT / 'workflows'} or your own export")
    try:
        from diffumatting.models.alpha import parse_hex_color

        a.key_rgb = parse_hex_color(a.key_color)
    except ValueError as e:
        p.error(f"--key-color: {e}")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(143)  # unwinds through `finally`: servers this run launched are stopped


def main(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    validate(p, a)
    if a.demo or a.launch:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from diffumatting.factory.jobs import JobError, load_prompts, make_jobs
    from diffumatting.factory.output import OutputError
    from diffumatting.factory.run import LocalServers, RunConfig, gpu_count, load_backgrounds, run_dataset
    from diffumatting.factory.sample import SampleOptions
    from diffumatting.factory.scheduler import SchedulerError, Server
    from diffumatting.factory.workflow import WorkflowPlanError
    from diffumatting.models.dataset_quality import Thresholds

    local = demo_base = None
    try:
        if a.demo:
            prompts = load_prompts()[:4]
            jobs = make_jobs(prompts, 2, a.seed)
        else:
            prompts = load_prompts(a.prompts, a.categories, a.templates)
            jobs = make_jobs(prompts, a.samples_per_prompt, a.seed, a.seeds)
        if a.limit:
            jobs = jobs[:a.limit]
        backgrounds = load_backgrounds(a.backgrounds)
        try:
            workflow = json.loads(a.workflow.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise JobError(f"--workflow {a.workflow} is not JSON ({e}); export it from ComfyUI (Save or Export "
                           f"(API))") from None
        models_dir = a.models_dir
        if a.demo:
            from diffumatting.factory.demo import tiny_base, tiny_workflow

            demo_base = tiny_base(Path(tempfile.mkdtemp(prefix="diffumatting_demo_base_")))
            workflow = tiny_workflow(workflow)
            local = LocalServers(2, demo_base)
            models_dir = demo_base / "models"
        elif a.launch:
            local = LocalServers(a.launch, a.comfy_base, gpu_count())
            models_dir = models_dir or a.comfy_base / "models"
        if local is not None:
            print(f"[dataset] starting {len(local.comfy)} ComfyUI servers", file=sys.stderr, flush=True)
            servers = local.start()
        else:
            servers = [Server(u.strip()) for u in a.servers.split(",")]
        thresholds = Thresholds(**{n: getattr(a, n) for n in Thresholds.names()})
        sample = SampleOptions(a.trimap_band, a.composites, a.composite_scale, a.key_rgb, a.assets, a.asset_bits,
                               a.asset_padding)
        cfg = RunConfig(a.out.resolve(), workflow, jobs, servers, sample, thresholds, not a.no_filter,
                        backgrounds, models_dir, a.depth, a.job_timeout, a.sheet_max, not a.no_progress)
        summary = run_dataset(cfg)
    except (JobError, OutputError, SchedulerError, WorkflowPlanError) as e:
        print(f"[dataset] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[dataset] abandoned the running samples; every finished sample is written. Run the same command "
              "again to resume.", file=sys.stderr)
        return 130
    finally:
        if local is not None:
            local.stop()
        if demo_base is not None:
            shutil.rmtree(demo_base, ignore_errors=True)
    print(json.dumps(summary, indent=1), file=sys.stderr)
    print(a.out.resolve())
    if summary["interrupted"]:
        return 130
    return 3 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
