"""Capture the "green" token's cross-attention probabilities inside ComfyUI's UNet, cheaply.

ComfyUI's BasicTransformerBlock lets a caller replace the attention of attn2 (cross-attention) per block
through `transformer_options["patches_replace"]["attn2"][(block_name, block_id)]` (the mechanism behind
ModelPatcher.set_model_attn2_replace); the block computes q, k, v and to_out itself and calls the
replacement with (q, k, v, extra_options).

`GreenAttentionCapture` installs such a replacement on the chosen blocks only. It computes the normal
attention output and the green probability map in ONE fused attention call: the value tensor gets one
extra column, the indicator of the green token(s) scaled by 1/count, so the extra output channel is
sum_t softmax(q k^T)[:, t] * indicator[t] = the mean probability of the green tokens per query pixel.
No (queries x tokens) probability map is materialised beyond what the attention kernel itself does,
and the other layers run untouched. q/k/v are zero-padded to a head size that is a multiple of 8 (so
flash/memory-efficient kernels stay eligible) with the softmax scale of the real head size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnBlock:
    """A UNet block holding cross-attention: ComfyUI's block key, its downsampling factor vs the latent
    and how many transformer blocks it holds."""

    part: str        # "input" | "middle" | "output"
    index: int
    factor: int      # the block's feature maps are latent_size / factor
    depth: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.part, self.index)


def _has(block, name: str) -> bool:
    return any(type(m).__name__ == name for m in block.children())


def _transformer_depth(block) -> int:
    for m in block.children():
        if type(m).__name__ == "SpatialTransformer":
            tb = getattr(m, "transformer_blocks", None)
            return len(tb) if tb is not None else 1
    return 0


def cross_attention_blocks(diffusion_model) -> list[AttnBlock]:
    """The UNet's blocks with cross-attention (SpatialTransformer), with their resolution factor.

    Walks input_blocks / middle_block / output_blocks of ComfyUI's openaimodel.UNetModel, counting
    Downsample / Upsample layers; runs no forward pass.
    """
    for name in ("input_blocks", "middle_block", "output_blocks"):
        if not hasattr(diffusion_model, name):
            raise ValueError(f"the diffusion model has no {name}: the green loss needs a UNet (SD1.x/SD2/SDXL), "
                             f"got {type(diffusion_model).__name__}")
    out = []
    factor = 1
    for i, block in enumerate(diffusion_model.input_blocks):
        if _has(block, "Downsample"):
            factor *= 2
        depth = _transformer_depth(block)
        if depth:
            out.append(AttnBlock("input", i, factor, depth))
    depth = _transformer_depth(diffusion_model.middle_block)
    if depth:
        out.append(AttnBlock("middle", 0, factor, depth))
    for i, block in enumerate(diffusion_model.output_blocks):
        depth = _transformer_depth(block)
        if depth:
            out.append(AttnBlock("output", i, factor, depth))
        if _has(block, "Upsample"):
            factor = max(1, factor // 2)
    return out


def select_blocks(diffusion_model, factors, parts=("input", "middle", "output")) -> list[AttnBlock]:
    """Blocks at the given resolution factors (e.g. [2, 4]: latent/2 and latent/4) in the given parts."""
    blocks = cross_attention_blocks(diffusion_model)
    factors = sorted({int(f) for f in factors})
    chosen = [b for b in blocks if b.factor in factors and b.part in parts]
    available = sorted({b.factor for b in blocks if b.part in parts})
    missing = [f for f in factors if f not in available]
    if missing or not chosen:
        raise ValueError(f"loss.green_factors {factors}: this UNet has cross-attention at factors {available} only "
                         f"(latent size / factor) in parts {list(parts)}; choose from {available}")
    return chosen


def green_indicator(positions, batch: int, tokens: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,T) value column 1/count at each sample's green positions, and (B,) 1.0 where a sample has any.

    `positions`: one list of token indices per sample (an empty list: that sample has no green token).
    """
    if len(positions) != batch:
        raise ValueError(f"{len(positions)} green-position lists for a batch of {batch}")
    ind = torch.zeros(batch, tokens, dtype=dtype)
    has = torch.zeros(batch, dtype=dtype)
    for b, pos in enumerate(positions):
        pos = [int(p) for p in pos]
        bad = [p for p in pos if not 0 <= p < tokens]
        if bad:
            raise ValueError(f"green token positions {bad} are outside the {tokens}-token context")
        if pos:
            ind[b, pos] = 1.0 / len(pos)
            has[b] = 1.0
    return ind.to(device), has.to(device)


class _Binding:
    """The attn2 replacement of one forward pass, bound to that pass's green indicator.

    Gradient checkpointing re-runs each transformer block during backward; the re-run calls this same
    object, so it takes the same (padded) attention path with the same indicator even after the caller
    cleared the capture, and torch's checkpoint sees the same tensors. A map is kept from the first
    call per block only (the re-run's copy is not needed and would only hold memory).
    """

    def __init__(self, capture: "GreenAttentionCapture", indicator: torch.Tensor | None, enabled: bool):
        self.capture = capture
        self.indicator = indicator if enabled else None
        self.maps: dict[tuple, torch.Tensor] = {}

    def __call__(self, q, k, v, extra_options):
        return self.capture.attend(q, k, v, extra_options, self.indicator, self.maps)


class GreenAttentionCapture:
    """attn2 replacement for chosen blocks that also records the green tokens' attention probability.

    Usage per step: `cap.set_tokens(indicator)` ((B,T) from `green_indicator`), call the UNet with
    `transformer_options=cap.transformer_options()`, then read `cap.maps()` (list of (B,N) maps, one per
    captured transformer block, each averaged over heads). `transformer_options()` binds the indicator
    and `enabled` of that moment, so clearing the capture afterwards (before backward) is safe.
    `cap.enabled = False` turns the capture off (plain attention only).
    """

    def __init__(self, blocks: list[AttnBlock]):
        self.blocks = list(blocks)
        self.indicator: torch.Tensor | None = None
        self.enabled = True
        self._binding: _Binding | None = None

    def set_tokens(self, indicator: torch.Tensor | None) -> None:
        self.indicator = indicator
        self._binding = None

    def clear(self) -> None:
        self._binding = None

    @property
    def _maps(self) -> dict:
        return self._binding.maps if self._binding is not None else {}

    def maps(self) -> list[torch.Tensor]:
        return [self._maps[k] for k in sorted(self._maps, key=str)]

    def map_items(self) -> list[tuple[tuple, torch.Tensor]]:
        return sorted(self._maps.items(), key=lambda kv: str(kv[0]))

    def patches(self) -> dict:
        self._binding = _Binding(self, self.indicator, self.enabled)
        return {b.key: self._binding for b in self.blocks}

    def transformer_options(self, base: dict | None = None) -> dict:
        """A fresh transformer_options dict with the attn2 replacements merged in (ComfyUI mutates it)."""
        opts = dict(base or {})
        pr = {k: dict(v) for k, v in (opts.get("patches_replace") or {}).items()}
        pr.setdefault("attn2", {}).update(self.patches())
        opts["patches_replace"] = pr
        return opts

    def __call__(self, q, k, v, extra_options):
        """Direct use as a replacement (not bound): the current indicator, maps into a fresh binding."""
        if self._binding is None:
            self._binding = _Binding(self, self.indicator, self.enabled)
        return self._binding(q, k, v, extra_options)

    @staticmethod
    def attend(q, k, v, extra_options, ind: torch.Tensor | None, maps: dict):
        heads = int(extra_options["n_heads"])
        b, n, c = q.shape
        d = c // heads
        if k.shape[0] != b:
            k = k.expand(b, -1, -1)
            v = v.expand(b, -1, -1)
        t = k.shape[1]
        qh = q.view(b, n, heads, d).transpose(1, 2)
        kh = k.reshape(b, t, heads, d).transpose(1, 2)
        vh = v.reshape(b, t, heads, d).transpose(1, 2)
        if ind is None:
            out = F.scaled_dot_product_attention(qh, kh, vh)
            return out.transpose(1, 2).reshape(b, n, heads * d)
        if ind.shape != (b, t):
            raise ValueError(f"green indicator has shape {tuple(ind.shape)}, the attention has batch {b} and "
                             f"{t} context tokens: call set_tokens with the batch's token positions")
        dp = int(math.ceil((d + 1) / 8) * 8)
        qp = F.pad(qh, (0, dp - d))
        kp = F.pad(kh, (0, dp - d))
        col = ind.to(device=vh.device, dtype=vh.dtype).view(b, 1, t, 1).expand(b, heads, t, 1)
        vp = torch.cat([vh, col, vh.new_zeros(b, heads, t, dp - d - 1)], dim=-1)
        out = F.scaled_dot_product_attention(qp, kp, vp, scale=d ** -0.5)
        main = out[..., :d].transpose(1, 2).reshape(b, n, heads * d)
        block = extra_options.get("block") or ("?", 0)
        mkey = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
        if mkey not in maps:
            maps[mkey] = out[..., d].float().mean(dim=1)
        return main


def reference_green_map(q, k, indicator, heads: int) -> torch.Tensor:
    """The same map computed naively (full softmax(QK^T)); for tests."""
    b, n, c = q.shape
    d = c // heads
    t = k.shape[1]
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, t, heads, d).transpose(1, 2)
    p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)       # (B,H,N,T)
    return (p * indicator.view(b, 1, 1, t)).sum(-1).mean(1)
