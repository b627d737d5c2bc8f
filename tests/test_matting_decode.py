"""DiffuMatting VAE Decode and the head loader, in-process on ComfyUI VAEs built from core's own classes,
and the txt2img workflow in the real server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffumatting.models.matting_head import HeadConfig, LoadedHead, MattingHead, save_head
from matting_fixtures import TINY_HEAD_NAME, small_vae

ROOT = Path(__file__).resolve().parents[1]
SMALL = HeadConfig.for_decoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def M(comfy_host):
    from diffumatting.nodes import matting

    return matting


@pytest.fixture(scope="module")
def vae(comfy_host):
    return small_vae(seed=0)


@pytest.fixture(scope="module")
def head():
    return LoadedHead(MattingHead(SMALL).reset_parameters(0), "sd1", path="test_head.safetensors")


def _smooth_latent(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, 4, max(2, h // 4), max(2, w // 4), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)


class _CountCalls:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def remove(self):
        self.handle.remove()


# --- decode ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,h,w", [(1, 8, 8), (3, 5, 7), (2, 9, 13)])
def test_decode_shapes_one_pass_and_same_colour_as_core(M, vae, head, b, h, w):
    latent = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(b * h * w))
    counter = _CountCalls(vae.first_stage_model.decoder)
    try:
        out = M.MattingVAEDecode.execute({"samples": latent}, vae, head, refine_with_greenpost=False)
    finally:
        counter.remove()
    image, alpha, rgba, tmask = out.result
    assert counter.n == 1, "the decoder must run exactly once"
    assert image.shape == (b, h * 8, w * 8, 3) and rgba.shape == (b, h * 8, w * 8, 4)
    assert alpha.shape == tmask.shape == (b, h * 8, w * 8)
    for t in (image, alpha, rgba, tmask):
        assert t.dtype == torch.float32 and t.device == vae.output_device
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert torch.equal(rgba[..., 3], alpha) and torch.allclose(tmask, 1.0 - alpha)
    assert torch.equal(rgba[..., :3], image)
    with torch.no_grad():
        core = vae.decode(latent)
    assert torch.allclose(image, core, atol=1e-6), "colour must be exactly core's VAE decode"
    assert not vae.first_stage_model.decoder.conv_out._forward_pre_hooks, "hooks must be removed"


def test_alpha_is_the_head_on_the_decoder_features(M, vae, head):
    from diffumatting.models.matting_head import FeatureTaps

    latent = _smooth_latent(2, 6, 10, seed=4)
    _, alpha = M.decode_with_head(vae, latent, head)
    fsm = vae.first_stage_model
    with torch.no_grad(), FeatureTaps(fsm.decoder, SMALL.taps) as taps:
        fsm.decode(latent)
        expected = head.head(taps.features[SMALL.fine_tap], [taps.features[t] for t in SMALL.coarse_taps])
    assert torch.allclose(alpha, expected[:, 0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vae(M, head, dtype, comfy_host):
    vae16 = small_vae(seed=0, dtype=dtype)
    vae32 = small_vae(seed=0)
    latent = _smooth_latent(2, 6, 6, seed=1)
    rgb, alpha = M.decode_with_head(vae16, latent, head)
    ref_rgb, ref_alpha = M.decode_with_head(vae32, latent, head)
    assert rgb.dtype == alpha.dtype == torch.float32
    assert (rgb - ref_rgb).abs().mean() < 0.03, float((rgb - ref_rgb).abs().mean())
    assert (alpha - ref_alpha).abs().max() < 0.03, float((alpha - ref_alpha).abs().max())


def test_tiled_matches_untiled_as_well_as_core_tiles_do(M, vae, head):
    """Tolerance: tiles decoded with GroupNorm see other statistics than the whole image, so no tiled decode
    is exact. Ours must be as close to the untiled decode as core's own tiled decode is (mean |diff| at most
    1.25x core's), and the alpha within mean 0.01 / max 0.06 of the untiled alpha."""
    latent = _smooth_latent(2, 24, 40, seed=2)
    rgb, alpha = M.decode_with_head(vae, latent, head)
    counter = _CountCalls(vae.first_stage_model.decoder)
    try:
        rgb_t, alpha_t = M.decode_with_head(vae, latent, head, M.Tiling.ALWAYS, tile_size=128, overlap=32)
    finally:
        counter.remove()
    assert counter.n == 2 * 2 * 3, "one decoder pass per tile (2 x 3 tiles per image, batch 2)"
    assert rgb_t.shape == rgb.shape and alpha_t.shape == alpha.shape
    with torch.no_grad():
        core_t = vae.decode_tiled(latent, tile_x=16, tile_y=16, overlap=4)
    ours = float((rgb_t - rgb).abs().mean())
    core = float((core_t - rgb).abs().mean())
    assert ours <= 1.25 * core, (ours, core)
    assert float((alpha_t - alpha).abs().mean()) < 0.01
    assert float((alpha_t - alpha).abs().max()) < 0.06
    # One tile covering everything is the untiled decode.
    rgb_1, alpha_1 = M.decode_with_head(vae, latent, head, M.Tiling.ALWAYS, tile_size=512, overlap=64)
    assert torch.allclose(rgb_1, rgb, atol=1e-5) and torch.allclose(alpha_1, alpha, atol=1e-5)


def test_progress_and_interruption(M, vae, head, comfy_host):
    import comfy.model_management as mm
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        M.decode_with_head(vae, _smooth_latent(1, 16, 24), head, M.Tiling.ALWAYS, tile_size=64, overlap=16)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen and seen[-1][0] == seen[-1][1] == 3 * 4  # tiles of 8 latent px, overlap 2: 3 x 4
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            M.decode_with_head(vae, _smooth_latent(1, 16, 24), head, M.Tiling.ALWAYS, tile_size=64, overlap=16)
    finally:
        mm.interrupt_current_processing(False)
    assert not vae.first_stage_model.decoder.conv_out._forward_pre_hooks


def test_out_of_memory_falls_back_to_tiles(M, vae, head, monkeypatch):
    calls = {"n": 0}
    fsm = vae.first_stage_model
    real = fsm.decode

    def flaky(z, **kw):
        calls["n"] += 1
        if z.shape[-1] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, **kw)

    monkeypatch.setattr(fsm, "decode", flaky)
    latent = _smooth_latent(1, 8, 16)
    rgb, alpha = M.decode_with_head(vae, latent, head, M.Tiling.AUTO, tile_size=64, overlap=16)
    assert rgb.shape == (1, 64, 128, 3) and calls["n"] == 1 + 3
    with pytest.raises(torch.cuda.OutOfMemoryError):
        M.decode_with_head(vae, latent, head, M.Tiling.NEVER)
    monkeypatch.setattr(fsm, "decode", lambda z, **kw: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):  # other errors are not mistaken for memory
        M.decode_with_head(vae, latent, head, M.Tiling.AUTO)


def test_head_for_another_architecture_is_refused(M, vae):
    wrong = LoadedHead(MattingHead(HeadConfig()), "sdxl", path="sdxl_head.safetensors")  # 128-channel decoder
    with pytest.raises(ValueError, match=r"last features have 32 channels, the matting head expects 128 "
                                         r"\(SDXL KL-f8 VAE\)"):
        M.decode_with_head(vae, torch.zeros(1, 4, 4, 4), wrong)
    with pytest.raises(ValueError, match="latent has 16 channels"):
        M.decode_with_head(vae, torch.zeros(1, 16, 4, 4), LoadedHead(MattingHead(SMALL), "sd1"))


def test_greenpost_paths(M, vae, head, monkeypatch):
    """Refine passes the head's alpha as GreenPost's prior; without a head GreenPost keys the decode."""
    import diffumatting.models.greenpost as gp

    calls = []
    real = gp.greenpost

    def spy(image, prior_alpha_bhw=None, options=None):
        calls.append(None if prior_alpha_bhw is None else prior_alpha_bhw.clone())
        return real(image, prior_alpha_bhw=prior_alpha_bhw, options=options)

    monkeypatch.setattr(gp, "greenpost", spy)
    latent = _smooth_latent(2, 8, 8, seed=5)
    _, head_alpha = M.decode_with_head(vae, latent, head)
    image, alpha, rgba, tmask = M.MattingVAEDecode.execute({"samples": latent}, vae, head).result
    assert len(calls) == 1 and torch.allclose(calls[0], head_alpha)
    assert rgba.shape == (2, 64, 64, 4) and torch.equal(rgba[..., 3], alpha)
    assert torch.allclose(tmask, 1 - alpha)
    image2, alpha2, rgba2, _ = M.MattingVAEDecode.execute({"samples": latent}, vae, None).result
    assert len(calls) == 2 and calls[1] is None
    assert torch.allclose(image2, image, atol=1e-6)
    assert alpha2.shape == (2, 64, 64) and rgba2.shape == (2, 64, 64, 4)
    image3, alpha3, _, _ = M.MattingVAEDecode.execute({"samples": latent}, vae, None, tiling="always",
                                                      tile_size=64, tile_overlap=32).result
    assert len(calls) == 3 and image3.shape == (2, 64, 64, 3) and alpha3.shape == (2, 64, 64)


# --- loader -------------------------------------------------------------------------------------------------
@pytest.fixture()
def head_folder(M, tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "diffumatting"
    (folder / "sub").mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffumatting", ([str(folder)], set()))
    save_head(folder / "a.safetensors", MattingHead(SMALL).reset_parameters(1), "sd1")
    save_head(folder / "sub" / "b.safetensors", MattingHead(SMALL), "sdxl")
    (folder / "old.pt").write_bytes(b"\x80\x02junk")
    (tmp_path / "outside.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    return folder


def test_loader_lists_and_loads(M, head_folder):
    assert M.head_files() == ["a.safetensors", "sub/b.safetensors"]
    combo = M.HeadLoader.define_schema().inputs[0]
    assert combo.options == ["a.safetensors", "sub/b.safetensors"]
    loaded = M.HeadLoader.execute("a.safetensors", "as in file").result[0]
    assert isinstance(loaded, LoadedHead) and loaded.vae_family == "sd1" and loaded.config == SMALL
    assert M.HeadLoader.execute("sub/b.safetensors", "sdxl").result[0].vae_family == "sdxl"
    with pytest.raises(ValueError, match=r"\('sdxl'\) but is used with the SD1.x/SD2 KL-f8 VAE \('sd1'\)"):
        M.HeadLoader.execute("sub/b.safetensors", "sd1")


@pytest.mark.parametrize("name,message", [
    ("../outside.safetensors", "outside models/diffumatting"),
    ("/etc/passwd.safetensors", "outside models/diffumatting"),
    ("old.pt", "pickle"),
    ("missing.safetensors", "not found"),
    ("notes.txt", "not a .safetensors file"),
    ("", "no matting head file chosen"),
])
def test_loader_refuses_bad_names(M, head_folder, name, message):
    result = M.HeadLoader.validate_inputs(head_name=name)
    assert isinstance(result, str) and message in result
    with pytest.raises(ValueError, match=message):
        M.resolve_head_path(name)


def test_loader_refuses_symlink_escape(M, head_folder):
    (head_folder / "link.safetensors").symlink_to(head_folder.parent / "outside.safetensors")
    with pytest.raises(ValueError, match="outside models/diffumatting"):
        M.resolve_head_path("link.safetensors")


def test_schema_documents_every_socket(M):
    for node in M.NODES:
        s = node.define_schema()
        assert s.node_id.startswith("DiffuMatting") and s.category == "DiffuMatting/matting" and s.description
        for item in [*s.inputs, *s.outputs]:
            assert item.tooltip, (s.node_id, item.id)
    decode = M.MattingVAEDecode.define_schema()
    head_input = [i for i in decode.inputs if i.id == "head"][0]
    assert head_input.optional and "GreenPost" in head_input.tooltip
    assert [o.id for o in decode.outputs] == ["image", "alpha", "rgba", "transparency_mask"]


# --- workflow in the real server -------------------------------------------------------------------------
@pytest.mark.server
def test_txt2img_matting_workflow_writes_rgba_png(comfy_server, server_models):
    from PIL import Image
    from fixtures_host import shrink_for_tiny

    assert server_models["matting_head"] == TINY_HEAD_NAME
    workflow = shrink_for_tiny(json.loads((ROOT / "workflows" / "transparent_sd15_diffumatting.json").read_text()))
    entry = comfy_server.run_workflow(workflow, timeout=600)
    files = comfy_server.output_files(entry)
    pngs = [Image.open(f) for f in files]
    rgba = [np.asarray(p) for p in pngs if p.mode == "RGBA"]
    assert rgba, f"no RGBA PNG written: {[p.mode for p in pngs]}"
    assert rgba[0].shape == (64, 64, 4)
