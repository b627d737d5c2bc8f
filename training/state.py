"""Resumable checkpoints: safetensors tensors + a JSON state, written atomically, the last N kept.

Layout: <out>/checkpoints/<stage>-<step:07d>/
    model.safetensors      trainable tensors (full UNet weights, LoRA adapters or the head)
    optimizer.safetensors  optimizer state tensors + RNG states (no pickles anywhere)
    state.json             stage, step, optimizer param_groups/scalars, scaler, measures, config
The folder is written as .tmp-<name>-<pid> and renamed into place, so a checkpoint either exists whole
or not at all (an interrupted write leaves only a .tmp folder, removed at the next save).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

STAGE_ORDER = {"unet": 0, "head": 1}


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-{step:07d}"


def _order(path: Path):
    stage, _, step = path.name.partition("-")
    return (STAGE_ORDER.get(stage, 9), int(step) if step.isdigit() else -1)


def list_checkpoints(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "state.json").is_file()]
    return sorted(found, key=_order)


def latest_checkpoint(root) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json-able rest) of an optimizer state_dict."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in rest.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def rng_tensors() -> dict:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(root, stage: str, step: int, model_tensors: dict, opt: torch.optim.Optimizer, state: dict,
                    keep: int) -> Path:
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(stage, step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
        otensors, orest = optimizer_tensors(opt)
        otensors.update(rng_tensors())
        save_file(otensors, str(tmp / "optimizer.safetensors"))
        full = dict(state, stage=stage, step=step, optimizer=orest)
        (tmp / "state.json").write_text(json.dumps(full, indent=1, sort_keys=True, default=str), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer+rng tensors, state) of a checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a trainer checkpoint (no state.json); pass a folder under "
                         f"<out>/checkpoints/ or just --resume to pick the latest")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors")), state
