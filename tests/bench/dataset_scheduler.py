"""Dataset factory on real ComfyUI servers (tiny test model, built now; CPU):

1. Scheduler overhead per sample: the same adapted workflow (workflows/transparent_sd15.json, the
   dataset's two 16-bit saves) on ONE server, (a) queued by hand through the API (POST /prompt, wait for
   the websocket's end message, GET /history, GET /view of both files; one sample at a time) and (b)
   through factory.scheduler.Scheduler with depth 1 (also one at a time) and a no-op commit. Rounds
   alternate (a) and (b), `--per-round` samples each, new seeds every time (nothing cached). On this
   shared CPU machine the workflow itself takes seconds with large swings, so each sample's figure is its
   residual: client wall from POST to files in hand minus the server's own execution time (the
   execution_start/execution_success timestamps in its history); both paths make the same requests, and
   the residuals still swing: per sample they are either tens of ms or ~1 s (the server pauses after a
   prompt, e.g. its periodic gc.collect, before it answers /history and /view), in either path at random. The overhead figure is therefore
   the client's CPU time per sample (this process, time.process_time: JSON, websocket, HTTP, the
   scheduler's bookkeeping), median over rounds of (b) - (a); the residual medians are printed beside it
   (the scheduler has no polling or sleeps, so it adds no waiting of its own). Also shown: the
   dataset's own per-sample work (decoding, scores, trimap, PNG encoding), which runs in worker threads
   while the server executes the next prompt. The KSampler runs 1 step (the tiny model's steps cost seconds on this CPU and change nothing the scheduler does).
2. Two servers, one killed (SIGKILL) after its first finished sample: the run must complete with every
   id exactly once in the manifest.

Last line: `overhead_ms=X residual_diff_ms=Y kill_run=ok|FAILED`. Target: X <= 20.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import _package  # noqa: E402  the pack as `diffumatting` (see _package.py)

_package.register()

import aiohttp  # noqa: E402

from comfy_client import ComfyServer, ui_to_api  # noqa: E402
from diffumatting.factory.jobs import make_jobs  # noqa: E402
from diffumatting.factory.run import RunConfig, run_dataset  # noqa: E402
from diffumatting.factory.scheduler import Scheduler, Server, fetch_object_info, server_exec_seconds  # noqa: E402,E501
from diffumatting.factory.workflow import job_prompt, plan_workflow  # noqa: E402

WORKFLOW = ROOT / "workflows" / "transparent_sd15.json"


async def hand_run(url: str, prompts: list[dict], roles: dict) -> list[float]:
    """Queue each prompt by hand, wait for it on the websocket, fetch its files. Per sample: client wall
    from POST to files in hand minus the server's own execution time (its history timestamps)."""
    cid = uuid.uuid4().hex
    residuals = []
    async with aiohttp.ClientSession() as s:
        await _check(s, url)
        ws = await s.ws_connect(f"{url}/ws?clientId={cid}")
        for prompt in prompts:
            t0 = time.perf_counter()
            async with s.post(url + "/prompt", json={"prompt": prompt, "client_id": cid}) as r:
                pid = (await r.json())["prompt_id"]
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    d = json.loads(msg.data)
                    if d["type"] == "executing" and d["data"].get("node") is None \
                            and d["data"].get("prompt_id") == pid:
                        break
            async with s.get(f"{url}/history/{pid}") as r:
                entry = (await r.json())[pid]
            for nid in roles.values():
                item = entry["outputs"][nid]["images"][0]
                async with s.get(url + "/view", params={"filename": item["filename"], "subfolder": item["subfolder"],
                                                        "type": item["type"]}) as r:
                    await r.read()
            residuals.append(time.perf_counter() - t0 - server_exec_seconds(entry))
        await ws.close()
    return residuals


async def _check(session, url):
    """What the scheduler does first (is the server there?), so both paths pay the same setup."""
    async with session.get(url + "/system_stats") as r:
        await r.json()


def cpu_per_sample(fn, n: int):
    """(fn's result, this process's CPU seconds per sample while it ran)."""
    c0 = time.process_time()
    out = fn()
    return out, (time.process_time() - c0) / n


def sched_run(server: Server, plan, jobs, depth: int) -> list[float]:
    """The same through the Scheduler (no-op commit); per-sample residuals as in hand_run."""
    residuals = []

    async def commit(result):
        residuals.append(result.timings["total_s"] - result.timings["server_exec_s"])

    def build(job):
        return job_prompt(plan, job.prompt, job.seed, f"bench/{job.id}"), dict(plan.save_nodes)

    sched = Scheduler([server], build, commit, depth=depth)
    asyncio.run(sched.run(jobs))
    if len(residuals) != len(jobs):
        raise RuntimeError(f"scheduler finished {len(residuals)} of {len(jobs)} samples")
    return residuals


def one_step_workflow() -> dict:
    from diffumatting.factory.demo import tiny_workflow

    wf = tiny_workflow(json.loads(WORKFLOW.read_text()))
    for node in wf["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 1
    return wf


def overhead(url: str, rounds: int, per_round: int, out: Path) -> dict:
    workflow = one_step_workflow()
    info = asyncio.run(fetch_object_info(Server(url)))
    plan = plan_workflow(ui_to_api(workflow, info), info)
    server = Server(url, name="bench")
    seeds = iter(range(10_000, 10_000_000))

    def fresh_jobs(n):
        return make_jobs(["a glass bottle"], seeds=[next(seeds) for _ in range(n)])

    def prompts(jobs):
        return [job_prompt(plan, j.prompt, j.seed, f"bench/{j.id}") for j in jobs]

    asyncio.run(hand_run(url, prompts(fresh_jobs(2)), plan.save_nodes))  # warm-up: model loading
    hand, depth1, post, cpu_hand, cpu_sched = [], [], [], [], []
    for r in range(rounds):
        h, ch = cpu_per_sample(lambda: asyncio.run(hand_run(url, prompts(fresh_jobs(per_round)), plan.save_nodes)),
                               per_round)
        d, cs = cpu_per_sample(lambda: sched_run(server, plan, fresh_jobs(per_round), 1), per_round)
        cfg = RunConfig(out / f"full{r}", workflow, fresh_jobs(per_round), [Server(url, name="bench")],
                        depth=1, progress=False)
        run_dataset(cfg, log=lambda m: None, install_sigint=False)
        recs = [json.loads(x) for x in (out / f"full{r}" / "manifest.jsonl").read_text().splitlines()]
        hand += h
        depth1 += d
        cpu_hand.append(ch)
        cpu_sched.append(cs)
        post += [x["timings"]["post_s"] for x in recs]
        print(f"round {r}: client CPU per sample: hand {ch * 1e3:.1f} ms, scheduler {cs * 1e3:.1f} ms | residual "
              f"(client wall - server execution): hand {statistics.median(h) * 1e3:.0f} ms, scheduler "
              f"{statistics.median(d) * 1e3:.0f} ms | server execution "
              f"~{statistics.median([x['timings']['server_exec_s'] for x in recs]):.2f} s/sample", flush=True)
    return {"cpu_hand_ms": statistics.median(cpu_hand) * 1e3, "cpu_sched_ms": statistics.median(cpu_sched) * 1e3,
            "overhead_ms": statistics.median([b - a for a, b in zip(cpu_hand, cpu_sched)]) * 1e3,
            "hand_residual_ms": statistics.median(hand) * 1e3, "sched_residual_ms": statistics.median(depth1) * 1e3,
            "residual_diff_ms": (statistics.median(depth1) - statistics.median(hand)) * 1e3,
            "residual_spread_ms": (max(hand + depth1) - min(hand + depth1)) * 1e3,
            "dataset_post_ms": statistics.median(post) * 1e3, "samples_per_path": len(hand)}


def kill_run(a: ComfyServer, b: ComfyServer, out: Path, n: int) -> bool:
    workflow = one_step_workflow()
    jobs = make_jobs(["a wire basket", "a glass"], n // 2, base_seed=7)
    servers = [Server(a.url, name="A"), Server(b.url, name="B")]
    cfg = RunConfig(out / "kill", workflow, jobs, servers, progress=False)

    def killer():
        while servers[1].done < 1:
            time.sleep(0.05)
        os.killpg(b.proc.pid, signal.SIGKILL)
        print(f"killed server B after {servers[1].done} sample(s)", flush=True)

    threading.Thread(target=killer, daemon=True).start()
    summary = run_dataset(cfg, log=lambda m: print("  ", m), install_sigint=False)
    lines = [json.loads(x) for x in (out / "kill" / "manifest.jsonl").read_text().splitlines()]
    ids = [x["id"] for x in lines]
    ok = sorted(ids) == sorted(j.id for j in jobs) and len(set(ids)) == len(ids)
    print(f"kill run: {len(ids)} manifest lines for {len(jobs)} ids, unique {len(set(ids)) == len(ids)}, "
          f"servers {summary['servers']}")
    return ok


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    p.add_argument("--per-round", type=int, default=3, help="samples per round and path (default 3)")
    p.add_argument("--kill-samples", type=int, default=6, help="samples in the kill run (default 6)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` etc.: stop the servers in `finally`
    from diffumatting.factory.demo import tiny_base

    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        tmp = Path(tmp)
        base = tiny_base(tmp / "base")
        for sub in ("out_b", "temp_b", "user_b"):
            (tmp / sub).mkdir()
        servers = [ComfyServer(base), ComfyServer(base, extra_args=(
            "--output-directory", str(tmp / "out_b"), "--temp-directory", str(tmp / "temp_b"),
            "--user-directory", str(tmp / "user_b")))]
        threads = [threading.Thread(target=s.start) for s in servers]
        [t.start() for t in threads]
        [t.join() for t in threads]
        try:
            res = overhead(servers[0].url, a.rounds, a.per_round, tmp)
            print(json.dumps({k: round(v, 2) for k, v in res.items()}, indent=1))
            ok = kill_run(servers[0], servers[1], tmp, a.kill_samples)
        finally:
            for s in servers:
                s.stop()
    print(f"overhead_ms={res['overhead_ms']:.1f} residual_diff_ms={res['residual_diff_ms']:.0f} "
          f"kill_run={'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
