"""Tolerances for checks that also run on a GPU machine, where ComfyUI keeps the UNet's weights in fp16 or bf16
(on the CPU, as in CI, they are float32 and the float32 tolerances apply unchanged)."""
from __future__ import annotations

import torch


def relative_tol(dtype: torch.dtype, fp32_tol: float) -> float:
    """A relative tolerance: `fp32_tol` for float32 and wider, four rounding steps of a narrower dtype."""
    if dtype in (torch.float32, torch.float64):
        return fp32_tol
    return max(fp32_tol, 4 * torch.finfo(dtype).eps)


def weight_atol(t: torch.Tensor, fp32_atol: float) -> float:
    """An absolute tolerance for values of `t`: `fp32_atol` in float32, else four rounding steps at t's
    largest magnitude."""
    return max(fp32_atol, relative_tol(t.dtype, 0.0) * float(t.detach().abs().max()))
