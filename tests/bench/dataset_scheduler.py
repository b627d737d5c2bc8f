"""Dataset factory on real ComfyUI servers (tiny test model, built now; CPU):

1. Scheduler overhead per sample, against the peer the issue names: the same adapted workflow
   (workflows/transparent_sd15.json with the dataset's two 16-bit saves, 1 sampling step) on ONE server,
     hand       queued by hand through the API: POST /prompt, wait for the websocket's end message,
                GET /history, GET /view of both files; one sample at a time;
     scheduler  factory.scheduler.Scheduler, depth 1 (also one at a time), no-op commit;
     dataset    the whole factory (run_dataset, depth 1): plan, scheduler, scores, PNGs, manifest.
   Rounds rotate the three paths, `--per-round` samples each, new seeds every time (nothing cached).
   Per sample: wall from before its POST to its files in hand, the server's own execution time
   (execution_start -> execution_success in its history) and the residual (wall - execution), i.e. what
   the client path adds. Overhead = median residual (scheduler or dataset) - median residual (hand).

   ComfyUI's pause after a prompt: its prompt worker runs gc.collect() after a prompt when the last
   collection is more than 10 s old (or when that time comes while it waits for work); the collection holds
   the GIL, so the server's event loop (websocket messages, /history, /view) waits (main.py's prompt_worker, the same in
   0.3.75 and the newest ComfyUI). The bench replays that rule over the server's own history timestamps,
   marks the samples a collection followed, and prints the residuals with and without them per path, and
   where the pause landed (before the end message arrives, or in the fetch: a race between the worker's
   collection and the server's event loop). Every path meets the pause (it follows the clock, not the
   client; at >10 s per sample nearly every sample); the overhead figure is the median over the samples no
   collection followed, beside the median over all (which swings with how many samples each path had
   paused). The bench stops with an error when a path has no such sample (on a machine so loaded that
   every sample takes over 10 s): then run it with `--server-gc off`, which makes the overhead server's
   gc.collect() a no-op (every sample is then unpaused, in every path; the kill run is unchanged).
   Also printed: client CPU per sample (this process) and the dataset's own per-sample work (decoding,
   scores, trimap, PNG encoding; worker threads, overlapping the next prompt at depth 2).
2. Two servers, one killed (SIGKILL) after its first finished sample: every id exactly once in the manifest.

Last line: `overhead_ms=X ratio=R dataset_overhead_ms=Y ratio=R2 kill_run=ok|FAILED`. Target: X <= 20 (ms per
sample); R = (hand median wall + X) / hand median wall.
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
import urllib.request
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
GC_INTERVAL_S = 10.0  # ComfyUI main.py prompt_worker: gc_collect_interval
PATHS = ("hand", "scheduler", "dataset")


async def hand_run(url: str, prompts: list[dict], roles: dict) -> list[dict]:
    """Queue each prompt by hand, wait for it on the websocket, fetch its files. Per sample: prompt id, wall
    (POST to files in hand), the phases, the server's execution time."""
    cid = uuid.uuid4().hex
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/system_stats") as r:  # what the scheduler does first, so both pay it
            await r.json()
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
            t_done = time.perf_counter()
            async with s.get(f"{url}/history/{pid}") as r:
                entry = (await r.json())[pid]
            for nid in roles.values():
                item = entry["outputs"][nid]["images"][0]
                async with s.get(url + "/view", params={"filename": item["filename"], "subfolder": item["subfolder"],
                                                        "type": item["type"]}) as r:
                    await r.read()
            t_end = time.perf_counter()
            out.append({"pid": pid, "wall_s": t_end - t0, "fetch_s": t_end - t_done,
                        "exec_s": server_exec_seconds(entry)})
        await ws.close()
    return out


def sched_run(server: Server, plan, jobs) -> list[dict]:
    """The same through the Scheduler (depth 1, no-op commit)."""
    out = []

    async def commit(result):
        t = result.timings
        out.append({"pid": result.prompt_id, "wall_s": t["total_s"], "fetch_s": t["fetch_s"],
                    "exec_s": t["server_exec_s"]})

    def build(job):
        return job_prompt(plan, job.prompt, job.seed, f"bench/{job.id}"), dict(plan.save_nodes)

    asyncio.run(Scheduler([server], build, commit, depth=1).run(jobs))
    if len(out) != len(jobs):
        raise RuntimeError(f"scheduler finished {len(out)} of {len(jobs)} samples")
    return out


def dataset_run(url: str, workflow: dict, jobs, out: Path) -> list[dict]:
    """The whole factory at depth 1; per sample from its manifest line."""
    cfg = RunConfig(out, workflow, jobs, [Server(url, name="bench")], depth=1, progress=False, filter=False)
    run_dataset(cfg, log=lambda m: None, install_sigint=False)
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    return [{"pid": r["prompt_id"], "wall_s": r["timings"]["total_s"], "fetch_s": r["timings"]["fetch_s"],
             "exec_s": r["timings"]["server_exec_s"], "post_s": r["timings"]["post_s"]} for r in recs]


def history(url: str) -> dict:
    with urllib.request.urlopen(url + "/history", timeout=60) as r:
        return json.loads(r.read())


def gc_followed(entries: dict) -> tuple[set[str], dict[str, tuple[float, float]]]:
    """Prompt ids after which ComfyUI's prompt worker ran gc.collect() (before the next prompt started), by
    its rule replayed over the history's execution_start/execution_success stamps; and each id's stamps (s).
    The worker starts with last_gc = 0 on a monotonic clock that is far past 10 s, so its first prompt
    collects."""
    stamps = {}
    for pid, entry in entries.items():
        msgs = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])
                if isinstance(data, dict)}
        if msgs.get("execution_start") is not None and msgs.get("execution_success") is not None:
            stamps[pid] = (msgs["execution_start"] / 1000.0, msgs["execution_success"] / 1000.0)
    order = sorted(stamps, key=lambda p: stamps[p][0])
    followed, last_gc = set(), -float("inf")
    for k, pid in enumerate(order):
        end = stamps[pid][1]
        if end - last_gc > GC_INTERVAL_S:               # right after the prompt
            followed.add(pid)
            last_gc = end
            continue
        nxt = stamps[order[k + 1]][0] if k + 1 < len(order) else float("inf")
        if last_gc + GC_INTERVAL_S < nxt:               # its wait for work timed out first
            followed.add(pid)
            last_gc = last_gc + GC_INTERVAL_S
    return followed, stamps


# Runs ComfyUI's main.py with gc.collect made a no-op, so the prompt worker's post-prompt collection (the ~1 s
# pause) is gone for every path alike; Python's automatic generational collections still run.
_NO_COLLECT = ("import gc, runpy, sys; gc.collect = lambda generation=2: 0; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


class NoCollectServer(ComfyServer):
    """A ComfyUI server whose explicit gc.collect() calls do nothing (`--server-gc off`)."""

    def command(self) -> list[str]:
        python, *rest = super().command()
        return [python, "-c", _NO_COLLECT, *rest]


def one_step_workflow() -> dict:
    from diffumatting.factory.demo import tiny_workflow

    wf = tiny_workflow(json.loads(WORKFLOW.read_text()))
    for node in wf["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 1
    return wf


def _med_ms(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) * 1e3 if values else None


def overhead(url: str, rounds: int, per_round: int, out: Path, server_gc: bool = True) -> dict:
    workflow = one_step_workflow()
    info = asyncio.run(fetch_object_info(Server(url)))
    plan = plan_workflow(ui_to_api(workflow, info), info)
    seeds = iter(range(10_000, 10_000_000))

    def fresh_jobs(n):
        return make_jobs(["a glass bottle"], seeds=[next(seeds) for _ in range(n)])

    def prompts(jobs):
        return [job_prompt(plan, j.prompt, j.seed, f"bench/{j.id}") for j in jobs]

    asyncio.run(hand_run(url, prompts(fresh_jobs(2)), plan.save_nodes))  # warm-up: model loading
    samples: dict[str, list[dict]] = {p: [] for p in PATHS}
    cpu: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(rounds):
        for path in PATHS[r % 3:] + PATHS[:r % 3]:
            jobs = fresh_jobs(per_round)
            c0 = time.process_time()
            if path == "hand":
                got = asyncio.run(hand_run(url, prompts(jobs), plan.save_nodes))
            elif path == "scheduler":
                got = sched_run(Server(url, name="bench"), plan, jobs)
            else:
                got = dataset_run(url, workflow, jobs, out / f"dataset{r}")
            cpu[path].append((time.process_time() - c0) / per_round)
            samples[path] += got
        print(f"round {r}: " + " | ".join(
            f"{p} residual {_med_ms(x['wall_s'] - x['exec_s'] for x in samples[p][-per_round:]):.0f} ms"
            for p in PATHS) + f" | server execution ~{_med_ms(x['exec_s'] for x in samples['hand']) / 1e3:.2f} s",
            flush=True)
    followed = gc_followed(history(url))[0] if server_gc else set()
    return summarize(samples, cpu, followed)


def summarize(samples: dict[str, list[dict]], cpu: dict[str, list[float]], followed: set[str]) -> dict:
    """Per path: medians per sample (ms) over all samples, over those no collection followed ('clean') and
    over those it followed, where the pause landed (before the end message or in the fetch), client CPU."""
    res = {"samples_per_path": len(samples["hand"]), "gc_samples": {}}
    print(f"\nper sample, median ms ({len(samples['hand'])} samples per path; clean = no gc.collect() followed it; "
          f"gc pause split = residual before the end message / in the fetch)")
    print(f"{'path':10} {'wall':>8} {'server exec':>12} {'residual':>9} {'clean residual':>15} {'gc residual':>12} "
          f"{'gc pause split':>15} {'client CPU':>11} {'gc samples':>11}")
    for p in PATHS:
        xs = samples[p]
        for x in xs:
            x["residual_s"] = x["wall_s"] - x["exec_s"]
            x["gc"] = x["pid"] in followed
        clean = [x for x in xs if not x["gc"]]
        gc = [x for x in xs if x["gc"]]
        row = {"wall": _med_ms(x["wall_s"] for x in xs), "exec": _med_ms(x["exec_s"] for x in xs),
               "residual": _med_ms(x["residual_s"] for x in xs),
               "clean": _med_ms(x["residual_s"] for x in clean), "gc": _med_ms(x["residual_s"] for x in gc),
               "gc_before_end": _med_ms(x["residual_s"] - x["fetch_s"] for x in gc),
               "gc_in_fetch": _med_ms(x["fetch_s"] for x in gc), "cpu": statistics.median(cpu[p]) * 1e3}
        res[p] = row
        res["gc_samples"][p] = f"{len(gc)}/{len(xs)}"

        def f(v):
            return "-" if v is None else f"{v:.0f}"
        print(f"{p:10} {f(row['wall']):>8} {f(row['exec']):>12} {f(row['residual']):>9} {f(row['clean']):>15} "
              f"{f(row['gc']):>12} {f(row['gc_before_end']) + '/' + f(row['gc_in_fetch']):>15} "
              f"{row['cpu']:>9.1f} ms {res['gc_samples'][p]:>11}")
    for p in ("scheduler", "dataset"):
        if res[p]["clean"] is None or res["hand"]["clean"] is None:
            raise RuntimeError(f"no sample of {p} or hand without a collection after it (every sample took over "
                               f"{GC_INTERVAL_S:.0f} s?): run on a less loaded machine or with more rounds")
        res[f"{p}_overhead_ms"] = res[p]["clean"] - res["hand"]["clean"]
        res[f"{p}_overhead_all_ms"] = res[p]["residual"] - res["hand"]["residual"]
        # per-sample time with this path's overhead over the hand-queued one (the measured walls differ by
        # the server's execution, which swings with the machine's load)
        res[f"{p}_time_ratio"] = (res["hand"]["wall"] + res[f"{p}_overhead_ms"]) / res["hand"]["wall"]
    res["dataset_post_ms"] = _med_ms(x["post_s"] for x in samples["dataset"])
    return res


def _rounded(x):
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return round(x, 2) if isinstance(x, float) else x


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
    p.add_argument("--rounds", type=int, default=6, help="rounds; each runs every path once (default 6)")
    p.add_argument("--per-round", type=int, default=4, help="samples per round and path (default 4)")
    p.add_argument("--kill-samples", type=int, default=6, help="samples in the kill run (default 6; 0 = no kill run)")
    p.add_argument("--server-gc", choices=("on", "off"), default="on",
                   help="on: the server as shipped (samples are split by its post-prompt collection); off: the "
                        "overhead server's gc.collect() is a no-op, so no sample pauses (for a machine so loaded "
                        "that every sample takes over 10 s and is followed by a collection)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.per_round < 1 or a.kill_samples < 0 or a.kill_samples % 2:
        p.error(f"--rounds {a.rounds} and --per-round {a.per_round} must be >= 1, --kill-samples {a.kill_samples} "
                f"an even number >= 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` etc.: stop the servers in `finally`
    from diffumatting.factory.demo import tiny_base

    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        tmp = Path(tmp)
        base = tiny_base(tmp / "base")
        for sub in ("out_b", "temp_b", "user_b"):
            (tmp / sub).mkdir()
        servers = [(ComfyServer if a.server_gc == "on" else NoCollectServer)(base)]
        if a.kill_samples:
            servers.append(ComfyServer(base, extra_args=(
                "--output-directory", str(tmp / "out_b"), "--temp-directory", str(tmp / "temp_b"),
                "--user-directory", str(tmp / "user_b"))))
        threads = [threading.Thread(target=s.start) for s in servers]
        [t.start() for t in threads]
        [t.join() for t in threads]
        try:
            res = overhead(servers[0].url, a.rounds, a.per_round, tmp, server_gc=a.server_gc == "on")
            res["server_gc"] = a.server_gc
            print(json.dumps(_rounded(res), indent=1))
            ok = kill_run(servers[0], servers[1], tmp, a.kill_samples) if a.kill_samples else None
        finally:
            for s in servers:
                s.stop()
    print(f"overhead_ms={res['scheduler_overhead_ms']:.1f} ratio={res['scheduler_time_ratio']:.4f} "
          f"dataset_overhead_ms={res['dataset_overhead_ms']:.1f} ratio={res['dataset_time_ratio']:.4f} kill_run={'ok' if ok else 'skipped' if ok is None else 'FAILED'}")
    return 0 if ok is not False else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
