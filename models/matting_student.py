"""A small trimap-based matting network for the downstream check (evaluate_dataset.py).

Input: RGB composite + trimap (0 / 0.5 / 1), output: alpha. A 3-level U-Net (`width` channels at full
resolution, doubled per level) with a sigmoid head; known trimap regions are pasted in at prediction time,
as trimap-based matting methods are scored. Training composites each sample's straight foreground over a
background at a random crop, so the network learns only from the dataset's foreground and alpha.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class StudentNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(4, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, rgb: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
        """rgb (N,3,H,W), trimap (N,1,H,W) in {0, .5, 1}; H, W multiples of 4. Returns alpha (N,1,H,W)."""
        x1 = self.enc1(torch.cat([rgb, trimap], 1))
        x2 = self.enc2(F.max_pool2d(x1, 2))
        x3 = self.enc3(F.max_pool2d(x2, 2))
        y2 = self.dec2(torch.cat([F.interpolate(x3, size=x2.shape[-2:], mode="bilinear", align_corners=False), x2], 1))
        y1 = self.dec1(torch.cat([F.interpolate(y2, size=x1.shape[-2:], mode="bilinear", align_corners=False), x1], 1))
        return torch.sigmoid(self.head(y1))


def trimap_input(trimap_u8: np.ndarray) -> np.ndarray:
    """uint8 trimap (0/128/255) -> float (0/0.5/1)."""
    t = np.asarray(trimap_u8)
    return np.where(t >= 200, 1.0, np.where(t <= 50, 0.0, 0.5)).astype(np.float32)


def random_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field with fine noise (a stand-in when no background folder is given)."""
    coarse = rng.random((max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    field = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(h, w), mode="bicubic",
                          align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(field + 0.03 * rng.standard_normal((h, w, 3)).astype(np.float32), 0, 1)


def training_batch(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], backgrounds: list[np.ndarray],
                   rng: np.random.Generator, batch: int, crop: int) -> tuple[torch.Tensor, ...]:
    """(rgb, trimap, alpha) tensors: random samples, random crops (resized up when smaller), random
    backgrounds (a random crop of a folder image, or a generated field), random flips."""
    rgbs, tris, alphas = [], [], []
    for _ in range(batch):
        fg, alpha, tri = samples[int(rng.integers(len(samples)))]
        h, w = alpha.shape
        if min(h, w) < crop:
            s = crop / min(h, w)
            size = (max(crop, round(w * s)), max(crop, round(h * s)))
            fg = _resize(fg, size)
            alpha = _resize(alpha, size)
            tri = _resize(tri, size, nearest=True)
            h, w = alpha.shape
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        f, a, t = fg[y:y + crop, x:x + crop], alpha[y:y + crop, x:x + crop], tri[y:y + crop, x:x + crop]
        if backgrounds:
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            bg = _resize(bg, (crop, crop)) if min(bg.shape[:2]) < crop else bg
            by, bx = int(rng.integers(0, bg.shape[0] - crop + 1)), int(rng.integers(0, bg.shape[1] - crop + 1))
            bg = bg[by:by + crop, bx:bx + crop]
        else:
            bg = random_background(rng, crop, crop)
        img = f * a[..., None] + bg * (1 - a[..., None])
        if rng.random() < 0.5:
            img, a, t = img[:, ::-1], a[:, ::-1], t[:, ::-1]
        rgbs.append(np.ascontiguousarray(img.transpose(2, 0, 1)))
        tris.append(np.ascontiguousarray(t)[None])
        alphas.append(np.ascontiguousarray(a)[None])
    return (torch.from_numpy(np.stack(rgbs)).float(), torch.from_numpy(np.stack(tris)).float(),
            torch.from_numpy(np.stack(alphas)).float())


def _resize(x: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    import cv2

    return cv2.resize(x, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def loss(pred: torch.Tensor, alpha: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
    """L1 on alpha, weighted 4x inside the trimap's unknown band (where matting is decided)."""
    weight = 1.0 + 3.0 * (trimap == 0.5).float()
    return (weight * (pred - alpha).abs()).sum() / weight.sum()


@torch.no_grad()
def predict(net: StudentNet, rgb: np.ndarray, trimap: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Alpha (H,W) for one image, padded to a multiple of 4; known trimap regions pasted in."""
    h, w = trimap.shape
    ph, pw = (-h) % 4, (-w) % 4
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
    t = torch.from_numpy(np.ascontiguousarray(trimap))[None, None].float()
    x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    t = F.pad(t, (0, pw, 0, ph), mode="replicate")
    a = net(x.to(device), t.to(device))[0, 0, :h, :w].cpu().numpy()
    return np.where(trimap == 1.0, 1.0, np.where(trimap == 0.0, 0.0, a)).astype(np.float32)
