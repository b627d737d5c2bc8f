"""Latent-space measurements of the green canvas on the tiny model (tests and tests/bench)."""
from __future__ import annotations

import torch

PROMPT = "a red apple, isolated on a flat green screen background"


def sample_latent(model, clip, seed: int, steps: int = 3, cfg: float = 5.0, size: int = 8) -> torch.Tensor:
    """KSampler-equivalent txt2img (euler, normal) on a size x size latent; returns the MODEL-space latent
    (process_in applied, the space the key colour latent is given in)."""
    import comfy.sample

    cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(lat, seed)
    with torch.no_grad():
        out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond, neg, lat, disable_pbar=True)
    return model.model.process_latent_in(out)


def background_distance(latent: torch.Tensor, key: torch.Tensor, region: dict) -> tuple[float, float]:
    """(mean distance to the key latent outside the region, inside it), per latent pixel (L2 over channels)."""
    from diffumatting.models.green_canvas import background_weight

    h, w = latent.shape[-2:]
    bg = background_weight(h, w, **region) > 0.5
    d = (latent.float() - key.view(1, -1, 1, 1).float()).pow(2).sum(1).sqrt()[0]
    return float(d[bg].mean()), float(d[~bg].mean())


# --- green-token attention (green token k/v protection) ----------------------------------------------------
GREEN_PROMPTS = ("a blue teapot with a chipped spout", "a red apple", "an old bicycle leaning on a wall")


def encode_green(clip, text: str):
    """Green Canvas Prompt's conditioning of `text` (phrase appended, green positions recorded)."""
    from diffumatting.nodes.generate import GreenPrompt

    return GreenPrompt.execute(clip, text).result[0]


def recorded_positions(cond) -> list[int]:
    from diffumatting.nodes._green_kv import positions_of

    return positions_of(cond[0][1])


class AttentionRecorder:
    """attn2 replacement on every cross-attention layer of a clone of a MODEL: runs the layer's own
    replacement (the green k/v protection when installed) and records, per layer, the keys and values the
    attention used and the green tokens' attention map (mean over heads and green tokens; B, N)."""

    def __init__(self, model, positions):
        from diffumatting.training.attention import cross_attention_blocks

        self.positions = list(positions)
        self.records: dict[tuple, dict] = {}
        self.model = model.clone()
        replace = self.model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for b in cross_attention_blocks(self.model.get_model_object("diffusion_model")):
            for t in range(b.depth):
                key = (b.part, b.index, t)
                self.model.set_model_attn2_replace(self._layer(key, replace.get(key)), b.part, b.index, t)

    def _layer(self, key, inner):
        from diffumatting.models.green_protection import attend

        def run(q, k, v, extra_options):
            if inner is not None:
                k, v = inner.correct(k, v, extra_options)
            heads = int(extra_options["n_heads"])
            b, n, c = q.shape
            d = c // heads
            qh = q.float().view(b, n, heads, d).transpose(1, 2)
            kh = k.float().reshape(b, -1, heads, d).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
            self.records[key] = {"k": k.float().clone(), "v": v.float().clone(),
                                 "map": probs[..., self.positions].mean(dim=(1, 3))}
            return attend(q, k, v, heads)
        return run


KEY_RGB = (0.0, 0xb1 / 255, 0x40 / 255)
OBJECT_RGB = (0.75, 0.25, 0.15)


def keyed_image(size: int, region: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, size, size, 3), background mask (size, size) bool): a flat object colour inside the fixed
    ellipse `region` on the key colour, with a hard edge."""
    from diffumatting.models.green_canvas import background_weight

    bg = background_weight(size, size, **{**region, "feather": 0.0}) > 0.5
    img = torch.tensor(OBJECT_RGB).expand(size, size, 3).clone()
    img[bg] = torch.tensor(KEY_RGB)
    return img[None], bg


def record_step(model, cond, positions, seed: int, latent: torch.Tensor, denoise: float = 0.4) -> dict:
    """Records of one model call (one euler step, cfg 1: the positive prompt only) on `latent` (a VAE
    latent) noised to the start of the last `denoise` fraction of the schedule."""
    import comfy.sample

    rec = AttentionRecorder(model, positions)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        comfy.sample.sample(rec.model, noise, 1, 1.0, "euler", "normal", cond, cond, latent, denoise=denoise,
                            disable_pbar=True)
    return rec.records


def background_iou(amap: torch.Tensor, background: torch.Tensor) -> float:
    """IoU of a (N,) attention map's top pixels with a background mask (h, w) resized to the map's square
    grid (as many top pixels as the background has)."""
    import torch.nn.functional as F

    side = int(round(amap.numel() ** 0.5))
    bg = F.interpolate(background[None, None].float(), size=(side, side), mode="area")[0, 0].flatten() > 0.5
    top = torch.zeros_like(bg)
    top[torch.topk(amap.flatten(), int(bg.sum())).indices] = True
    return float((top & bg).sum()) / max(1, int((top | bg).sum()))


def kv_change(base: dict, lora: dict, prot: dict, positions) -> tuple[float, float]:
    """(green, others) over every layer's keys and values: green = |prot - base| / |lora - base| at the green
    positions (what is left of the LoRA's change there), others = |prot - lora| / |lora - base| elsewhere
    (how much the protection moved the LoRA's change on the other tokens)."""
    num_g = den_g = num_o = den_o = 0.0
    for layer in base:
        for kind in ("k", "v"):
            b, l, p = base[layer][kind], lora[layer][kind], prot[layer][kind]
            mask = torch.zeros(b.shape[1], dtype=torch.bool)
            mask[list(positions)] = True
            num_g += float((p - b)[:, mask].pow(2).sum())
            den_g += float((l - b)[:, mask].pow(2).sum())
            num_o += float((p - l)[:, ~mask].pow(2).sum())
            den_o += float((l - b)[:, ~mask].pow(2).sum())
    return (num_g / max(den_g, 1e-30)) ** 0.5, (num_o / max(den_o, 1e-30)) ** 0.5


# Object placements (fixed-ellipse regions): the fit uses FIT_PLACEMENTS, the measurements HELD_OUT_PLACEMENTS.
FIT_PLACEMENTS = tuple(dict(center_x=x, center_y=y, width=w, height=h, feather=0.0) for x, y, w, h in (
    (0.5, 0.5, 0.6, 0.7), (0.3, 0.35, 0.4, 0.5), (0.7, 0.6, 0.5, 0.4), (0.4, 0.7, 0.7, 0.35),
    (0.65, 0.3, 0.35, 0.6), (0.5, 0.45, 0.3, 0.3), (0.25, 0.6, 0.45, 0.8), (0.75, 0.75, 0.45, 0.45)))
HELD_OUT_PLACEMENTS = tuple(dict(center_x=x, center_y=y, width=w, height=h, feather=0.0) for x, y, w, h in (
    (0.45, 0.55, 0.55, 0.6), (0.6, 0.4, 0.4, 0.55), (0.35, 0.45, 0.5, 0.4)))


def keyed_latent(vae, size: int, region: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(VAE latent of keyed_image, alpha (1, 1, size, size): 1 on the object)."""
    img, bg = keyed_image(size, region)
    with torch.no_grad():
        lat = vae.encode(img)
    return lat.float(), (~bg).float()[None, None]


def fit_green_attention(model, clip, vae, steps: int = 60, lr: float = 3e-3, size: int = 64,
                        seed: int = 0, batch: int = 4) -> list[float]:
    """Give the tiny model's "green" token an attention map that follows the background, as a DiffuMatting
    UNet's does: `steps` Adam steps of the paper's green-token attention loss (models.losses) on its
    cross-attention query/key weights only, on keyed images (FIT_PLACEMENTS, GREEN_PROMPTS), noised at
    t in 200..700. Changes `model`'s weights in place (call before any LoRA or sampling); returns the
    losses (first, last)."""
    from diffumatting.models.losses import green_attention_loss
    from diffumatting.training.attention import GreenAttentionCapture, cross_attention_blocks, green_indicator

    unet = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")
    latents, alphas = zip(*(keyed_latent(vae, size, r) for r in FIT_PLACEMENTS))
    x0 = model.model.process_latent_in(torch.cat(latents))
    alpha = torch.cat(alphas)
    conds = [encode_green(clip, p) for p in GREEN_PROMPTS]
    params = [p for n, p in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    cap = GreenAttentionCapture(cross_attention_blocks(unet))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            c = conds[step % len(conds)]
            pick = torch.randperm(x0.shape[0], generator=gen)[:batch]
            context = c[0][0].expand(len(pick), -1, -1)
            ind, _ = green_indicator([recorded_positions(c)] * len(pick), len(pick), context.shape[1])
            t = torch.randint(200, 700, (len(pick),), generator=gen)
            ab = 1.0 / (1.0 + sampling.sigma(t.float()).view(-1, 1, 1, 1).float() ** 2)
            noise = torch.randn(x0[pick].shape, generator=gen)
            x_t = ab.sqrt() * x0[pick] + (1 - ab).sqrt() * noise
            cap.set_tokens(ind)
            unet(x_t, t.float(), context=context, transformer_options=cap.transformer_options())
            loss = green_attention_loss(cap.maps(), alpha[pick])
            cap.set_tokens(None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    return [losses[0], losses[-1]]
