"""Reference for the UNet loader's strength: the weight a blend of base and fine-tuned UNet should give."""
from __future__ import annotations

import torch


def blend(base: torch.Tensor, tuned: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 - strength) * base + strength * tuned, computed the way ComfyUI applies the loader's patch
    (base scaled first, then the tuned weight added): strength 0 gives base, 1 gives tuned exactly."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength {strength} is outside 0..1 (0 = base model, 1 = the fine-tuned UNet)")
    out = base.clone()
    if 1.0 - strength != 1.0:
        out *= 1.0 - strength
    if strength != 0.0:
        out += strength * tuned.to(out.dtype)
    return out
