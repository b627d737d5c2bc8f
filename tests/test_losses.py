"""The trainer's losses on hand-made tensors, the cheap green-attention capture, and where gradients go."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffumatting.models import losses
from diffumatting.training.attention import GreenAttentionCapture, green_indicator, reference_green_map


# --- diffusion ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_targets_invert(prediction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ab = torch.tensor([0.9, 0.5, 0.05])
    x_t = losses.add_noise(x0, noise, ab)
    target = losses.diffusion_target(x0, noise, ab, prediction)
    # A perfect model output gives back x0 exactly and zero diffusion loss.
    assert torch.allclose(losses.predicted_x0(x_t, target, ab, prediction), x0, atol=1e-4)
    assert float(losses.diffusion_loss(target, target)) == 0.0
    if prediction == "eps":
        assert torch.equal(target, noise)
    else:
        a = ab.view(-1, 1, 1, 1)
        assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        losses.diffusion_target(x0, noise, ab, "x0")


# --- green-background control ---------------------------------------------------------------------------
def _half_alpha(b=2, h=16, w=16):
    """Object (alpha 1) on the left half, background on the right half."""
    a = torch.zeros(b, 1, h, w)
    a[..., : w // 2] = 1.0
    return a


def test_green_loss_known_maps():
    alpha = _half_alpha()
    bg4 = 1 - F.adaptive_avg_pool2d(alpha, 4)                         # (B,1,4,4): right half = 1
    perfect = (bg4 * 0.3 + 0.01).flatten(1)                           # any affine copy normalises to the mask
    assert float(losses.green_attention_loss(perfect, alpha, (16, 16))) == pytest.approx(0.0, abs=1e-6)
    inverted = (1 - bg4).flatten(1)
    assert float(losses.green_attention_loss(inverted, alpha, (16, 16))) == pytest.approx(1.0, abs=1e-6)
    # Two maps are averaged; a (B,h,w) map works too; the latent size picks the map's grid.
    both = losses.green_attention_loss([perfect, inverted.view(2, 4, 4)], alpha, (16, 16))
    assert float(both) == pytest.approx(0.5, abs=1e-6)
    # A sample without a green token (weight 0) does not count.
    mixed = torch.cat([perfect[:1], inverted[1:]])
    assert float(losses.green_attention_loss(mixed, alpha, (16, 16), sample_weight=torch.tensor([1.0, 0.0]))) == \
        pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="does not fit a latent"):
        losses.green_attention_loss(torch.zeros(2, 7), alpha, (16, 16))


def test_attention_iou_median_threshold():
    alpha = _half_alpha()
    bg = (1 - F.adaptive_avg_pool2d(alpha, 8)).flatten(1)
    assert torch.allclose(losses.attention_iou(bg, alpha, (8, 8)), torch.ones(2))
    assert torch.allclose(losses.attention_iou(1 - bg, alpha, (8, 8)), torch.zeros(2))
    # A random map overlaps about half of the background.
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    assert 0.15 < float(losses.attention_iou(noise, alpha, (8, 8)).mean()) < 0.55


# --- transition-boundary detail -------------------------------------------------------------------------
def test_sobel_flat_and_step():
    flat = torch.full((1, 2, 8, 8), 0.3)
    assert float(losses.sobel_magnitude(flat).abs().max()) < 1e-6
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    mag = losses.sobel_magnitude(step)[0, 0]
    assert torch.allclose(mag[:, 3:5], torch.full((8, 2), 0.5), atol=1e-5)
    assert float(mag[:, :3].abs().max()) < 1e-5 and float(mag[:, 5:].abs().max()) < 1e-5


def test_detail_loss_values_and_band_weight():
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    flat = torch.zeros(1, 1, 8, 8)
    opaque = torch.ones(1, 1, 8, 8)                           # no transition band
    assert float(losses.detail_loss(flat, flat, opaque)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.detail_loss(step, flat, opaque)) == pytest.approx(0.125, abs=1e-5)   # 0.5 on 2 of 8 columns
    band = torch.ones(1, 1, 8, 8)
    band[..., 3:5] = 0.5                                      # soft edge exactly where the step is
    # weights 5 on the two band columns, 1 elsewhere: (0.5 * 5 * 16) / (5 * 16 + 1 * 48)
    assert float(losses.detail_loss(step, flat, band, band_weight=4.0)) == pytest.approx(40 / 128, abs=1e-5)
    # The band is found at full resolution and max-pooled to the latent grid.
    band_hr = torch.ones(1, 1, 64, 64)
    band_hr[..., 31, 24:40] = 0.5
    assert losses.transition_band(band_hr, (8, 8))[0, 0].sum() == 2
    # Per-sample weights scale each sample; the target gets no gradient.
    pred = step.clone().requires_grad_(True)
    target = flat.clone().requires_grad_(True)
    losses.detail_loss(pred, target, opaque, sample_weight=torch.tensor([0.5])).backward()
    assert pred.grad.abs().sum() > 0 and target.grad is None


# --- the capture ------------------------------------------------------------------------------------------
def _qkv(b=2, n=16, t=77, heads=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * d, generator=g)
    k = torch.randn(b, t, heads * d, generator=g)
    v = torch.randn(b, t, heads * d, generator=g)
    return q, k, v


def test_capture_matches_plain_attention_and_naive_map():
    heads = 5
    q, k, v = _qkv(heads=heads)
    ind, has = green_indicator([[3, 9], []], 2, 77)
    assert torch.equal(has, torch.tensor([1.0, 0.0]))
    cap = GreenAttentionCapture([])
    cap.set_tokens(ind)
    out = cap(q, k, v, {"n_heads": heads, "block": ("input", 1), "block_index": 0})
    plain = F.scaled_dot_product_attention(*(x.view(2, -1, heads, 8).transpose(1, 2) for x in (q, k, v)))
    assert torch.allclose(out, plain.transpose(1, 2).reshape(2, 16, heads * 8), atol=1e-5)
    (m,) = cap.maps()
    assert m.shape == (2, 16)
    assert torch.allclose(m, reference_green_map(q, k, ind, heads), atol=1e-5)
    assert float(m[1].abs().max()) == 0.0          # no green token: zero map
    # Mean over the green tokens: each probability in [0, 1] and the map below the max of the two columns.
    assert float(m.max()) <= 1.0
    with pytest.raises(ValueError, match="green token positions"):
        green_indicator([[80]], 1, 77)


def test_capture_gradients_reach_q_and_k_only():
    heads = 5
    q, k, v = (x.requires_grad_(True) for x in _qkv(heads=heads))
    ind, _ = green_indicator([[3], [4, 5]], 2, 77)
    cap = GreenAttentionCapture([])
    cap.set_tokens(ind)
    cap(q, k, v, {"n_heads": heads, "block": ("output", 0)})
    losses.green_attention_loss(cap.maps(), _half_alpha(2, 4, 4)).backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    assert v.grad is None or float(v.grad.abs().sum()) == 0.0, "the map must not depend on the values"


# --- in the real UNet ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unet(comfy_host, tmp_path_factory):
    import comfy.sd

    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    path = cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                  model_options={"dtype": torch.float32})[0]
    return model.model


def test_green_loss_gradients_in_unet(tiny_unet):
    from diffumatting.training.attention import cross_attention_blocks, select_blocks

    unet = tiny_unet.diffusion_model
    blocks = cross_attention_blocks(unet)
    assert [(b.part, b.index, b.factor) for b in blocks] == [("input", 1, 1), ("middle", 0, 1), ("output", 0, 1),
                                                              ("output", 1, 1)]
    with pytest.raises(ValueError, match="choose from"):
        select_blocks(unet, [2])
    cap = GreenAttentionCapture([b for b in blocks if b.key == ("input", 1)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([100.0, 700.0])
    ind, has = green_indicator([[6], [6, 7]], 2, 77)
    unet.requires_grad_(True)
    try:
        with torch.no_grad():
            plain = unet(x, timesteps=t, context=ctx)
        cap.set_tokens(ind)
        out = unet(x, timesteps=t, context=ctx, transformer_options=cap.transformer_options())
        assert torch.allclose(out, plain, atol=1e-4), "capturing must not change the UNet output"
        (m,) = cap.maps()
        assert m.shape == (2, 64)
        unet.zero_grad(set_to_none=True)
        losses.green_attention_loss(cap.maps(), _half_alpha(2, 64, 64), (8, 8), sample_weight=has).backward()
        grads = {n: p.grad for n, p in unet.named_parameters()}
        blk = "input_blocks.1.1.transformer_blocks.0."
        assert grads[blk + "attn2.to_q.weight"].abs().sum() > 0
        assert grads[blk + "attn2.to_k.weight"].abs().sum() > 0
        assert grads["input_blocks.0.0.weight"].abs().sum() > 0       # layers before the captured block
        # Nothing after the captured attention, nor its values / output projection, gets a gradient.
        for name in (blk + "attn2.to_v.weight", blk + "attn2.to_out.0.weight", blk + "ff.net.2.weight",
                     "middle_block.0.in_layers.2.weight", "output_blocks.0.0.in_layers.2.weight", "out.2.weight"):
            assert grads[name] is None or float(grads[name].abs().sum()) == 0.0, name
        # The detail and diffusion losses reach the output layer.
        unet.zero_grad(set_to_none=True)
        cap.set_tokens(None)
        out = unet(x, timesteps=t, context=ctx)
        losses.detail_loss(out, x, _half_alpha(2, 64, 64)).backward()
        assert unet.out[2].weight.grad.abs().sum() > 0
    finally:
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)


def test_gradient_checkpointing_same_gradients(comfy_host, tmp_path_factory):
    """The trainer's checkpointed blocks (used on GPUs) give the same loss and gradients, capture included."""
    import comfy.sd

    from diffumatting.training.attention import cross_attention_blocks
    from diffumatting.training.unet_stage import enable_gradient_checkpointing
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    path = cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")
    unet = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                 model_options={"dtype": torch.float32})[0].model.diffusion_model
    unet.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([50.0, 900.0])
    ind, has = green_indicator([[5], [5, 6]], 2, 77)
    alpha = _half_alpha(2, 64, 64)

    def loss_and_grads():
        cap = GreenAttentionCapture(cross_attention_blocks(unet))
        cap.set_tokens(ind)
        out = unet(x, timesteps=t, context=ctx, transformer_options=cap.transformer_options())
        loss = losses.diffusion_loss(out, x) + losses.green_attention_loss(cap.maps(), alpha, (8, 8), has)
        unet.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    ref_loss, ref = loss_and_grads()
    assert enable_gradient_checkpointing(unet) == 9   # 5 ResBlocks + 4 SpatialTransformers
    got_loss, got = loss_and_grads()
    assert got_loss == pytest.approx(ref_loss, rel=1e-6)
    assert ref.keys() == got.keys()
    worst = max(float((ref[k] - got[k]).abs().max() / (ref[k].abs().max() + 1e-12)) for k in ref)
    assert worst < 1e-4, worst


def test_checkpointing_with_capture_cleared_as_the_loop_does(comfy_host, tmp_path_factory):
    """Defect 1: the UNet stage clears the green capture (set_tokens(None)) when its step returns, before the
    loop's backward. With gradient checkpointing the backward re-runs each transformer block; the re-run
    must take the same padded attention path (torch's checkpoint otherwise fails on the changed tensors)
    and give the gradients of an un-checkpointed step."""
    from diffumatting.training import config
    from diffumatting.training.distributed import Dist
    from diffumatting.training.session import Session
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint
    from diffumatting.training.unet_stage import UnetStage, enable_gradient_checkpointing

    path = cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")
    out = tmp_path_factory.mktemp("gc_run")
    cfg = config.validate(config.build("tiny", None, {
        "run": {"out": str(out), "gradient_checkpointing": "off"}, "model": {"tiny": False, "checkpoint": str(path)},
        "data": {"synthetic_count": 4, "holdout": 0, "cache_latents": False},
        "unet": {"mode": "full", "batch_size": 2}}))
    session = Session(cfg, Dist(), log=lambda *a: None)
    session.load_models()
    session.build_items()
    stage = UnetStage(session)
    stage.setup()
    batch = session.step_data("unet", 2, None).batch(0)

    def grads():
        stage.optimizer.zero_grad(set_to_none=True)
        total, parts = stage.step(0, batch)           # returns with the capture cleared, as in the loop
        assert stage.capture.indicator is None and "green" in parts
        total.backward()
        return float(total.detach()), {n: p.grad.clone() for n, p in session.unet.named_parameters()
                                       if p.grad is not None}

    try:
        ref_loss, ref = grads()
        assert enable_gradient_checkpointing(session.unet) == 9
        got_loss, got = grads()
    finally:
        stage.teardown()
    assert got_loss == pytest.approx(ref_loss, rel=1e-6)
    assert ref.keys() == got.keys() and len(ref) > 100
    worst = max(float((ref[k] - got[k]).abs().max() / (ref[k].abs().max() + 1e-12)) for k in ref)
    assert worst < 1e-4, worst
