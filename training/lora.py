"""Train-time LoRA on the UNet's Linear layers (forward hooks, nothing replaced) and kohya-format export.

The adapter adds `scale * up(down(x))` to a Linear's output, scale = alpha / rank, `up` starting at
zero (the first step starts from the base model). `export_kohya` writes the file ComfyUI's LoraLoader
(and A1111 / kohya tools) read: for each layer `lora_unet_<name>.lora_down.weight` (rank, in),
`.lora_up.weight` (out, rank) and `.alpha`, with <name> the diffusers-style module path in underscores
when ComfyUI's key map knows it (else the ldm path, which ComfyUI also maps).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.atomic import atomic_path


class LoraAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.rank = rank
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale


def _key(name: str) -> str:
    return name.replace(".", "__")


class LoraSet(nn.Module):
    """All adapters of a UNet; `attach()` hooks them in, `detach()` removes the hooks."""

    def __init__(self, diffusion_model: nn.Module, targets, rank: int, alpha: float, seed: int = 0):
        super().__init__()
        self.names: list[str] = []
        self.adapters = nn.ModuleDict()
        targets = tuple(targets)
        for i, (name, mod) in enumerate(diffusion_model.named_modules()):
            if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                self.adapters[_key(name)] = LoraAdapter(mod.in_features, mod.out_features, rank, alpha, seed + i)
                self.names.append(name)
        if not self.names:
            raise ValueError(f"unet.lora_targets {list(targets)} match no Linear layer of the UNet; use module name "
                             f"suffixes such as 'attn2.to_q' or 'ff.net.2'")
        self._modules_by_name = {n: m for n, m in diffusion_model.named_modules() if n in set(self.names)}
        self._handles = []

    def attach(self) -> "LoraSet":
        self.detach()
        for name in self.names:
            adapter = self.adapters[_key(name)]
            self._handles.append(self._modules_by_name[name].register_forward_hook(
                lambda m, args, out, a=adapter: out + a.delta(args[0])))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def merged_deltas(self) -> dict[str, torch.Tensor]:
        """{module name: (out, in) weight delta} (for tests: LoRA merged into the base weights)."""
        return {n: (self.adapters[_key(n)].up @ self.adapters[_key(n)].down) * self.adapters[_key(n)].scale
                for n in self.names}


def kohya_names(base_model) -> dict[str, str]:
    """{ldm module path (no 'diffusion_model.' prefix): kohya key} from ComfyUI's own LoRA key map."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    out: dict[str, str] = {}
    for lora_key, target in key_map.items():
        if not isinstance(target, str) or not lora_key.startswith("lora_unet_") or not target.endswith(".weight"):
            continue
        module = target[len("diffusion_model."):-len(".weight")]
        ldm_style = "lora_unet_" + module.replace(".", "_")
        # Prefer the diffusers-style name (what kohya writes); keep the ldm-style one as a fallback.
        if module not in out or (out[module] == ldm_style and lora_key != ldm_style):
            out[module] = lora_key
    return out


def export_kohya(path, lora: LoraSet, base_model, dtype=torch.float16, metadata: dict | None = None):
    """Write the adapters as a kohya LoRA safetensors (atomic)."""
    from safetensors.torch import save_file

    names = kohya_names(base_model)
    tensors = {}
    for name in lora.names:
        key = names.get(name) or "lora_unet_" + re.sub(r"\.", "_", name)
        a = lora.adapters[_key(name)]
        tensors[f"{key}.lora_down.weight"] = a.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = a.up.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(a.alpha, dtype=dtype)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.adapters[_key(lora.names[0])].rank),
            "ss_network_alpha": str(lora.adapters[_key(lora.names[0])].alpha)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
