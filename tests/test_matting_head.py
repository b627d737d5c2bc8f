"""The matting head (models/matting_head.py), its losses, files, taps and the one-pass alpha channel
(models/matting_decode.py), and a learning test."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from diffumatting.models.matting_decode import AlphaChannel
from diffumatting.models.matting_head import (FORMAT_VERSION, KIND, FeatureTaps, HeadConfig, HeadTaps, MattingHead,
                                              load_head, save_head)
from diffumatting.models.matting_losses import (alpha_l1, composition_loss, gradient_loss, matting_loss)


def _features(cfg: HeadConfig, b=2, h=24, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    fine = torch.randn(b, cfg.fine_channels, h, w, generator=g)
    coarse = [torch.randn(b, c, h // 2, w // 2, generator=g) * 30.0 for c in cfg.coarse_channels]
    return fine, coarse


SMALL = HeadConfig.for_decoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


# --- config and module ------------------------------------------------------------------------------------
def test_default_config_is_sd_kl_f8_and_small():
    cfg = HeadConfig()
    assert cfg == HeadConfig.for_decoder()  # SD1.x / SDXL decoder: ch 128, ch_mult (1,2,4,4), 2 res blocks
    assert cfg.fine_tap == "conv_out:input" and cfg.coarse_taps == ("up.1.block.2",)
    assert cfg.coarse_channels == (256,) and cfg.fine_channels == 128 and cfg.upscale == 8
    head = MattingHead(cfg)
    assert head.num_parameters() < 25_000, head.num_parameters()


def test_config_json_round_trip_and_validation():
    cfg = HeadConfig.for_decoder(ch=64, ch_mult=(1, 2, 4), num_res_blocks=1, coarse_levels=2, hidden=8)
    assert cfg.coarse_taps == ("up.2.block.1", "up.1.block.1") and cfg.coarse_channels == (256, 128)
    assert HeadConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        HeadConfig.from_json(json.dumps({**json.loads(cfg.to_json()), "wings": 2}))
    with pytest.raises(ValueError, match="same length"):
        HeadConfig(coarse_taps=("a", "b"), coarse_channels=(3,))
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        HeadConfig(hidden=0)
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadConfig.from_json("{oops")
    with pytest.raises(ValueError, match="matting head config must be a JSON object, got list"):
        HeadConfig.from_json("[1]")
    with pytest.raises(ValueError, match="hidden must be a positive integer"):  # the class's own check
        HeadConfig.from_json(json.dumps({"hidden": -3}))
    assert HeadConfig.from_json('{"hidden": 8}') == HeadConfig(hidden=8)  # absent fields: the defaults


def test_config_from_json_tuples_and_required_fields():
    """The shared helper (models/model_files.py): JSON lists become tuples; a field without a default that the
    text lacks is named (not a TypeError from the constructor)."""
    from dataclasses import dataclass

    from diffumatting.models.model_files import config_from_json

    @dataclass(frozen=True)
    class Cfg:
        width: int
        sizes: tuple = (1, 2)

    cfg = config_from_json(Cfg, '{"width": 3, "sizes": [4, 5]}', "test")
    assert cfg == Cfg(3, (4, 5)) and isinstance(cfg.sizes, tuple)
    with pytest.raises(ValueError, match=r"test config lacks the fields \['width'\]"):
        config_from_json(Cfg, '{"sizes": []}', "test")
    with pytest.raises(ValueError, match=r"test config has unknown fields \['depth'\]"):
        config_from_json(Cfg, '{"width": 1, "depth": 2}', "test")


def test_head_shapes_range_and_dtypes():
    head = MattingHead(SMALL).reset_parameters(0)
    fine, coarse = _features(SMALL, b=3, h=18, w=26)
    alpha = head(fine, coarse)
    assert alpha.shape == (3, 1, 18, 26) and alpha.dtype == torch.float32
    assert float(alpha.detach().min()) > 0.0 and float(alpha.detach().max()) < 1.0
    for dtype in (torch.bfloat16, torch.float16):  # runs in the features' dtype, head left untouched
        a = head(fine.to(dtype), [c.to(dtype) for c in coarse])
        assert a.dtype == torch.float32       # but its last layer and sigmoid in float32 (16-bit alpha stays 16-bit)
        assert (a.float() - alpha).abs().max() < 0.02
    assert head.fine.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="expects 32 channels"):
        head(torch.zeros(1, 16, 8, 8), [torch.zeros(1, 64, 4, 4)])
    with pytest.raises(ValueError, match="expects 64 channels"):
        head(fine, [torch.zeros(3, 10, 9, 13)])


def test_head_is_local_so_crops_agree():
    """No image-wide statistics: the alpha of a crop equals the crop of the alpha away from its borders."""
    head = MattingHead(SMALL).reset_parameters(1)
    fine, coarse = _features(SMALL, b=1, h=32, w=32)
    full = head(fine, coarse)
    crop = head(fine[..., 8:24, 8:24], [c[..., 4:12, 4:12] for c in coarse])
    assert (crop[..., 3:-3, 3:-3] - full[..., 11:21, 11:21]).abs().max() < 1e-5


# --- losses ------------------------------------------------------------------------------------------------
def test_losses():
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    assert float(alpha_l1(gt, gt)) == 0.0 and float(gradient_loss(gt, gt)) == 0.0
    blurred = torch.nn.functional.avg_pool2d(gt, 3, 1, 1)
    assert float(gradient_loss(blurred, gt)) > 0.01
    assert abs(float(alpha_l1(torch.zeros_like(gt), gt)) - float(gt.mean())) < 1e-6
    fg, bg = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    image = gt * fg + (1 - gt) * bg
    assert float(composition_loss(gt, fg, bg, image)) < 1e-6
    assert float(composition_loss(1 - gt, fg, bg, image)) > 0.05
    weight = torch.zeros_like(gt)
    weight[..., :4] = 1
    wrong = gt.clone()
    wrong[..., 8:] = 1 - wrong[..., 8:]
    assert float(alpha_l1(wrong, gt, weight)) == 0.0  # errors outside the weighted region do not count
    total, parts = matting_loss(blurred, gt, fg, bg, image)
    assert set(parts) == {"l1", "grad", "comp"} and float(total) > 0
    with pytest.raises(ValueError, match="same shape"):
        alpha_l1(gt, gt[..., :8])


# --- taps: one pass, hooks removed ---------------------------------------------------------------------
class _ToyDecoder(torch.nn.Module):
    """Stands in for a KL decoder: a coarse block at 1/2 resolution, then conv_out at full resolution."""

    def __init__(self, c_fine=32, c_coarse=64):
        super().__init__()
        self.up = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
        self.up[1].block = torch.nn.ModuleList([torch.nn.Conv2d(4, c_coarse, 3, padding=1),
                                                torch.nn.Conv2d(c_coarse, c_coarse, 3, padding=1)])
        self.mid = torch.nn.Conv2d(c_coarse, c_fine, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(c_fine, 3, 3, padding=1)
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        h = self.up[1].block[1](self.up[1].block[0](z))
        h = torch.nn.functional.interpolate(h, scale_factor=2.0)
        return self.conv_out(torch.nn.functional.silu(self.mid(h)))


def test_head_taps_run_the_head_inside_one_decoder_pass():
    torch.manual_seed(0)
    dec = _ToyDecoder()
    head = MattingHead(SMALL).reset_parameters(2)
    z = torch.randn(2, 4, 10, 14)
    with FeatureTaps(dec, SMALL.taps) as taps:
        plain = dec(z)
    expected = head(taps.features["conv_out:input"], [taps.features["up.1.block.1"]])
    dec.calls = 0
    seen = []
    with torch.no_grad(), AlphaChannel(dec, head, on_call=lambda x: seen.append(tuple(x.shape))) as hooks:
        rgba = dec(z)
    assert dec.calls == hooks.calls == 1 and seen == [(2, 4, 10, 14)]
    assert rgba.shape == (2, 4, 20, 28)
    assert torch.allclose(rgba[:, :3], plain, atol=1e-6)
    assert torch.allclose((rgba[:, 3:] + 1) / 2, expected, atol=1e-6), "alpha stored as 2 * alpha - 1"
    assert not dec.conv_out._forward_pre_hooks and not dec.up[1].block[1]._forward_hooks
    assert not dec._forward_hooks and not dec._forward_pre_hooks
    assert torch.equal(dec(z), plain), "the decoder is as before once the hooks are gone"


def test_head_taps_removed_on_error_and_missing_modules_named():
    dec = _ToyDecoder()
    head = MattingHead(SMALL)

    def stop(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), AlphaChannel(dec, head, on_call=stop):
        dec(torch.randn(1, 4, 6, 6))
    assert not dec.conv_out._forward_pre_hooks and not dec.up[1].block[1]._forward_hooks
    assert not dec._forward_hooks and not dec._forward_pre_hooks
    other = HeadConfig.for_decoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2)
    with pytest.raises(ValueError, match="no submodule 'up.1.block.2'"):
        with HeadTaps(dec, MattingHead(other)):
            pass
    assert not dec.conv_out._forward_pre_hooks


# --- files -------------------------------------------------------------------------------------------------
def test_head_file_round_trip(tmp_path):
    head = MattingHead(SMALL).reset_parameters(3)
    path = save_head(tmp_path / "h.safetensors", head, "sdxl", {"trained_steps": 12})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.safetensors"]  # atomic: no temporaries left
    loaded = load_head(path)
    assert loaded.vae_family == "sdxl" and loaded.config == SMALL
    assert loaded.metadata["kind"] == KIND and loaded.metadata["format_version"] == str(FORMAT_VERSION)
    assert loaded.metadata["trained_steps"] == "12"
    fine, coarse = _features(SMALL)
    with torch.no_grad():
        assert torch.equal(loaded.head(fine, coarse), head(fine, coarse))
    assert load_head(path, expected_family="sdxl").vae_family == "sdxl"


def test_head_file_refusals(tmp_path):
    from safetensors.torch import save_file

    head = MattingHead(SMALL)
    good = save_head(tmp_path / "good.safetensors", head, "sd1")
    with pytest.raises(ValueError, match=r"trained for the SD1.x/SD2 KL-f8 VAE \('sd1'\) but is used with the "
                                         r"SDXL KL-f8 VAE \('sdxl'\)"):
        load_head(good, expected_family="sdxl")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-16])
    with pytest.raises(ValueError, match="truncated"):
        load_head(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or empty"):
        load_head(tmp_path / "tiny.safetensors")
    torch.save(head.state_dict(), tmp_path / "head.pt")
    with pytest.raises(ValueError, match="pickle"):
        load_head(tmp_path / "head.pt")
    (tmp_path / "disguised.safetensors").write_bytes((tmp_path / "head.pt").read_bytes())
    with pytest.raises(ValueError, match="pickle"):
        load_head(tmp_path / "disguised.safetensors")
    save_file({"first_stage_model.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(ValueError, match="not a DiffuMatting matting head"):
        load_head(tmp_path / "vae.safetensors")
    # Another architecture in the metadata than in the tensors: the file is damaged.
    other = HeadConfig.for_decoder(ch=64)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "mixed.safetensors"),
              metadata={"kind": KIND, "format_version": "1", "vae_family": "sd1", "config": other.to_json()})
    with pytest.raises(ValueError, match="do not match its architecture"):
        load_head(tmp_path / "mixed.safetensors")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "new.safetensors"),
              metadata={"kind": KIND, "format_version": str(FORMAT_VERSION + 1), "vae_family": "sd1",
                        "config": SMALL.to_json()})
    with pytest.raises(ValueError, match="update comfyui-diffumatting"):
        load_head(tmp_path / "new.safetensors")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "fam.safetensors"),
              metadata={"kind": KIND, "format_version": "1", "vae_family": "flux", "config": SMALL.to_json()})
    with pytest.raises(ValueError, match="'flux' is not a known VAE family"):
        load_head(tmp_path / "fam.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_head(tmp_path / "h.pt", head, "sd1")
    with pytest.raises(ValueError, match="not a known VAE family"):
        save_head(tmp_path / "h.safetensors", head, "sd3")
    # A header that claims more bytes than the file has.
    (tmp_path / "liar.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ValueError, match="truncated or not a safetensors"):
        load_head(tmp_path / "liar.safetensors")


def test_config_from_a_vae_state_dict(comfy_host):
    from matting_fixtures import kl_ddconfig, random_vae_state_dict

    sd = random_vae_state_dict(kl_ddconfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    assert HeadConfig.for_vae_state_dict(sd) == SMALL
    ck = {"first_stage_model." + k: v for k, v in sd.items()}
    assert HeadConfig.for_vae_state_dict(ck, prefix="first_stage_model.decoder.") == SMALL
    with pytest.raises(ValueError, match="not a KL-f8 VAE decoder"):
        HeadConfig.for_vae_state_dict(ck)


# --- learning ----------------------------------------------------------------------------------------------
def test_head_learns_alpha_from_decoder_features(comfy_host):
    """Train the head on a small random-weight KL VAE's decoder features of green-screen composites;
    held-out alpha L1 must fall to well below where it began and below the best constant guess."""
    from diffumatting.models.synthetic import make_composite
    from matting_fixtures import decoder_device, small_vae

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        vae = small_vae(seed=0)
        comps = [make_composite(64, 64, seed=i) for i in range(48)]
        image = torch.from_numpy(np.stack([c.image for c in comps]))
        alpha = torch.from_numpy(np.stack([c.alpha for c in comps]))[:, None]
        fsm = vae.first_stage_model
        with torch.no_grad():
            latent = vae.encode(image)
            with FeatureTaps(fsm.decoder, SMALL.taps) as taps:  # where encode left the decoder: a GPU machine's GPU
                fsm.decode(latent.to(decoder_device(vae)))
        fine, coarse = taps.features[SMALL.fine_tap].cpu(), [taps.features[t].cpu() for t in SMALL.coarse_taps]
        assert fine.shape == (48, 32, 64, 64)
        n_train = 40
        head = MattingHead(SMALL).reset_parameters(0)

        def held_out() -> float:
            with torch.no_grad():
                return float(alpha_l1(head(fine[n_train:], [c[n_train:] for c in coarse]), alpha[n_train:]))

        start = held_out()
        constant = float((alpha[n_train:] - alpha[:n_train].median()).abs().mean())
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, n_train, (8,), generator=gen)
            loss, _ = matting_loss(head(fine[idx], [c[idx] for c in coarse]), alpha[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        end = held_out()
    finally:
        torch.set_num_threads(threads)
    assert end < 0.4 * start, (start, end)
    assert end < 0.75 * constant, (end, constant)
