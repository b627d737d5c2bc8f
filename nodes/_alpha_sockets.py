"""The pack's two alpha conventions as node sockets, declared once (models/alpha.py is the tensor side).

Sockets named `alpha` carry opacity (1 = opaque object), as segmenters do; sockets named
`transparency_mask` carry core's MASK convention (LoadImage, SplitImageWithAlpha, JoinImageWithAlpha:
1 = transparent), i.e. 1 - alpha. Every node that takes or gives alpha uses these, so the two conventions
read the same on every node.
"""
from __future__ import annotations

from comfy_api.latest import io

ALPHA_TIP = ("Opacity, 1 = opaque object, 0 = background: this pack's `alpha` convention, as segmenters "
             "output it.")
TMASK_TIP = ("Transparency mask = 1 - alpha (1 = transparent): core's MASK convention, as LoadImage and "
             "SplitImageWithAlpha output it and JoinImageWithAlpha expects it.")


def alpha_inputs() -> list:
    """The two optional MASK inputs of a node that takes alpha in either convention (connect one)."""
    return [io.Mask.Input("alpha", optional=True, tooltip=ALPHA_TIP),
            io.Mask.Input("transparency_mask", optional=True, tooltip=TMASK_TIP)]


def alpha_output():
    """The `alpha` MASK output (opacity)."""
    return io.Mask.Output("alpha", display_name="alpha", tooltip=ALPHA_TIP)


def transparency_mask_output():
    """The `transparency_mask` MASK output (core's convention, 1 - alpha)."""
    return io.Mask.Output("transparency_mask", display_name="transparency_mask", tooltip=TMASK_TIP)
