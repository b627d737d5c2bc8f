"""One alpha convention for the whole pack, and the pure tensor functions around it.

Convention: `alpha` is opacity, 1 = opaque object, 0 = fully transparent (what matting papers and
segmenters output). ComfyUI core's LoadImage MASK, SplitImageWithAlpha and JoinImageWithAlpha use the
opposite, a *transparency mask* (1 = transparent). Sockets that carry the core convention are named
`transparency_mask`, so a user never needs an InvertMask.

Layouts follow ComfyUI: IMAGE (B,H,W,C) with C in {1,3,4}, MASK (B,H,W) or (H,W), values in [0, 1].
Colour is straight (not premultiplied) unless a function says otherwise.
"""
from __future__ import annotations

import torch


def _check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:3]) < 1:
        raise ValueError(f"{name} must have shape (B,H,W,C) with C in 1, 3 or 4 and non-empty B,H,W; got "
                         f"{tuple(image.shape)}. Pass an IMAGE (RGB, RGBA or grey).")
    return image


def check_finite(values: torch.Tensor, name: str, fix: str) -> torch.Tensor:
    """`values` unchanged, or a ValueError counting its NaN/Inf values, naming `name` and the `fix`."""
    bad = int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0
    if bad:
        raise ValueError(f"{name} has {bad} NaN or infinite value(s) out of {values.numel()}; {fix}")
    return values


def normalize_mask(mask: torch.Tensor, batch: int, height: int, width: int, name: str = "alpha") -> torch.Tensor:
    """A MASK as (B,H,W) matching an image of `batch` x `height` x `width`.

    A single mask is broadcast over the batch; a mask of another size is resized bilinearly, as core's
    JoinImageWithAlpha does. Any other batch size is an error.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor MASK, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a MASK of shape (B,H,W) or (H,W); got {tuple(mask.shape)}")
    check_finite(mask, name, "the node that made this mask produced invalid numbers; fix or replace that node "
                             "(an alpha must be within 0..1)")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch size {mask.shape[0]} but the image has {batch}; pass one mask or "
                         f"one per image")
    mask = mask.float()
    if mask.shape[1:] != (height, width):
        mask = torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode="bilinear",
                                               align_corners=False)[:, 0]
    if mask.shape[0] != batch:
        mask = mask.expand(batch, -1, -1)
    return mask.clamp(0.0, 1.0)


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) colour from a grey, RGB or RGBA IMAGE (the alpha channel, if any, is dropped)."""
    image = _check_image(image)
    if image.shape[-1] == 1:
        return image.expand(-1, -1, -1, 3)
    return image[..., :3]


def image_alpha(image: torch.Tensor) -> torch.Tensor | None:
    """The alpha channel of an RGBA IMAGE as (B,H,W), or None for grey/RGB."""
    image = _check_image(image)
    return image[..., 3] if image.shape[-1] == 4 else None


def join_alpha(image: torch.Tensor, alpha: torch.Tensor | None = None,
               transparency_mask: torch.Tensor | None = None) -> torch.Tensor:
    """RGBA (B,H,W,4) from an IMAGE and an opacity (`alpha`) or a core-style `transparency_mask`.

    Both given: they are combined (opacity = alpha * (1 - transparency_mask)). Neither given: the image's
    own alpha channel if it has one, else fully opaque.
    """
    image = _check_image(image)
    check_finite(image, f"the image ({'RGBA' if image.shape[-1] == 4 else 'colour'})",
                 "the node that made it produced invalid numbers (an fp16 VAE overflowing gives NaN: decode with "
                 "--fp32-vae or a VAE fixed for fp16)")
    b, h, w, _ = image.shape
    opacity = image_alpha(image)
    opacity = torch.ones((b, h, w), dtype=image.dtype, device=image.device) if opacity is None else opacity
    if alpha is not None or transparency_mask is not None:
        opacity = torch.ones_like(opacity)
        if alpha is not None:
            opacity = opacity * normalize_mask(alpha, b, h, w, "alpha").to(image)
        if transparency_mask is not None:
            opacity = opacity * (1.0 - normalize_mask(transparency_mask, b, h, w, "transparency_mask").to(image))
    return torch.cat([to_rgb(image), opacity.unsqueeze(-1)], dim=-1).clamp(0.0, 1.0)


def split_alpha(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb (B,H,W,3), alpha (B,H,W), transparency_mask (B,H,W)) of an IMAGE; RGB/grey count as opaque."""
    image = _check_image(image)
    b, h, w, _ = image.shape
    alpha = image_alpha(image)
    if alpha is None:
        alpha = torch.ones((b, h, w), dtype=image.dtype, device=image.device)
    return to_rgb(image), alpha, 1.0 - alpha


def premultiply(rgba: torch.Tensor) -> torch.Tensor:
    """Premultiplied RGBA from straight RGBA."""
    rgba = _check_image(rgba, "rgba")
    return torch.cat([rgba[..., :3] * rgba[..., 3:4], rgba[..., 3:4]], dim=-1)


def checkerboard(height: int, width: int, cell: int = 16, light: float = 0.8, dark: float = 0.6,
                 device=None) -> torch.Tensor:
    """(H,W,3) grey checkerboard, the usual backdrop for transparent pixels."""
    if cell < 1:
        raise ValueError(f"checkerboard cell must be >= 1 pixel, got {cell}")
    yy = torch.arange(height, device=device)[:, None] // cell
    xx = torch.arange(width, device=device)[None, :] // cell
    board = torch.where(((yy + xx) % 2) == 0, light, dark).float()
    return board[..., None].expand(height, width, 3)


def over(rgba: torch.Tensor, backdrop: torch.Tensor) -> torch.Tensor:
    """Composite straight RGBA (B,H,W,4) over a backdrop (H,W,3) or (B,H,W,3) or a colour (3,)."""
    rgba = _check_image(rgba, "rgba")
    if rgba.shape[-1] != 4:
        rgba = join_alpha(rgba)
    a = rgba[..., 3:4]
    backdrop = backdrop.to(rgba)
    if backdrop.ndim == 1:
        backdrop = backdrop.view(1, 1, 1, 3)
    return (rgba[..., :3] * a + backdrop * (1.0 - a)).clamp(0.0, 1.0)


def parse_hex_color(text: str) -> tuple[float, float, float]:
    """'#RRGGBB' or 'RRGGBB' (or '#RGB') to an (r, g, b) tuple in [0, 1]."""
    s = str(text).strip().lstrip("#")
    if len(s) == 3:
        s = "".join(c * 2 for c in s)
    if len(s) != 6 or any(c not in "0123456789abcdefABCDEF" for c in s):
        raise ValueError(f"colour {text!r} is not a hex colour; write it as #RRGGBB, for example #00b140")
    return tuple(int(s[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def alpha_bbox(alpha: torch.Tensor, threshold: float = 0.0) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) exclusive bounds of alpha > threshold in an (H,W) map; None if empty."""
    if alpha.ndim != 2:
        raise ValueError(f"alpha_bbox expects one (H,W) alpha map, got shape {tuple(alpha.shape)}")
    on = alpha > threshold
    rows = torch.nonzero(on.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(on.any(dim=0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def trim_to_alpha(rgba: torch.Tensor, padding: int = 0, threshold: float = 0.0) -> torch.Tensor:
    """Crop one straight RGBA (H,W,4) to its alpha's bounding box plus `padding` transparent pixels.

    Fully transparent images are returned as one transparent pixel (plus padding). The padding adds
    transparent pixels beyond the image edge where needed, so the object is never cut.
    """
    if rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"trim_to_alpha expects one (H,W,4) RGBA image, got shape {tuple(rgba.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0 pixels, got {padding}")
    box = alpha_bbox(rgba[..., 3], threshold)
    if box is None:
        crop = torch.zeros((1, 1, 4), dtype=rgba.dtype, device=rgba.device)
    else:
        top, left, bottom, right = box
        crop = rgba[top:bottom, left:right]
    if padding:
        crop = torch.nn.functional.pad(crop.permute(2, 0, 1), (padding, padding, padding, padding)).permute(1, 2, 0)
    return crop
