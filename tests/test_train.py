"""The headless trainer (train.py) on the tiny SD1.5-shaped checkpoint, on the CPU.

- config errors are clear; --help lists the flags
- a run stopped mid-stage (twice) and resumed ends with exactly the weights of an uninterrupted run
- Ctrl-C writes a checkpoint and exits cleanly (exit code 130)
- the written LoRA, UNet and head load in core's LoraLoader and the pack's node code
- the losses do their job: green-attention IoU rises with the green loss and not without it; the
  head's held-out alpha error ends well below its start
- torchrun --nproc_per_node 2 (gloo) follows the single-process loss curve with the same global batch
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Tolerance of the torchrun comparison: per-step losses within 1e-4 relative (+1e-5 absolute); log.csv keeps
# 6 significant digits, and the two runs differ only in the order of floating-point reductions.
DDP_RTOL, DDP_ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def tiny_ckpt(comfy_host, tmp_path_factory) -> Path:
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    return cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latent_cache")


def small_args(ckpt, cache, out, *extra) -> list[str]:
    """The tiny preset, made smaller still: 8 generated objects, 2 held out, 1-image sample grids."""
    return ["--preset", "tiny", "--out", str(out), "--checkpoint", str(ckpt), "--no-progress",
            "--set", "model.tiny=false", "--set", f"data.cache_dir={cache}", "--set", "data.synthetic_count=8",
            "--set", "data.holdout=2", "--set", "run.sample_count=1", "--set", "run.sample_steps=2",
            "--set", "run.log_every=1", "--set", "run.checkpoint_every=2", "--set", "run.keep_checkpoints=2",
            *extra]


def run_train(args, timeout=1200, env_extra=None, cmd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.run((cmd or [PY, str(ROOT / "train.py")]) + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def ok(proc) -> str:
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def read_log(out) -> list[dict]:
    with open(Path(out) / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a, b, skip=()):
    ta, tb = tensors(a), tensors(b)
    ta = {k: v for k, v in ta.items() if not k.startswith(tuple(skip))} if skip else ta
    tb = {k: v for k, v in tb.items() if not k.startswith(tuple(skip))} if skip else tb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


# --- config --------------------------------------------------------------------------------------------
def test_config_errors_are_actionable(tmp_path):
    proc = run_train(["--preset", "tiny", "--out", str(tmp_path), "--set", "unet.lrr=1"])
    assert proc.returncode == 2
    assert "unknown key unet.lrr (did you mean 'lr'?)" in proc.stderr
    proc = run_train(["--out", str(tmp_path), "--set", "data.resolution=100", "--set", "unet.mode=half"])
    assert proc.returncode == 2
    for text in ("model.checkpoint is empty: pass --checkpoint", "data.resolution 100 must be a multiple of 64",
                 "unet.mode 'half': use one of 'lora', 'full'", "data.path is empty"):
        assert text in proc.stderr, proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[unet]\nsteps = 'many'\n")
    proc = run_train(["--config", str(bad), "--preset", "tiny"])
    assert proc.returncode == 2 and "bad.toml: unet.steps must be an integer, got 'many'" in proc.stderr
    proc = run_train(["--help"])
    assert proc.returncode == 0
    for flag in ("--resume", "--preset", "--stop-after", "--set SECTION.KEY=VALUE", "--checkpoint"):
        assert flag in proc.stdout
    proc = run_train(["--preset", "tiny", "--out", str(tmp_path), "--print-config"])
    assert proc.returncode == 0 and "[loss]" in proc.stdout and "green_factors = [1]" in proc.stdout


# --- resume ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(tiny_ckpt, cache_dir, tmp_path_factory) -> Path:
    """LoRA mode, 5 UNet steps + 4 head steps, uninterrupted (also the single-process DDP reference)."""
    out = tmp_path_factory.mktemp("straight")
    ok(run_train(small_args(tiny_ckpt, cache_dir, out, "--mode", "lora", "--unet-steps", "5", "--head-steps", "4")))
    return out


def test_resume_equals_uninterrupted(straight_run, tiny_ckpt, cache_dir, tmp_path):
    out = tmp_path / "resumed"
    base = small_args(tiny_ckpt, cache_dir, out, "--mode", "lora", "--unet-steps", "5", "--head-steps", "4")
    text = ok(run_train(base + ["--stop-after", "3"]))               # stops inside the UNet stage
    assert "stopped after 3 steps" in text
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    assert not (out / "diffumatting_lora.safetensors").exists()
    text = ok(run_train(base + ["--resume", "--stop-after", "4"]))   # 2 UNet steps + 2 head steps
    assert "resumed unet at step 3" in text
    ok(run_train(base + ["--resume"]))
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("diffumatting_lora.safetensors", "diffumatting_head.safetensors"):
        assert_same_tensors(straight_run / name, out / name)
        mode = (out / name).stat().st_mode & 0o777          # exports honour the umask (issue 13 defect 7)
        assert mode == 0o666 & ~umask, (name, oct(mode), oct(umask))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["head-0000002", "head-0000004"], ckpts        # keep_checkpoints = 2, no temporaries
    assert_same_tensors(straight_run / "checkpoints/head-0000004/optimizer.safetensors",
                        out / "checkpoints/head-0000004/optimizer.safetensors", skip=("rng.",))
    a, b = read_log(straight_run), read_log(out)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in b]
    assert [(r["stage"], r["step"]) for r in a] == [("unet", str(i)) for i in range(1, 6)] + \
        [("head", str(i)) for i in range(1, 5)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["bad_samples"] == []
    assert (out / "samples" / "unet-0000005.png").is_file() and (out / "samples" / "head-0000004.png").is_file()


def one_error_line(proc) -> str:
    """The single 'train.py: error:' line of a failed run (no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_refused_resume_bad_log_row_and_nan_loss_keep_the_run_resumable(straight_run, tiny_ckpt, cache_dir, tmp_path):
    """Issue 13 defects 3-5 on one run stopped after 2 UNet steps:
    - a --resume refused for a changed setting leaves config.toml as it was (a later plain --resume works);
    - a half-written last row of log.csv (kill during the append) is dropped, not a crash;
    - a loss that turns non-finite stops the run with one clear line and exit code 1, writing nothing:
      the newest checkpoint stays the last good one, and the run continues from it;
    - killed with SIGKILL and resumed, the run still ends bit-identical to an uninterrupted one."""
    out = tmp_path / "run"
    base = small_args(tiny_ckpt, cache_dir, out, "--mode", "lora", "--unet-steps", "5", "--head-steps", "4")
    ok(run_train(base + ["--stop-after", "2"]))
    config_before = (out / "config.toml").read_text()
    proc = run_train(base + ["--resume", "--set", "data.resolution=128"])
    assert proc.returncode == 2 and "data.resolution" in one_error_line(proc)
    assert (out / "config.toml").read_text() == config_before
    with open(out / "log.csv", "a") as fh:
        fh.write("1.5,un")                           # a row cut off by a kill (the first version crashed on it)
    proc = run_train(base + ["--resume", "--set", "unet.lr=1e30", "--set", "unet.warmup=0"])
    line = one_error_line(proc)
    assert proc.returncode == 1 and "non-finite unet loss at step 4" in line and "unet-0000002" in line, line
    from diffumatting.training.state import list_checkpoints

    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["unet-0000002"]
    assert not (out / "diffumatting_lora.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and "non-finite" in summary["error"]
    # Resumed with the learning rate lowered again (the failed run's config.toml has lr 1e30), killed with
    # SIGKILL inside the head stage, then resumed again with a plain --resume (config.toml): the run ends
    # bit-identical to the uninterrupted one.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PY, str(ROOT / "train.py"), "--out", str(out), "--resume", "--no-progress",
                             "--set", "unet.lr=1e-4", "--set", "unet.warmup=10"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if any(r["stage"] == "head" for r in read_log(out)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed in the head stage"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = ok(run_train(["--out", str(out), "--resume", "--no-progress"]))
    assert "resumed head at step" in text or "stage unet: already complete" in text
    for name in ("diffumatting_lora.safetensors", "diffumatting_head.safetensors"):
        assert_same_tensors(straight_run / name, out / name)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]   # noqa: E731
    assert strip(read_log(out)) == strip(read_log(straight_run))


def test_weak_spots_give_one_clear_line(tiny_ckpt, cache_dir, tmp_path):
    out = tmp_path / "w"
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "notes.txt").write_text("x")
    base = small_args(tiny_ckpt, cache_dir, out, "--mode", "lora", "--unet-steps", "2", "--stages", "unet")
    cases = [
        (["--seed", "-3"], "run.seed must be >= 0 and <= 4294967295, got -3"),
        (["--set", "unet.lr=inf"], "unet.lr is inf"),
        (["--set", "loss.green=nan"], "loss.green is nan"),
        (["--resume", str(tmp_path / "no_such_checkpoint")], "no such checkpoint folder"),
        (["--resume", str(tmp_path / "not_a_checkpoint")], "is not a trainer checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU that torch can use"))
    for extra, text in cases:
        proc = run_train(base + extra)
        assert proc.returncode == 2 and text in one_error_line(proc), (extra, proc.stderr[-2000:])
    proc = run_train(base + ["--set", "unet.lora_targets=attn9.to_z"])
    assert proc.returncode == 2 and "match no Linear layer" in one_error_line(proc)


# --- Ctrl-C on a folder of RGBA PNGs with a bad file -----------------------------------------------------
def _write_rgba_folder(folder: Path, n: int = 6):
    from PIL import Image

    from diffumatting.models.synthetic import random_object

    folder.mkdir(parents=True)
    for i in range(n):
        fg, a = random_object(48, 48, seed=i)
        rgba = np.concatenate([fg, a[..., None]], axis=2)
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(folder / f"red_toy_{i}.png")
    (folder / "red_toy_0.txt").write_text("a red plush toy")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "no_alpha.png")


def test_ctrl_c_writes_checkpoint_and_exits_cleanly(tiny_ckpt, cache_dir, tmp_path):
    data = tmp_path / "pngs"
    _write_rgba_folder(data)
    out = tmp_path / "run"
    args = small_args(tiny_ckpt, cache_dir, out, "--mode", "lora", "--unet-steps", "500", "--stages", "unet",
                      "--data", str(data), "--set", "data.holdout=1", "--set", "run.checkpoint_every=1000")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PY, str(ROOT / "train.py")] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            log = out / "log.csv"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "data: skipping broken.png: unreadable" in stdout
    assert "data: skipping no_alpha.png: no alpha channel" in stdout
    assert "interrupted: checkpoint written" in stdout
    from diffumatting.training.state import list_checkpoints

    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and not list((out / "checkpoints").glob(".tmp-*"))
    state = json.loads((ckpts[0] / "state.json").read_text())
    step = int(state["step"])
    assert 2 <= step < 500 and state["done"] is False
    rows = read_log(out)
    assert int(rows[-1]["step"]) == step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and len(summary["bad_samples"]) == 2


# --- the losses do their job --------------------------------------------------------------------------
JOB_STEPS = ["--unet-steps", "40", "--set", "unet.lr=3e-4", "--set", "data.cache_variants=1",
             "--set", "data.synthetic_count=48", "--set", "data.holdout=8", "--set", "run.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def green_on_run(tiny_ckpt, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("green_on")
    text = ok(run_train(small_args(tiny_ckpt, cache_dir, out, "--mode", "full", "--head-steps", "150", *JOB_STEPS)))
    (out / "stdout.txt").write_text(text)
    return out


def test_losses_do_their_job(green_on_run, tiny_ckpt, cache_dir, tmp_path):
    off = tmp_path / "green_off"
    ok(run_train(small_args(tiny_ckpt, cache_dir, off, "--mode", "full", "--stages", "unet", *JOB_STEPS,
                            "--set", "loss.green=0")))
    on_m = json.loads((green_on_run / "summary.json").read_text())["measures"]
    off_m = json.loads((off / "summary.json").read_text())["measures"]
    assert on_m["green_iou_before"] == pytest.approx(off_m["green_iou_before"])   # same model, same samples
    rise_on = on_m["green_iou_after"] - on_m["green_iou_before"]
    rise_off = off_m["green_iou_after"] - off_m["green_iou_before"]
    assert rise_on >= 0.06, on_m
    assert rise_off <= 0.02, off_m
    assert on_m["green_iou_after"] - off_m["green_iou_after"] >= 0.08
    # The matting head: held-out alpha error ends well below its start, and below the best constant answer
    # (a head collapsed to "all background" would score that).
    assert on_m["head_error_after"] < 0.6 * on_m["head_error_before"], on_m
    assert on_m["head_error_after"] < 0.7 * on_m["head_error_constant"], on_m
    # The learning check's other lines are measured: edge sharpness of the decoded x0 before/after, and the
    # input-ignoring answers (one mean background map for the IoU, a flat image for the sharpness).
    for key in ("green_iou_constant", "edge_sharpness_before", "edge_sharpness_after", "edge_sharpness_constant"):
        assert np.isfinite(on_m[key]) and on_m[key] >= 0, (key, on_m)
    assert 0 < on_m["green_iou_constant"] < 1
    text = (green_on_run / "stdout.txt").read_text()
    for line in ("green attention IoU", "edge sharpness near the object", "head alpha error", "unet stage: median step"):
        assert line in text, text[-2000:]


def test_final_lines_report_losses_and_measures(green_on_run):
    summary = json.loads((green_on_run / "summary.json").read_text())
    assert set(summary["final_losses"]["unet"]) == {"loss", "diffusion", "green", "detail"}
    assert set(summary["final_losses"]["head"]) == {"loss", "l1", "grad", "comp", "bce"}
    assert summary["files"]["unet"].endswith("diffumatting_unet.safetensors")


# --- outputs load in ComfyUI core and the pack's nodes ---------------------------------------------------
def test_outputs_load_in_core_and_nodes(straight_run, green_on_run, tiny_ckpt, comfy_host, tmp_path):
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import nodes as core_nodes

    from diffumatting.models.matting_head import load_head
    from diffumatting.nodes import generate
    from diffumatting.nodes import matting

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt))[:3]
    base = {k: v.clone() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}

    # LoRA through core's LoraLoader: every adapter maps to a UNet weight, with the trained delta.
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    lora_file = lora_dir / "dm_lora.safetensors"
    lora_file.write_bytes((straight_run / "diffumatting_lora.safetensors").read_bytes())
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    m2, _ = core_nodes.LoraLoader().load_lora(model, clip, "dm_lora.safetensors", 1.0, 0.0)
    sd = tensors(lora_file)
    names = {k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert names and all(n in key_map for n in names), sorted(n for n in names if n not in key_map)[:3]
    assert all(n.startswith("lora_unet_") and any(p in n for p in ("down_blocks", "mid_block", "up_blocks"))
               for n in names), sorted(names)[:3]  # diffusers-style kohya names
    comfy.model_management.load_models_gpu([m2])
    patched = m2.model.state_dict()
    checked = 0
    for n in sorted(names)[:6]:
        target = key_map[n]
        delta = sd[n + ".lora_up.weight"].float() @ sd[n + ".lora_down.weight"].float()
        delta = delta * float(sd[n + ".alpha"]) / sd[n + ".lora_down.weight"].shape[0]
        assert torch.allclose(patched[target].float(), base[target].float() + delta, atol=1e-4)
        checked += 1
    assert checked and any(float(sd[n + ".lora_up.weight"].abs().max()) > 0 for n in names)
    comfy.model_management.unload_all_models()

    # Full UNet through the pack's UNet loader node.
    unet_dir = tmp_path / "dm"
    unet_dir.mkdir()
    (unet_dir / "dm_unet.safetensors").write_bytes((green_on_run / "diffumatting_unet.safetensors").read_bytes())
    (unet_dir / "dm_head.safetensors").write_bytes((green_on_run / "diffumatting_head.safetensors").read_bytes())
    folder_paths.add_model_folder_path("diffumatting", str(unet_dir))
    (m3,) = generate.UNetLoader.execute(model, "dm_unet.safetensors", 1.0).args
    trained = tensors(unet_dir / "dm_unet.safetensors")
    meta_keys = {"kind", "format_version", "base_architecture", "phrase", "prediction"}
    from safetensors import safe_open

    with safe_open(str(unet_dir / "dm_unet.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta_keys <= set(meta) and meta["kind"] == "unet" and meta["base_architecture"] == "sd1"
    comfy.model_management.load_models_gpu([m3])
    patched = m3.model.state_dict()
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.allclose(patched[k].float(), trained[k].float(), atol=1e-6)
    assert not torch.allclose(patched[k].float(), base[k].float(), atol=1e-3), "the fine-tune changed nothing"
    comfy.model_management.unload_all_models()

    # Matting head through the pack's loader node and the matting decode node.
    loaded = load_head(unet_dir / "dm_head.safetensors", expected_family="sd1")
    (head,) = matting.HeadLoader.execute("dm_head.safetensors").args
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    outs = matting.MattingVAEDecode.execute(lat, vae, head, refine_with_greenpost=False).args
    alpha = [o for o in outs if isinstance(o, torch.Tensor) and o.ndim == 3]
    assert alpha and alpha[0].shape[-2:] == (64, 64) and 0 <= float(alpha[0].min()) <= float(alpha[0].max()) <= 1
    assert loaded.metadata["trainer"] == "diffumatting train.py"


# --- torchrun ------------------------------------------------------------------------------------------
def test_torchrun_two_ranks_follow_single_process(straight_run, tiny_ckpt, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    torchrun = str(Path(PY).with_name("torchrun"))
    args = ["--standalone", "--nproc_per_node", "2", str(ROOT / "train.py")] + small_args(
        tiny_ckpt, cache_dir, out, "--mode", "lora", "--unet-steps", "5", "--head-steps", "4",
        "--set", "run.threads=1")
    ok(run_train(args, cmd=[torchrun], timeout=1200, env_extra={"OMP_NUM_THREADS": "1"}))
    single, multi = read_log(straight_run), read_log(out)
    assert [(r["stage"], r["step"]) for r in single] == [(r["stage"], r["step"]) for r in multi]
    for a, b in zip(single, multi):
        for key in ("loss", "diffusion", "green", "detail", "l1", "grad", "comp", "bce"):
            if a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), rel=DDP_RTOL, abs=DDP_ATOL), (a, b, key)
    # Only rank 0 wrote: one set of files, and the trained LoRA matches the single-process one closely.
    sa, sb = tensors(straight_run / "diffumatting_lora.safetensors"), tensors(out / "diffumatting_lora.safetensors")
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst < 1e-3, worst
