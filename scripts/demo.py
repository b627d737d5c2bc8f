"""`make demo`: start the real ComfyUI server with the pack, run a workflow through its HTTP API,
stop the server, and print the transparent PNG's path on the last line.

Default job: workflows/key_green_screen.json on a green-screen sample the project generates itself.
With --model CHECKPOINT: the generation workflow with that checkpoint instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "tests"))  # support/: the generated green-screen sample

import _package  # noqa: E402  the pack as `diffumatting` (see _package.py)
from comfy_client import HOST, ComfyServer, WorkflowError  # noqa: E402

_package.register()

SAMPLE_NAME = "diffumatting_green_sample.png"


def set_widget(workflow: dict, node_type: str, index: int, value) -> None:
    """Set widgets_values[index] of every node of `node_type`; error if the workflow has none."""
    hits = [n for n in workflow["nodes"] if n["type"] == node_type]
    if not hits:
        raise WorkflowError(f"the workflow has no {node_type} node to set")
    for node in hits:
        node["widgets_values"][index] = value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="an SD1.x/SDXL checkpoint (.safetensors) to generate with instead of keying the sample")
    p.add_argument("--base-dir", type=Path, default=HOST,
                   help="ComfyUI base directory for input/output/models (default: the dev host's own)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the workflow")
    args = p.parse_args(argv)
    if args.model is not None:
        if args.model.suffix.lower() != ".safetensors":
            p.error(f"--model {args.model} is not a .safetensors file; convert pickle checkpoints first")
        if not args.model.is_file():
            p.error(f"--model {args.model} does not exist; give the path of a checkpoint file")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from support.samples import write_green_sample

    base = args.base_dir.resolve()
    if args.model is None:
        workflow = json.loads((ROOT / "workflows" / "key_green_screen.json").read_text())
        write_green_sample(base / "input" / SAMPLE_NAME)
        set_widget(workflow, "LoadImage", 0, SAMPLE_NAME)
    else:
        ckpt_dir = base / "models" / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        link = ckpt_dir / args.model.name
        if not link.exists():
            link.symlink_to(args.model.resolve())
        workflow = json.loads((ROOT / "workflows" / "generate_green_canvas.json").read_text())
        set_widget(workflow, "CheckpointLoaderSimple", 0, args.model.name)
        # The workflow's 64x64 / 3 steps suit the tests' tiny checkpoint; a real one needs real settings.
        set_widget(workflow, "EmptyLatentImage", 0, 512)
        set_widget(workflow, "EmptyLatentImage", 1, 512)
        set_widget(workflow, "KSampler", 2, 20)
    print(f"[demo] starting ComfyUI ({HOST}) with the pack; output folder {base / 'output'}", file=sys.stderr)
    with ComfyServer(base) as server:
        entry = server.run_workflow(workflow, timeout=args.timeout)
        files = [f for f in server.output_files(entry) if not f.name.endswith("_matte.png")]
    if not files:
        raise WorkflowError("the workflow finished but wrote no image to the output folder")
    print(files[-1])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except WorkflowError as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        sys.exit(1)
