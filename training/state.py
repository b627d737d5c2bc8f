"""Resumable checkpoints: safetensors tensors + a JSON state, written atomically, the last N kept.

Layout: <out>/checkpoints/<stage>-<step:07d>/
    model.safetensors      trainable tensors (full UNet weights, LoRA adapters or the head)
    optimizer.safetensors  optimizer state tensors (no pickles anywhere): in the NEWEST checkpoint only
    rng.safetensors        torch RNG states
    state.json             stage, step, optimizer param_groups/scalars, scaler, measures, config
The optimizer state of a full fine-tune is twice the size of the weights (AdamW's two moments): older
checkpoints keep the weights only, so `keep_checkpoints` costs weights, not weights + 2x optimizer, each.
Resuming from an older checkpoint continues with a fresh optimizer state (and says so).
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
        save_file(otensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
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
    found = list_checkpoints(root)
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for old in found[-keep:-1]:
        (old / "optimizer.safetensors").unlink(missing_ok=True)
    return final


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpoint_bytes(model_tensors: dict, params) -> tuple[int, int]:
    """(weights, optimizer state) bytes of one checkpoint: AdamW keeps two moments per trainable value."""
    return tensor_bytes(model_tensors.values()), 2 * tensor_bytes(params)


def read_checkpoint(path) -> tuple[dict, dict | None, dict, dict]:
    """(model tensors, optimizer tensors or None when not kept, rng tensors, state) of a checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--resume {str(path)!r}: no such checkpoint folder; pass a folder under "
                         f"<out>/checkpoints/ or just --resume to pick the latest")
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"--resume {str(path)!r} is not a trainer checkpoint (no state.json and "
                         f"model.safetensors); pass a folder under <out>/checkpoints/ or just --resume")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        model = load_file(str(path / "model.safetensors"))
        opt_file, rng_file = path / "optimizer.safetensors", path / "rng.safetensors"
        opt = load_file(str(opt_file)) if opt_file.is_file() else None
        rng = load_file(str(rng_file)) if rng_file.is_file() else {}
    except Exception as e:  # noqa: BLE001 - safetensors/json/OS errors all mean: damaged
        raise ValueError(f"--resume {str(path)!r}: the checkpoint is damaged ({type(e).__name__}: {e}); resume "
                         f"from an older one under {path.parent}") from None
    if opt is not None:       # checkpoints of the first version kept the RNG states in the optimizer file
        rng = {**{k: v for k, v in opt.items() if k.startswith("rng.")}, **rng}
        opt = {k: v for k, v in opt.items() if not k.startswith("rng.")}
    return model, opt, rng, state
