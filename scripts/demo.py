"""`make demo`: start the real ComfyUI server with the pack, run a workflow through its HTTP API,
stop the server, and print the transparent PNG's path on the last line.

Default job: workflows/key_green_screen.json on a green-screen sample the project generates itself.
With --model FILE: the transparent-generation workflow of the model's family, as ComfyUI's own model
detection identifies it (SD1.x checkpoint -> transparent_sd15.json, SDXL checkpoint or finetune ->
transparent_sdxl.json, Flux diffusion model -> transparent_flux.json, whose text encoders and VAE must be in
the base directory's models folders under the names its note gives), at the workflow's real size and steps.
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


FAMILY_WORKFLOWS = {"sd15": ("transparent_sd15.json", "checkpoints", "CheckpointLoaderSimple"),
                    "sdxl": ("transparent_sdxl.json", "checkpoints", "CheckpointLoaderSimple"),
                    "flux": ("transparent_flux.json", "diffusion_models", "UNETLoader")}


class _Shape:
    """A tensor stand-in for ComfyUI's detection, which reads only `.shape` (the file is not loaded)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def detect_family(path: Path) -> tuple[str, str]:
    """("sd15" | "sdxl" | "flux", ComfyUI's model config class name) for a model file, from ComfyUI's own
    model detection on the file's key shapes; WorkflowError for a family without a workflow."""
    from safetensors import safe_open

    if str(HOST) not in sys.path:
        sys.path.insert(1, str(HOST))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True  # detection only reads shapes; the server process picks its own device

    with safe_open(str(path), "pt") as f:
        sd = {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}
    return family_of_shapes(sd, path.name)


def family_of_shapes(sd: dict, name: str) -> tuple[str, str]:
    """detect_family on a state dict whose values have `.shape` (what ComfyUI's detection reads)."""
    import comfy.model_detection
    from comfy import supported_models

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    if not any(k.startswith(prefix) for k in sd):
        prefix = ""  # a bare diffusion model (Flux's UNETLoader files)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    detected = type(config).__name__ if config is not None else "unknown"
    for family, classes in (("sd15", (supported_models.SD15,)), ("sdxl", (supported_models.SDXL,)),
                            ("flux", (supported_models.Flux,))):
        if isinstance(config, classes):
            return family, detected
    raise WorkflowError(f"{name} is detected as {detected}; `make demo` has workflows for SD1.x, SDXL and Flux "
                        f"models (workflows/transparent_*.json)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="an SD1.x or SDXL checkpoint, or a Flux diffusion model (.safetensors), to generate with "
                        "instead of keying the sample; the workflow follows the detected family")
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
        family, detected = detect_family(args.model)
        name, folder, loader = FAMILY_WORKFLOWS[family]
        print(f"[demo] {args.model.name}: ComfyUI detects {detected}; running workflows/{name}", file=sys.stderr)
        model_dir = base / "models" / folder
        model_dir.mkdir(parents=True, exist_ok=True)
        link = model_dir / args.model.name
        if not link.exists():
            link.symlink_to(args.model.resolve())
        workflow = json.loads((ROOT / "workflows" / name).read_text())
        set_widget(workflow, loader, 0, args.model.name)
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
