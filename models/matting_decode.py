"""Colour and alpha from ONE decoder pass: the matting head rides inside the VAE decoder's own forward.

Plain torch. `AlphaChannel(decoder, head)` is a context manager: while it is open, every call of `decoder`
runs the head on the decoder's own features (HeadTaps) and returns one more output channel, the alpha,
stored as `2 * alpha - 1`: in the decoder's own output range [-1, 1], so whatever maps the decoder's
colour to [0, 1] with (x + 1) / 2 (ComfyUI's VAE `process_output`) gives the alpha back unchanged, and
whatever blends decoder outputs (batch chunks, overlapping tiles) blends colour and alpha alike. On exit
the decoder is exactly as before.

With a head the decoder's output is float32 whatever the VAE's dtype: the head's alpha is float32 (its last
layer runs in float32), and a bf16 channel would keep about 8 significant bits of it (steps up to 1/512 near
0 and 1), a 16-bit alpha export 8-bit in disguise. The colour channels are the VAE-dtype values exactly
(widening is exact), and ComfyUI converts the decoder's output to its float32 intermediate dtype next anyway.

`on_call(latent_features)` (optional) runs before each decoder call: the caller checks interruption there,
or refuses an unexpected input size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .matting_head import HeadTaps, MattingHead


def encode_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """Alpha in [0,1] as a float32 decoder output channel in [-1,1] (what (x + 1) / 2 maps back to alpha)."""
    return alpha.float().mul(2.0).sub(1.0)


class AlphaChannel:
    """Context manager: `decoder` outputs (B, C+1, H, W), colour then the head's alpha (see the module doc).

    With `head=None` nothing is appended; only `on_call` runs. `calls` counts the decoder's calls.
    """

    def __init__(self, decoder: nn.Module, head: MattingHead | None,
                 on_call: Callable[[torch.Tensor], None] | None = None):
        self.decoder = decoder
        self.head = head
        self.on_call = on_call
        self.calls = 0
        self._taps: HeadTaps | None = None
        self._handles = []

    def __enter__(self) -> "AlphaChannel":
        try:
            if self.head is not None:
                self._taps = HeadTaps(self.decoder, self.head).__enter__()
                self._handles.append(self.decoder.register_forward_hook(self._append_alpha))
            self._handles.append(self.decoder.register_forward_pre_hook(self._before_call))
        except BaseException:
            self.__exit__()
            raise
        return self

    def _before_call(self, module, args):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(args[0])

    def _append_alpha(self, module, args, out):
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise ValueError(f"the VAE decoder returned {type(out).__name__} "
                             f"{tuple(getattr(out, 'shape', ()))}, not an image (B,C,H,W); the matting head "
                             f"supports image VAEs (SD1.x/SD2 and SDXL KL-f8)")
        alpha = self._taps.pop_alpha()
        if alpha.shape[0] != out.shape[0] or alpha.shape[-2:] != out.shape[-2:]:
            raise ValueError(f"the head's alpha {tuple(alpha.shape)} does not match the decoded image "
                             f"{tuple(out.shape)}: the fine tap is not at full resolution")
        return torch.cat([out.float(), encode_alpha(alpha)], dim=1)  # float32: see the module doc

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._taps is not None:
            self._taps.__exit__(*exc)
            self._taps = None
        return False
