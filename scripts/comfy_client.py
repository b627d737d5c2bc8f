"""Drive a real ComfyUI server: start it on 127.0.0.1 with the pack, convert a UI-format workflow
(what a user drags into the page) to the API format, queue it over HTTP and wait for its outputs.

Used by `make demo`, `make serve` and the host tests. Standard library only, so it runs with any
Python that can start the host's venv.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / ".host" / "ComfyUI"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PACK_DIR_NAME = "comfyui-diffumatting"

# Frontend-only node types that never reach the server.
_UI_ONLY = {"Note", "MarkdownNote", "Reroute"}
# Widgets after which the frontend stores one extra value (the "control after generate" combo).
_CONTROL_NAMES = {"seed", "noise_seed"}


class WorkflowError(RuntimeError):
    """A workflow could not be converted, queued, or finished with an error."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path) -> Path:
    """Lay out a ComfyUI base directory (models, input, output, user) with the pack linked in."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/checkpoints", "models/loras",
                "models/vae", "models/diffumatting"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if link.is_symlink() or link.exists():
        if link.resolve() != ROOT:
            raise WorkflowError(f"{link} exists and is not a link to {ROOT}; remove it or pick another base dir")
    else:
        link.symlink_to(ROOT, target_is_directory=True)
    return base


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 with its own base directory."""

    def __init__(self, base_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.base = prepare_base_dir(Path(base_dir))
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if not (HOST / "main.py").is_file():
            raise WorkflowError(f"ComfyUI host not found at {HOST}; run `make setup` (scripts/setup.sh) first")
        args = [str(VENV_PY), str(HOST / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--disable-auto-launch",
                "--database-url", "sqlite:///:memory:", *self.extra_args]
        if not _has_cuda():
            args.append("--cpu")
        return args

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), cwd=str(HOST), stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WorkflowError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise WorkflowError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # --- HTTP -----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise WorkflowError(f"POST {path} failed with {e.code}: {e.read().decode(errors='replace')}") from e

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def run_workflow(self, workflow: dict, timeout: float = 600) -> dict:
        """Queue a UI-format workflow and wait; returns the history entry (outputs per node id)."""
        prompt = ui_to_api(workflow, self.object_info())
        client_id = uuid.uuid4().hex
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id,
                                       "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise WorkflowError(f"workflow failed: {json.dumps(msgs, indent=1)[:4000]}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise WorkflowError(f"ComfyUI exited while running:\n{self.log_tail()}")
            time.sleep(0.25)
        raise WorkflowError(f"workflow {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def output_files(self, entry: dict, key: str = "images") -> list[Path]:
        """Paths of the files a history entry lists as written to the output folder."""
        files = []
        for node_out in entry.get("outputs", {}).values():
            for item in node_out.get(key, []):
                if item.get("type") == "output":
                    files.append(self.base / "output" / item.get("subfolder", "") / item["filename"])
        return files


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


# --- UI -> API conversion ---------------------------------------------------------------------------
def _is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return True
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _extra_widget_values(name: str, spec) -> int:
    """How many extra values the frontend stores after this widget's own value."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if spec[0] == "INT" and (name in _CONTROL_NAMES or opts.get("control_after_generate")):
        extra += 1
    if opts.get("image_upload"):
        extra += 1
    return extra


_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def _combo_options(spec) -> list | None:
    """The options of a COMBO spec (old style [options, {...}] or V3 style ["COMBO", {"options": [...]}])."""
    if isinstance(spec[0], list):
        return spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return opts.get("options") if spec[0] == "COMBO" else None


MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin")


def _widget_problem(name: str, spec, value, missing_files_ok: bool = False) -> str | None:
    """Why `value` cannot be the value of widget `name` with input spec `spec` (None when it can).

    A model file name that this server does not have is a problem unless `missing_files_ok` (checking a
    workflow's structure on a server without the artist's model files)."""
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    if kind == "COMBO":
        options = _combo_options(spec)
        if options is not None and value not in options:
            if isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES):
                if missing_files_ok:
                    return None
                return f"{name}={value!r}: this server has no such model file (the workflow's note says where it goes)"
            shown = ", ".join(repr(o) for o in options[:8]) + (" ..." if len(options) > 8 else "")
            return f"{name}={value!r} is not one of its options ({shown or 'none on this server'})"
        return None
    expected = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str}.get(kind)
    if expected is None:
        return None
    if isinstance(value, bool) and kind != "BOOLEAN" or not isinstance(value, expected):
        return f"{name}={value!r} is not a {kind}"
    return None


def _node_widget_inputs(node: dict, info: dict, missing_files_ok: bool = False) -> dict:
    """The widget inputs of a UI node, by name, from its widgets_values; refuses values that do not match the
    node's inputs on this server (count, type, combo options), naming the node, the widget and the value."""
    label = f"node {node['id']} ({node['type']})"
    if isinstance(node.get("widgets_values"), dict):
        raise WorkflowError(f"{label} stores widgets by name; not supported")
    values = list(node.get("widgets_values") or [])
    inputs, names, pos = {}, [], 0
    for section in ("required", "optional"):
        section_specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(section_specs)):
            spec = section_specs[name]
            if not _is_widget(spec):
                continue
            names.append(name)
            if pos < len(values):
                problem = _widget_problem(name, spec, values[pos], missing_files_ok)
                if problem and "no such model file" in problem:
                    raise WorkflowError(f"{label}: {problem}")
                if problem:
                    raise WorkflowError(f"{label}: {problem}; the workflow was saved for another version of "
                                        f"this node: re-create the node or fix the value")
                inputs[name] = values[pos]
                extra = _extra_widget_values(name, spec)
                if extra and spec[0] == "INT" and pos + 1 < len(values) and values[pos + 1] not in _CONTROL_VALUES:
                    raise WorkflowError(f"{label}: the value after {name} must be one of {sorted(_CONTROL_VALUES)} "
                                        f"(control after generate), got {values[pos + 1]!r}")
            pos += 1 + _extra_widget_values(name, spec)
    if pos != len(values):
        raise WorkflowError(f"{label} has {len(values)} widget values but the node's widgets on this server "
                            f"({', '.join(names) or 'none'}) take {pos}: the workflow was saved for another "
                            f"version of this node; re-create the node or fix widgets_values {values!r}")
    return inputs


def ui_to_api(workflow: dict, object_info: dict, missing_files_ok: bool = False) -> dict:
    """Convert a UI-format workflow (nodes + links) to the API prompt format, using /object_info.

    Refuses widget values that do not match a node's inputs on this server (count, types, combo options); a
    model file the server lacks is refused too unless `missing_files_ok`."""
    if "nodes" not in workflow or "links" not in workflow:
        # Already in API format.
        return workflow
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(link_id):
        link = links[link_id]
        origin = nodes[link[1]]
        if origin["type"] == "Reroute":
            upstream = origin["inputs"][0].get("link")
            if upstream is None:
                raise WorkflowError(f"Reroute node {origin['id']} has no input")
            return source_of(upstream)
        return [str(link[1]), link[2]]

    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in _UI_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"node {node['id']} ({ntype}) is bypassed; un-bypass it or remove it")
        info = object_info.get(ntype)
        if info is None:
            raise WorkflowError(f"node {node['id']} has type {ntype!r}, which this server does not know "
                                "(a custom node pack is missing)")
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = _node_widget_inputs(node, info, missing_files_ok)
        known = {n for section in ("required", "optional") for n in info["input"].get(section, {})}
        for name, link_id in linked.items():
            if name not in known:
                raise WorkflowError(f"node {node['id']} ({ntype}) has a link into {name!r}, an input this node "
                                    f"does not have on this server (inputs: {', '.join(sorted(known))})")
            inputs[name] = source_of(link_id)
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                   "_meta": {"title": node.get("title", ntype)}}
    return prompt


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Run a UI-format workflow on a fresh ComfyUI server with the pack.")
    p.add_argument("workflow", type=Path, help="workflow JSON in the UI format (workflows/*.json)")
    p.add_argument("--base-dir", type=Path, required=True, help="ComfyUI base directory (models, input, output)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the workflow")
    args = p.parse_args(argv)
    workflow = json.loads(args.workflow.read_text())
    with ComfyServer(args.base_dir) as server:
        entry = server.run_workflow(workflow, timeout=args.timeout)
        files = server.output_files(entry)
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
