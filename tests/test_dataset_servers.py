"""Dataset factory on 2 real ComfyUI servers (loopback, tiny model): a server killed mid-run, Ctrl-C and
resume, the output formats, a full output disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from comfy_client import ComfyServer

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "transparent_sd15.json"
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def second_server(server_base, server_models, tmp_path_factory):
    """A second server on the session server's models, with its own output/user/temp folders."""
    own = tmp_path_factory.mktemp("second_server")
    for sub in ("output", "temp", "user"):
        (own / sub).mkdir()
    server = ComfyServer(server_base, extra_args=("--output-directory", str(own / "output"), "--temp-directory",
                                                  str(own / "temp"), "--user-directory", str(own / "user")))
    thread = threading.Thread(target=server.start)  # starts while the session server starts
    thread.start()
    yield server, thread
    server.stop()


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def _fast_workflow(path: Path = WORKFLOW) -> dict:
    """A shipped workflow (default: the green-canvas one) with one sampling step: the tiny model's samples cost
    seconds on this CPU, and the steps do not change what the dataset code does with them."""
    from fixtures_host import shrink_for_tiny

    wf = shrink_for_tiny(json.loads(path.read_text()))
    for node in wf["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 1
    return wf


def _config(out, jobs, servers, **kw):
    from diffumatting.factory.run import RunConfig

    return RunConfig(out, _fast_workflow(), jobs, servers, progress=False, **kw)


@pytest.fixture(scope="module")
def killed_run(comfy_server, second_server, tmp_path_factory):
    """4 samples on servers A and B; B is killed (SIGKILL) after its first finished sample."""
    from diffumatting.factory.jobs import make_jobs
    from diffumatting.factory.run import run_dataset
    from diffumatting.factory.scheduler import Server

    b, thread = second_server
    thread.join()
    out = tmp_path_factory.mktemp("killed") / "ds"
    jobs = make_jobs(["a wire basket", "a glass jar"], 2, base_seed=1)
    servers = [Server(comfy_server.url, name="A"), Server(b.url, name="B")]

    def killer():
        while servers[1].done < 1 and b.proc.poll() is None:
            time.sleep(0.02)
        os.killpg(b.proc.pid, signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    summary = run_dataset(_config(out, jobs, servers, filter=False), log=lambda m: None, install_sigint=False)
    return out, jobs, summary, comfy_server


def test_killed_server_run_completes_with_every_id_once(killed_run):
    out, jobs, summary, _ = killed_run
    ids = [x["id"] for x in _lines(out)]
    assert sorted(ids) == sorted(j.id for j in jobs), "every id exactly once"
    per = {s["server"]: s for s in summary["servers"]}
    assert per["B"]["deaths"] == 1 and per["B"]["samples"] >= 1 and per["A"]["samples"] >= 1
    assert per["A"]["samples"] + per["B"]["samples"] >= len(jobs)
    assert summary["failed"] == {} and (out / "contact_sheet.png").is_file()


def test_output_formats(killed_run):
    out, _, _, server_a = killed_run
    for rec in _lines(out):
        assert {"id", "prompt", "seed", "scores", "timings", "models", "settings", "workflow_sha256"} <= set(rec)
        files = {k: out / v for k, v in rec["files"].items()}
        assert {"fg.png", "alpha.png", "trimap.png", "green.png"} <= set(files)
        alpha = cv2.imread(str(files["alpha.png"]), cv2.IMREAD_UNCHANGED)
        fg = cv2.imread(str(files["fg.png"]), cv2.IMREAD_UNCHANGED)
        tri = cv2.imread(str(files["trimap.png"]), cv2.IMREAD_UNCHANGED)
        assert alpha.dtype == np.uint16 and alpha.ndim == 2 and fg.dtype == np.uint16 and fg.shape[-1] == 3
        assert set(np.unique(tri)) <= {0, 128, 255}
        if rec["server"] == "A":  # its own 16-bit save is still in the server's output folder
            key = sorted((server_a.base / "output").rglob(f"{rec['id']}/key_*.png"))[-1]
            raw = cv2.imread(str(key), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(raw[..., 3], alpha), "16-bit alpha must round-trip exactly"
            assert np.array_equal(raw[..., :3], fg), "fg must be the straight colour GreenPost saved"


def test_sigint_then_resume_no_duplicates_no_partial_files(killed_run, tmp_path):
    total = 10  # samples the interrupted run would make
    _, _, _, server_a = killed_run
    out = tmp_path / "ds"
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(_fast_workflow()))
    cmd = [sys.executable, str(ROOT / "make_dataset.py"), "--out", str(out), "--servers", server_a.url,
           "--workflow", str(workflow), "--samples-per-prompt", "3", "--seed", "9", "--no-progress"]
    proc = subprocess.Popen(cmd + ["--limit", str(total)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        m = out / "manifest.jsonl"
        if m.is_file() and m.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    at_signal = len(_lines(out))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    first = _lines(out)
    # After Ctrl-C only the running samples finish: the one executing on the server and those already fetched
    # and being scored (how many depends on the machine's load), never the rest of the run.
    assert 1 <= len(first) < total, \
        f"Ctrl-C stops handing out work: {at_signal} samples at the signal, {len(first)} of {total} at the end"
    assert not list(out.rglob(".*")), "no partial files (models/atomic's hidden temporaries)"
    dirs = {p.name for p in [*(out / "samples").glob("*"), *(out / "rejected").glob("*")] if p.is_dir()}
    assert dirs == {r["id"] for r in first}, "every written sample has its manifest line"
    before = (out / "manifest.jsonl").read_bytes()
    r = subprocess.run(cmd + ["--limit", str(len(first) + 1)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(first)} of {len(first) + 1} samples already finished" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out)
    after = (out / "manifest.jsonl").read_bytes()
    assert after.startswith(before), "finished lines are kept as they were"
    ids = [x["id"] for x in _lines(out)]
    assert len(ids) == len(set(ids)) == len(first) + 1


def test_full_output_disk_is_a_clear_error(killed_run, tmp_path):
    from diffumatting.factory.jobs import make_jobs
    from diffumatting.factory.output import OutputError
    from diffumatting.factory.run import run_dataset
    from diffumatting.factory.scheduler import Server

    from support.small_disk import small_tmpfs

    _, _, _, server_a = killed_run
    with small_tmpfs(tmp_path / "small_disk", "48k") as mount:
        # depth 1: the first sample's write fails and no second sample is running then (at depth 2 the run
        # would wait for it before stopping; it adds nothing to this test)
        cfg = _config(mount / "ds", make_jobs(["a tin can"], 3, base_seed=3), [Server(server_a.url)],
                      filter=False, depth=1)
        with pytest.raises(OutputError, match="output disk is full") as e:
            run_dataset(cfg, log=lambda m: None, install_sigint=False)
        assert "resume" in str(e.value)
        assert not list((mount / "ds").rglob(".*")), "no partial files left on the full disk"


def test_head_workflow_makes_a_sample(comfy_server, tmp_path):
    """`make dataset-demo`'s default workflow (a matting head, its refinement moved into a GreenPost node the
    plan adds): one sample through the server, the head's alpha kept beside GreenPost's."""
    from diffumatting.factory.jobs import make_jobs
    from diffumatting.factory.run import RunConfig, run_dataset
    from diffumatting.factory.scheduler import Server

    workflow = _fast_workflow(ROOT / "workflows" / "transparent_sd15_diffumatting.json")
    cfg = RunConfig(tmp_path / "ds", workflow, make_jobs(["a glass"], 1, base_seed=5), [Server(comfy_server.url)],
                    progress=False, filter=False, depth=1)
    summary = run_dataset(cfg, log=lambda m: None, install_sigint=False)
    assert summary["made"] == 1 and summary["failed"] == {}, summary
    (rec,) = _lines(tmp_path / "ds")
    assert {"fg.png", "alpha.png", "head_alpha.png"} <= set(rec["files"])
    assert rec["scores"]["head_mad"] is not None and rec["scores"]["head_iou"] is not None


def test_prompt_with_an_invalid_output_stops_the_run(comfy_server):
    """The server runs what validates and drops the rest without an error (it only logs "Output will be
    ignored"): the scheduler refuses such a prompt with the server's reasons instead of waiting for files."""
    import asyncio

    from diffumatting.factory.jobs import make_jobs
    from diffumatting.factory.scheduler import PromptRejected, Scheduler, Server

    def save(image):
        return {"class_type": "DiffuMattingSaveRGBA", "inputs": {
            "image": image, "filename_prefix": "tests/partial", "bit_depth": "8", "trim": False, "padding": 0,
            "save_matte": False}}

    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": save(["1", 0]),
              "3": {"class_type": "DiffuMattingGreenPost", "inputs": {"image": ["1", 0]}},  # widgets missing
              "4": save(["3", 2])}

    async def commit(result):
        raise AssertionError("nothing may be committed")

    sched = Scheduler([Server(comfy_server.url)], lambda job: (prompt, {"key": "4"}), commit, depth=1)
    with pytest.raises(PromptRejected, match="refused part of the workflow.*Required input is missing"):
        asyncio.run(sched.run(make_jobs(["x"], 1)))


def test_plan_adapts_every_shipped_workflow(comfy_server):
    """Against the real server's /object_info: prompt text and seeds found, the pack's keying used, the
    workflow's own outputs replaced by the dataset's two 16-bit saves; a keying-only workflow is refused."""
    from comfy_client import ui_to_api
    from diffumatting.factory.workflow import WorkflowPlanError, job_prompt, plan_workflow

    info = comfy_server.object_info()
    expect_head = {"transparent_sd15_diffumatting": True, "transparent_sd15": False, "transparent_sdxl": False,
                   "transparent_flux": False}
    for path in sorted((ROOT / "workflows").glob("*.json")):
        api = ui_to_api(json.loads(path.read_text()), info, missing_files_ok=True)
        if path.stem not in expect_head:
            with pytest.raises(WorkflowPlanError, match="sampler"):
                plan_workflow(api, info)
            continue
        plan = plan_workflow(api, info)
        assert plan.has_head is expect_head[path.stem], path.stem
        prompt = job_prompt(plan, "a brass key", 1234, "ds/x")
        outputs = [n for n in prompt.values() if info[n["class_type"]].get("output_node")]
        assert sorted(n["inputs"]["filename_prefix"] for n in outputs) == ["ds/x/green", "ds/x/key"]
        assert all(n["inputs"]["bit_depth"] == "16" for n in outputs)
        assert {prompt[nid]["inputs"][k] for nid, k in plan.text_targets} == {"a brass key"}
        assert {prompt[nid]["inputs"][k] for nid, k in plan.seed_targets} == {1234}
        negatives = {nid: n["inputs"]["text"] for nid, n in api.items() if n["class_type"] == "CLIPTextEncode"
                     and (nid, "text") not in plan.text_targets}
        assert {nid: prompt[nid]["inputs"]["text"] for nid in negatives} == negatives, "the negative prompt is left alone"
        # Flux runs at cfg 1: its negative is ConditioningZeroOut of the positive, with no text of its own.
        assert bool(negatives) == (path.stem != "transparent_flux"), (path.stem, negatives)
