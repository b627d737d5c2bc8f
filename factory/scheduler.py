"""Drive several ComfyUI servers (one per GPU, on one machine or many) through ComfyUI's own HTTP and
websocket API, so no cluster manager of our own is needed.

Each server gets up to `depth` prompts at a time (one running, the rest waiting in ComfyUI's own queue,
so it never idles while results are fetched and written). Completion comes from the websocket
(`executing` with node None, sent after the history entry is stored); the outputs' file names come from
/history/<prompt_id> and their bytes from /view.

When a server dies (websocket closed, connection refused, a job past its time limit) every job it held
goes back to the front of the queue for the other servers; a server that can be restarted (one this
run launched) is restarted and rejoins. `commit` runs once per job id: a late duplicate answer (a job
redone after its first server came back) is dropped, so every id is committed exactly once.
"""
from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp


class SchedulerError(RuntimeError):
    """The run cannot go on (every server gone, the workflow refused); finished samples are kept."""


class PromptRejected(SchedulerError):
    """The server refused the prompt (validation): the workflow or its models are wrong, not the server."""


class ServerDied(Exception):
    """The server stopped answering: its jobs go back to the queue."""


class JobFailed(Exception):
    """One sample failed on a live server (its workflow raised): retried, then reported."""


class Dropped(Exception):
    """A waiting prompt removed from the server's queue on stop."""


@dataclass
class Server:
    """One ComfyUI server. `restart` (blocking, may be None) brings a dead one back at the same url."""

    url: str
    name: str = ""
    restart: Callable[[], None] | None = None
    max_restarts: int = 3
    done: int = 0
    busy_s: float = 0.0
    deaths: int = 0
    restarts: int = 0
    alive: bool = True
    first_t: float | None = None
    last_t: float | None = None

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.name = self.name or self.url.split("//", 1)[-1]

    def summary(self) -> dict:
        span = (self.last_t - self.first_t) if self.first_t is not None and self.last_t is not None else 0.0
        return {"server": self.name, "samples": self.done, "per_min": round(60 * self.done / span, 2) if span > 0
                else None, "mean_exec_s": round(self.busy_s / self.done, 3) if self.done else None,
                "deaths": self.deaths, "restarts": self.restarts}


@dataclass
class Result:
    job: object
    server: Server
    files: dict[str, bytes]           # save role -> PNG bytes
    timings: dict[str, float] = field(default_factory=dict)
    prompt_id: str = ""               # the server's id of the prompt that made it (its /history entry)


Build = Callable[[object], tuple[dict, dict[str, str]]]   # job -> (API prompt, role -> save node id)
Commit = Callable[[Result], Awaitable[None]]


async def _check_reachable(session: aiohttp.ClientSession, server: Server, timeout: float) -> None:
    try:
        async with session.get(server.url + "/system_stats", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                raise SchedulerError(f"{server.url} answered /system_stats with HTTP {r.status}; is it a ComfyUI "
                                     f"server?")
            await r.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise SchedulerError(f"ComfyUI server {server.url} is unreachable ({type(e).__name__}: {e}); start it "
                             f"(python main.py --listen --port ...) or fix --servers") from None


async def fetch_object_info(server: Server, timeout: float = 60) -> dict:
    async with aiohttp.ClientSession() as s:
        await _check_reachable(s, server, min(timeout, 10))
        async with s.get(server.url + "/object_info", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return await r.json()


class Scheduler:
    def __init__(self, servers: list[Server], build: Build, commit: Commit, depth: int = 2,
                 job_timeout: float = 1800.0, retries: int = 1, on_event: Callable[[str], None] | None = None):
        if not servers:
            raise SchedulerError("no servers to run on; give --servers URL[,URL...] or --launch N")
        self.servers = servers
        self.build = build
        self.commit = commit
        self.depth = max(1, int(depth))
        self.job_timeout = job_timeout
        self.retries = retries
        self.log = on_event or (lambda msg: None)
        self.queue: collections.deque = collections.deque()
        self.committed: set[str] = set()
        self.failures: dict[str, str] = {}
        self.attempts: collections.Counter = collections.Counter()
        self.duplicates_dropped = 0
        self.stopping = False
        self._wake: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._total = 0
        self._fatal: BaseException | None = None
        self._commit_tasks: set[asyncio.Task] = set()

    # --- public ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop handing out jobs (Ctrl-C): running prompts finish and are committed, waiting ones are dropped."""
        self.stopping = True
        if self._wake is not None:
            self._wake.set()
            self._stop_event.set()

    async def run(self, jobs: list) -> None:
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self.queue.extend(jobs)
        self._total = len(jobs)
        if not jobs:
            return
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(_check_reachable(session, s, 10) for s in self.servers))
            workers = [asyncio.create_task(self._serve(session, s)) for s in self.servers]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if self._commit_tasks:
                    await asyncio.gather(*self._commit_tasks, return_exceptions=True)
        if self._fatal is not None:
            raise self._fatal
        left = self._left()
        if left and not self.stopping:
            dead = ", ".join(s.name for s in self.servers if not s.alive)
            raise SchedulerError(f"every server died ({dead}); {left} samples were not made. Restart the servers "
                                 f"and run the same command again: finished samples are kept and skipped")

    # --- internals -----------------------------------------------------------------------------------------
    def _left(self) -> int:
        return self._total - len(self.committed) - len(self.failures)

    def _finished(self) -> bool:
        return self._left() <= 0 or self._fatal is not None

    async def _serve(self, session: aiohttp.ClientSession, server: Server) -> None:
        while not self._finished() and not self.stopping:
            try:
                await self._serve_once(session, server)
            except ServerDied as e:
                server.alive = False
                server.deaths += 1
                self.log(f"server {server.name} died: {e}")
                if self._finished() or self.stopping:
                    return
                if server.restart is None or server.restarts >= server.max_restarts:
                    if not any(s.alive for s in self.servers):
                        self._wake.set()
                    return
                self.log(f"restarting {server.name}")
                try:
                    await asyncio.get_running_loop().run_in_executor(None, server.restart)
                except Exception as e2:  # a failed restart retires the server; the others go on
                    self.log(f"restart of {server.name} failed: {e2}")
                    return
                server.restarts += 1
                server.alive = True

    async def _serve_once(self, session: aiohttp.ClientSession, server: Server) -> None:
        client_id = uuid.uuid4().hex
        conn = _Connection(asyncio.get_running_loop().create_future())
        conn.dead.add_done_callback(lambda f: f.exception())  # retrieved here; raised through _race
        try:
            ws = await session.ws_connect(f"{server.url}/ws?clientId={client_id}", heartbeat=30)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise ServerDied(f"websocket connect failed: {e}") from None
        reader = asyncio.create_task(self._read_ws(ws, conn))
        slots = asyncio.Semaphore(self.depth)
        handlers: set[asyncio.Task] = set()
        try:
            while not self._finished() and not self.stopping:
                if not await self._free_slot(slots, conn.dead):
                    break
                job = await self._next_job(conn.dead)
                if job is None:
                    slots.release()
                    break
                t_submit = time.monotonic()
                try:
                    pid, roles = await self._submit(session, server, client_id, job)
                except ServerDied:
                    self.queue.appendleft(job)
                    raise
                conn.waiting[pid] = asyncio.get_running_loop().create_future()
                conn.in_flight[pid] = job
                t = asyncio.create_task(self._handle(session, server, job, pid, roles, conn, slots, t_submit))
                handlers.add(t)
                t.add_done_callback(handlers.discard)
            if self.stopping:
                await self._drop_waiting(session, server, conn)
            if handlers:
                await _race(asyncio.gather(*handlers), conn.dead)
        except ServerDied:
            lost = [j for j in conn.in_flight.values() if j.id not in self.committed]
            self.queue.extendleft(reversed(lost))
            if lost:
                self._wake.set()
            raise
        finally:
            for t in list(handlers):
                t.cancel()
            reader.cancel()
            await ws.close()

    async def _free_slot(self, slots: asyncio.Semaphore, dead: asyncio.Future) -> bool:
        """Wait for a free slot on this server; False when the run is stopping (Ctrl-C) first."""
        acquire = asyncio.ensure_future(slots.acquire())
        stop = asyncio.ensure_future(self._stop_event.wait())
        done, _ = await asyncio.wait({acquire, stop, dead}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if acquire not in done:
            acquire.cancel()
            if dead in done:
                dead.result()
            return False
        return True

    async def _next_job(self, dead: asyncio.Future):
        while not self.queue:
            if self._finished() or self.stopping or not any(s.alive for s in self.servers):
                return None
            self._wake.clear()
            await _race(self._wake.wait(), dead)
        if self.stopping:
            return None
        return self.queue.popleft()

    async def _submit(self, session, server: Server, client_id: str, job) -> tuple[str, dict]:
        prompt, roles = self.build(job)
        pid = uuid.uuid4().hex
        body = {"prompt": prompt, "client_id": client_id, "prompt_id": pid}
        try:
            async with session.post(server.url + "/prompt", json=body) as r:
                text = await r.text()
                if r.status == 400:
                    self._reject(f"{server.name} refused the workflow for sample {job.id}: {_short_error(text)}")
                if r.status != 200:
                    raise ServerDied(f"POST /prompt answered HTTP {r.status}: {text[:300]}")
                if _node_errors(text):  # accepted, but the outputs that failed validation would be dropped
                    self._reject(f"{server.name} refused part of the workflow for sample {job.id}: "
                                 f"{_short_error(text)}")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise ServerDied(f"POST /prompt failed: {e}") from None
        self.attempts[job.id] += 1
        return pid, roles

    def _reject(self, message: str):
        """The workflow is wrong for every server: stop the run with this message."""
        exc = PromptRejected(message)
        self._fatal = exc
        self._wake.set()
        raise exc

    async def _read_ws(self, ws, conn: "_Connection") -> None:
        waiting, started = conn.waiting, conn.started
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data") or {}
                pid = body.get("prompt_id")
                if pid not in waiting or waiting[pid].done():
                    continue
                if kind == "execution_start":
                    started[pid] = time.monotonic()
                elif kind == "execution_error":
                    waiting[pid].set_exception(JobFailed(
                        f"{body.get('node_type')} node {body.get('node_id')}: "
                        f"{body.get('exception_message', '')}".strip()))
                elif kind == "execution_interrupted":
                    waiting[pid].set_exception(JobFailed("interrupted on the server"))
                elif kind == "executing" and body.get("node") is None:
                    waiting[pid].set_result(time.monotonic())
        finally:
            conn.kill(ServerDied("websocket closed"))

    async def _handle(self, session, server: Server, job, pid: str, roles: dict, conn: "_Connection",
                      slots: asyncio.Semaphore, t_submit: float) -> None:
        """Wait for one prompt, fetch its files, hand them to commit. t_submit: before its POST /prompt."""
        try:
            t_done = await asyncio.wait_for(conn.waiting[pid], self.job_timeout)
            files, server_exec = await self._fetch(session, server, pid, roles)
        except asyncio.TimeoutError:
            conn.kill(ServerDied(f"sample {job.id} took longer than {self.job_timeout:.0f}s"))
            return
        except ServerDied as e:
            conn.kill(e)
            return
        except Dropped:
            conn.in_flight.pop(pid, None)
            return
        except JobFailed as e:
            conn.in_flight.pop(pid, None)
            self._job_failed(job, server, str(e))
            return
        finally:
            slots.release()
        t_fetched = time.monotonic()
        t_start = conn.started.pop(pid, t_submit)
        server.done += 1
        server.busy_s += t_done - t_start
        server.first_t = t_start if server.first_t is None else server.first_t
        server.last_t = t_done
        conn.in_flight.pop(pid, None)
        result = Result(job, server, files, {"queued_s": round(t_start - t_submit, 4),
                                             "exec_s": round(t_done - t_start, 4),
                                             "fetch_s": round(t_fetched - t_done, 4),
                                             "total_s": round(t_fetched - t_submit, 4),
                                             "server_exec_s": server_exec}, pid)
        task = asyncio.create_task(self._commit_once(result))
        self._commit_tasks.add(task)
        task.add_done_callback(self._commit_tasks.discard)

    async def _commit_once(self, result: Result) -> None:
        jid = result.job.id
        if jid in self.committed:
            self.duplicates_dropped += 1
            return
        self.committed.add(jid)
        try:
            await self.commit(result)
        except BaseException as e:
            self._fatal = e
            self.stop()
            raise
        if self._finished():
            self._wake.set()

    def _job_failed(self, job, server: Server, message: str) -> None:
        if self.attempts[job.id] <= self.retries:
            self.log(f"sample {job.id} failed on {server.name} ({message}); retrying")
            self.queue.append(job)
        else:
            self.failures[job.id] = message
            self.log(f"sample {job.id} failed: {message}")
        self._wake.set()

    async def _fetch(self, session, server: Server, pid: str, roles: dict) -> tuple[dict[str, bytes], float | None]:
        """The saved files' bytes, and the server's own execution time (its history timestamps)."""
        try:
            async with session.get(f"{server.url}/history/{pid}") as r:
                entry = (await r.json()).get(pid) or {}
            files = {}
            for role, node_id in roles.items():
                images = entry.get("outputs", {}).get(node_id, {}).get("images", [])
                if not images:
                    raise JobFailed(f"prompt {pid} finished but its {role} save node {node_id} listed no image")
                item = images[0]
                params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                          "type": item.get("type", "output")}
                async with session.get(server.url + "/view", params=params) as r:
                    if r.status != 200:
                        raise JobFailed(f"GET /view {item['filename']} answered HTTP {r.status}")
                    files[role] = await r.read()
            return files, server_exec_seconds(entry)
        except (aiohttp.ClientError, OSError) as e:
            raise ServerDied(f"fetching outputs failed: {e}") from None

    async def _drop_waiting(self, session, server: Server, conn: "_Connection") -> None:
        """On stop: delete prompts that have not started from the server's queue; running ones finish."""
        pending = [pid for pid, f in conn.waiting.items() if pid not in conn.started and not f.done()]
        if not pending:
            return
        try:
            async with session.post(server.url + "/queue", json={"delete": pending}) as r:
                await r.read()
        except (aiohttp.ClientError, OSError):
            return
        for pid in pending:
            if pid not in conn.started and not conn.waiting[pid].done():
                conn.waiting[pid].set_exception(Dropped())


@dataclass
class _Connection:
    """One websocket session with a server: its prompts and a future that fails when the server dies."""

    dead: asyncio.Future
    waiting: dict = field(default_factory=dict)    # prompt id -> future (completion time)
    started: dict = field(default_factory=dict)    # prompt id -> execution start time
    in_flight: dict = field(default_factory=dict)  # prompt id -> job

    def kill(self, exc: BaseException) -> None:
        if not self.dead.done():
            self.dead.set_exception(exc)


async def _race(aw, dead: asyncio.Future):
    """Await `aw` unless the server dies first (then raise its ServerDied)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        dead.result()
    return task.result()


def server_exec_seconds(entry: dict) -> float | None:
    """execution_start -> execution_success as the server stamped them in the history entry (ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])
              if isinstance(data, dict)}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return None if start is None or end is None else (end - start) / 1000.0


def _node_errors(text: str) -> dict:
    """The node_errors of a POST /prompt answer (empty when there are none or it is not JSON)."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return (data.get("node_errors") or {}) if isinstance(data, dict) else {}


def _short_error(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    err = data.get("error", {})
    parts = [err.get("message", ""), err.get("details", "")]
    for nid, ne in (data.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')} {e.get('details')}")
    return "; ".join(p for p in parts if p)[:1500]
