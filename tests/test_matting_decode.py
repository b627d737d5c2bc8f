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
from matting_fixtures import TINY_HEAD_NAME, decoder_device, small_vae

ROOT = Path(__file__).resolve().parents[1]
SMALL = HeadConfig.for_decoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def matting(comfy_host):
    from diffumatting.nodes import matting

    return matting


@pytest.fixture(scope="module")
def vae_decode(comfy_host):
    from diffumatting.nodes import _vae_decode

    return _vae_decode


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
    """Counts the decoder's calls (context manager)."""

    def __init__(self, module):
        self.module, self.n = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._count)
        return self

    def _count(self, *_):
        self.n += 1

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def _no_hooks_left(vae) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in vae.first_stage_model.modules())


def _head_alpha_reference(vae, head, latent):
    """The head on the decoder's features of one plain decode (FeatureTaps), float32 (B,H,W)."""
    from diffumatting.models.matting_head import FeatureTaps

    fsm = vae.first_stage_model
    cfg = head.config
    with torch.no_grad(), FeatureTaps(fsm.decoder, cfg.taps) as taps:
        fsm.decode(latent.to(decoder_device(vae), vae.vae_dtype))
        out = head.head(taps.features[cfg.fine_tap].float(), [taps.features[t].float() for t in cfg.coarse_taps])
    return out[:, 0].to(vae.output_device)


# --- decode ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,h,w", [(1, 8, 8), (3, 5, 7), (2, 9, 13)])
def test_decode_one_pass_colour_is_core_and_alpha_is_the_head(matting, vae, head, b, h, w):
    latent = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(b * h * w))
    channels, estimate = vae.output_channels, vae.memory_used_decode
    with _CountCalls(vae.first_stage_model.decoder) as ours:
        out = matting.MattingVAEDecode.execute({"samples": latent}, vae, head, refine_with_greenpost=False)
    with torch.no_grad(), _CountCalls(vae.first_stage_model.decoder) as core_calls:
        core = vae.decode(latent)
    image, alpha, rgba, tmask = out.result
    assert ours.n == core_calls.n == 1, "one decoder pass, as many as core's VAE decode"
    assert image.shape == (b, h * 8, w * 8, 3) and rgba.shape == (b, h * 8, w * 8, 4)
    assert alpha.shape == tmask.shape == (b, h * 8, w * 8)
    for t in (image, alpha, rgba, tmask):
        assert t.dtype == torch.float32 and t.device == vae.output_device
    assert torch.equal(image, core.float()), "colour must be exactly core's VAE decode"
    assert torch.allclose(alpha, _head_alpha_reference(vae, head, latent), atol=1e-6)
    assert float(alpha.std()) > 1e-3, "a random head gives a varying alpha"
    assert torch.equal(rgba[..., 3], alpha) and torch.equal(tmask, 1.0 - alpha)
    assert torch.equal(rgba[..., :3], image)
    assert vae.output_channels == channels and vae.memory_used_decode is estimate, "the VAE is not modified"
    assert _no_hooks_left(vae)


def test_core_sizes_memory_with_the_head(vae_decode, vae, head, monkeypatch):
    """Core's own decode loads the model with its estimate plus the head's memory (head_memory)."""
    from comfy import model_management

    seen = []
    real = model_management.load_models_gpu

    def spy(models, memory_required=0, **kw):
        seen.append(memory_required)
        return real(models, memory_required=memory_required, **kw)

    monkeypatch.setattr(model_management, "load_models_gpu", spy)
    latent = _smooth_latent(2, 6, 10)
    vae_decode.decode(vae, latent, head)
    core = vae.memory_used_decode(latent.shape, vae.vae_dtype)
    extra = vae_decode.head_memory(latent.shape, head.config, 8, model_management.dtype_size(vae.vae_dtype))
    assert extra > 0 and seen == [pytest.approx(core + extra)]


def _head_alpha_in_pass(vae, head, latent):
    """The head's own float32 alpha (B,H,W) in one plain decoder pass in the VAE's dtype (HeadTaps)."""
    from diffumatting.models.matting_head import HeadTaps

    fsm = vae.first_stage_model
    with torch.no_grad(), HeadTaps(fsm.decoder, head.head) as taps:
        fsm.decode(latent.to(decoder_device(vae), vae.vae_dtype))
        alpha = taps.pop_alpha()
    assert alpha.dtype == torch.float32
    return alpha[:, 0].to(vae.output_device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vae(vae_decode, matting, head, dtype, comfy_host):
    vae16 = small_vae(seed=0, dtype=dtype)
    vae32 = small_vae(seed=0)
    latent = _smooth_latent(2, 6, 6, seed=1)
    rgb, alpha = vae_decode.decode(vae16, latent, head)
    ref_rgb, ref_alpha = vae_decode.decode(vae32, latent, head)
    assert rgb.dtype == alpha.dtype == torch.float32
    assert (rgb - ref_rgb).abs().mean() < 0.03, float((rgb - ref_rgb).abs().mean())
    assert (alpha - ref_alpha).abs().max() < 0.03, float((alpha - ref_alpha).abs().max())
    with torch.no_grad():
        assert torch.equal(rgb, vae16.decode(latent).float()), "colour is core's decode in that precision"

    # Alpha keeps the head's float32 precision through core's decode, tiled too, and out of the node: not the
    # VAE dtype's grid (bf16 keeps 8 significant bits: steps of 1/512 near 0 and 1). A steeper head than the
    # random one (alpha ~0.5, where the grid is fine) spreads alpha over [0, 1].
    head = LoadedHead(MattingHead(SMALL).reset_parameters(0), "sd1", path="steep_head.safetensors")
    with torch.no_grad():
        head.head.out.weight.mul_(60.0)
    head_alpha = _head_alpha_in_pass(vae16, head, latent)
    assert float(head_alpha.min()) < 0.2 and float(head_alpha.max()) > 0.8
    rgb, alpha = vae_decode.decode(vae16, latent, head)
    on_grid = ((2 * head_alpha - 1).to(dtype).float() + 1) / 2
    assert float((on_grid - head_alpha).abs().max()) > 1e-4, "the check needs an alpha the VAE dtype cannot hold"
    assert float((alpha - head_alpha).abs().max()) < 1e-6
    one_tile = vae_decode.decode(vae16, latent, head, vae_decode.Tiling.ALWAYS, tile_size=128, overlap=32)[1]
    # Core decodes tiles one batch item at a time; on a GPU, fp16 kernels can round differently for another batch
    # size, so the reference is the plain pass over each item alone (on the CPU it equals the batched one).
    per_item = torch.cat([_head_alpha_in_pass(vae16, head, latent[i:i + 1]) for i in range(latent.shape[0])])
    assert float((one_tile - per_item).abs().max()) < 1e-6, "tiles larger than the image: the same alpha"
    image, node_alpha, rgba, tmask = matting.MattingVAEDecode.execute(
        {"samples": latent}, vae16, head, refine_with_greenpost=False).result
    assert node_alpha.dtype == rgba.dtype == tmask.dtype == torch.float32
    assert float((node_alpha - head_alpha).abs().max()) < 1e-6 and torch.equal(rgba[..., 3], node_alpha)
    steps = node_alpha.flatten().sort().values.diff()
    assert float(steps[steps > 0].min()) < 1 / 4096, "alpha finer than 8 bits"


def test_tiled_is_core_tiled_decode_with_alpha(vae_decode, vae, head):
    """tiling 'always' is core's VAE.decode_tiled: the same colour, the same decoder calls; the alpha rides along
    (core blends its tiles like the colour), close to the untiled alpha."""
    latent = _smooth_latent(1, 16, 24, seed=2)
    rgb, alpha = vae_decode.decode(vae, latent, head)
    args = vae_decode.core_tile_args(vae, 128, 32)
    assert args == {"tile_x": 16, "tile_y": 16, "overlap": 4}
    with _CountCalls(vae.first_stage_model.decoder) as ours:
        rgb_t, alpha_t = vae_decode.decode(vae, latent, head, vae_decode.Tiling.ALWAYS, tile_size=128, overlap=32)
    with torch.no_grad(), _CountCalls(vae.first_stage_model.decoder) as core_calls:
        core_t = vae.decode_tiled(latent, **args)
    assert ours.n == core_calls.n > 2, "no decoder pass beyond core's own tiled decode"
    assert torch.allclose(rgb_t, core_t.float(), atol=1e-6), "colour is core's tiled decode"
    assert rgb_t.shape == rgb.shape and alpha_t.shape == alpha.shape
    assert float((alpha_t - alpha).abs().mean()) < 0.01
    assert float((alpha_t - alpha).abs().max()) < 0.06
    assert _no_hooks_left(vae)


def test_progress_and_interruption(vae_decode, vae, head, comfy_host):
    from comfy import model_management
    import comfy.utils

    latent = _smooth_latent(1, 8, 12)
    args = vae_decode.core_tile_args(vae, 64, 8)

    def progress(fn):
        seen = []
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
        try:
            fn()
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        return seen

    ours = progress(lambda: vae_decode.decode(vae, latent, head, vae_decode.Tiling.ALWAYS, tile_size=64, overlap=8))
    with torch.no_grad():
        core = progress(lambda: vae.decode_tiled(latent, **args))
    assert ours == core and ours[-1][0] == ours[-1][1] > 1, "core's own progress, step by step"
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            vae_decode.decode(vae, latent, head, vae_decode.Tiling.ALWAYS, tile_size=64, overlap=8)
    finally:
        model_management.interrupt_current_processing(False)
    assert _no_hooks_left(vae)


def test_out_of_memory_is_core_fallback_to_tiles(vae_decode, vae, head, monkeypatch):
    """auto: the whole-image decode runs out of memory, core tiles it (colour exactly as core's own fallback);
    never: a clear error instead of tiles; other errors are not mistaken for memory."""
    fsm = vae.first_stage_model
    real = fsm.decode
    calls = {"n": 0}

    def oom_once(z, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, **kw)

    latent = _smooth_latent(1, 8, 48)
    monkeypatch.setattr(fsm, "decode", oom_once)
    rgb, alpha = vae_decode.decode(vae, latent, head, vae_decode.Tiling.AUTO)
    ours_calls, calls["n"] = calls["n"], 0
    with torch.no_grad():
        core = vae.decode(latent)
    assert ours_calls == calls["n"] > 2, "core's fallback: one failed whole decode, then its tiles"
    assert torch.equal(rgb, core.float()) and alpha.shape == (1, 64, 384)
    calls["n"] = 0
    with pytest.raises(vae_decode.WholeDecodeOutOfMemory, match="tiling is 'never'"):
        vae_decode.decode(vae, latent, head, vae_decode.Tiling.NEVER)
    monkeypatch.setattr(fsm, "decode", lambda z, **kw: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        vae_decode.decode(vae, latent, head, vae_decode.Tiling.AUTO)
    assert _no_hooks_left(vae)


def test_head_for_another_architecture_is_refused(vae_decode, vae):
    wrong = LoadedHead(MattingHead(HeadConfig()), "sdxl", path="sdxl_head.safetensors")  # 128-channel decoder
    with pytest.raises(ValueError, match=r"last features have 32 channels, the matting head expects 128 "
                                         r"\(SDXL KL-f8 VAE\)"):
        vae_decode.decode(vae, torch.zeros(1, 4, 4, 4), wrong)
    with pytest.raises(ValueError, match="latent has 16 channels"):
        vae_decode.decode(vae, torch.zeros(1, 16, 4, 4), LoadedHead(MattingHead(SMALL), "sd1"))


def test_greenpost_paths(matting, vae_decode, vae, head):
    """With a head and refine: GreenPost keys core's colour with the head's alpha as its prior. Without a head:
    GreenPost keys core's decode (tiled: core's tiled decode). Values, not only shapes."""
    from diffumatting.models.greenpost import GreenPostOptions, greenpost

    latent = _smooth_latent(2, 8, 8, seed=5)
    rgb, head_alpha = vae_decode.decode(vae, latent, head)
    image, alpha, rgba, tmask = matting.MattingVAEDecode.execute({"samples": latent}, vae, head).result
    fg, expect = greenpost(rgb, prior_alpha_bhw=head_alpha, options=GreenPostOptions())
    assert torch.equal(image, rgb) and torch.allclose(alpha, expect, atol=1e-6)
    assert torch.allclose(rgba[..., :3], fg.clamp(0, 1), atol=1e-6) and torch.equal(rgba[..., 3], alpha)
    assert torch.equal(tmask, 1 - alpha)
    unrefined = greenpost(rgb, options=GreenPostOptions())[1]
    assert not torch.allclose(alpha, unrefined, atol=1e-3), "the head's alpha must steer GreenPost"

    image2, alpha2, rgba2, _ = matting.MattingVAEDecode.execute({"samples": latent}, vae, None).result
    with torch.no_grad():
        core = vae.decode(latent).float()
    fg2, expect2 = greenpost(core, options=GreenPostOptions())
    assert torch.equal(image2, core) and torch.allclose(alpha2, expect2, atol=1e-6)
    assert torch.allclose(rgba2[..., :3], fg2.clamp(0, 1), atol=1e-6)

    image3, alpha3, _, _ = matting.MattingVAEDecode.execute({"samples": latent}, vae, None, tiling="always",
                                                           tile_size=64, tile_overlap=32).result
    with torch.no_grad():
        core_t = vae.decode_tiled(latent, **vae_decode.core_tile_args(vae, 64, 32)).float()
    assert torch.equal(image3, core_t)
    assert torch.allclose(alpha3, greenpost(core_t, options=GreenPostOptions())[1], atol=1e-6)


# --- loader -------------------------------------------------------------------------------------------------
@pytest.fixture()
def head_folder(matting, tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "diffumatting"
    (folder / "sub").mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffumatting", ([str(folder)], set()))
    save_head(folder / "a.safetensors", MattingHead(SMALL).reset_parameters(1), "sd1")
    save_head(folder / "sub" / "b.safetensors", MattingHead(SMALL), "sdxl")
    (folder / "old.pt").write_bytes(b"\x80\x02junk")
    (tmp_path / "outside.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    return folder


def test_loader_lists_and_loads(matting, head_folder):
    assert matting.head_files() == ["a.safetensors", "sub/b.safetensors"]
    combo = matting.HeadLoader.define_schema().inputs[0]
    assert combo.options == ["a.safetensors", "sub/b.safetensors"]
    loaded = matting.HeadLoader.execute("a.safetensors", "as in file").result[0]
    assert isinstance(loaded, LoadedHead) and loaded.vae_family == "sd1" and loaded.config == SMALL
    assert matting.HeadLoader.execute("sub/b.safetensors", "sdxl").result[0].vae_family == "sdxl"
    with pytest.raises(ValueError, match=r"\('sdxl'\) but is used with the SD1.x/SD2 KL-f8 VAE \('sd1'\)"):
        matting.HeadLoader.execute("sub/b.safetensors", "sd1")


@pytest.mark.parametrize("name,message", [
    ("../outside.safetensors", "outside models/diffumatting"),
    ("/etc/passwd.safetensors", "outside models/diffumatting"),
    ("old.pt", "pickle"),
    ("missing.safetensors", "not found"),
    ("notes.txt", "not a .safetensors file"),
    ("", "no matting head file chosen"),
])
def test_loader_refuses_bad_names(matting, head_folder, name, message):
    result = matting.HeadLoader.validate_inputs(head_name=name)
    assert isinstance(result, str) and message in result
    with pytest.raises(ValueError, match=message):
        matting.resolve_head_path(name)


def test_loader_follows_a_link_the_user_placed_as_core_does(matting, head_folder):
    """A name cannot leave the folder; a link the user put in the folder is followed, as folder_paths does."""
    (head_folder / "link.safetensors").symlink_to(head_folder.parent / "outside.safetensors")
    assert matting.resolve_head_path("link.safetensors") == str(head_folder / "link.safetensors")
    assert "link.safetensors" in matting.head_files()


def test_schema_documents_every_socket(matting):
    for node in matting.NODES:
        s = node.define_schema()
        assert s.node_id.startswith("DiffuMatting") and s.category == "DiffuMatting/matting" and s.description
        for item in [*s.inputs, *s.outputs]:
            assert item.tooltip, (s.node_id, item.id)
    decode = matting.MattingVAEDecode.define_schema()
    head_input = [i for i in decode.inputs if i.id == "head"][0]
    assert head_input.optional and "GreenPost" in head_input.tooltip
    assert [o.id for o in decode.outputs] == ["image", "alpha", "rgba", "transparency_mask"]


# --- workflow in the real server -------------------------------------------------------------------------
@pytest.mark.server
def test_txt2img_matting_workflow_alpha_is_the_nodes(comfy_server, server_models, comfy_host):
    """The shipped workflow in the real server, plus a SaveLatent of the sampler's output: the RGBA PNG it writes
    is exactly what DiffuMatting VAE Decode gives in-process for that latent, with the same tiny checkpoint VAE
    and head file (GreenPost refinement on, as the workflow has it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import comfy.sd
    from diffumatting.models.matting_head import load_head
    from diffumatting.nodes import matting
    from PIL import Image
    from fixtures_host import shrink_for_tiny

    assert server_models["matting_head"] == TINY_HEAD_NAME
    workflow = shrink_for_tiny(json.loads((ROOT / "workflows" / "transparent_sd15_diffumatting.json").read_text()))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    decode = next(n for n in workflow["nodes"] if n["type"] == "DiffuMattingVAEDecode")
    link_id = max(link[0] for link in workflow["links"]) + 1
    node_id = max(n["id"] for n in workflow["nodes"]) + 1
    workflow["links"].append([link_id, sampler["id"], 0, node_id, 0, "LATENT"])
    workflow["nodes"].append({"id": node_id, "type": "SaveLatent", "mode": 0,
                              "inputs": [{"name": "samples", "type": "LATENT", "link": link_id}],
                              "widgets_values": ["tests/txt2img_latent"]})
    entry = comfy_server.run_workflow(workflow, timeout=600)
    pngs = [f for f in comfy_server.output_files(entry) if Image.open(f).mode == "RGBA"]
    latents = comfy_server.output_files(entry, key="latents")
    assert len(pngs) == 1 and len(latents) == 1, (pngs, latents)
    saved = np.asarray(Image.open(pngs[0])).astype(np.float32) / 255.0
    assert saved.shape == (64, 64, 4)

    latent = load_file(str(latents[0]))["latent_tensor"].float()
    ckpt = comfy_server.base / "models" / "checkpoints" / server_models["generation"]["checkpoint"]
    with safe_open(str(ckpt), "pt") as f:
        vae_sd = {k[len("first_stage_model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("first_stage_model.")}
    vae = comfy.sd.VAE(sd=vae_sd)
    head = load_head(comfy_server.base / "models" / "diffumatting" / TINY_HEAD_NAME)
    refine, tiling, tile_size, overlap = decode["widgets_values"][:4]
    _, alpha, rgba, _ = matting.MattingVAEDecode.execute({"samples": latent}, vae, head, refine, tiling, tile_size,
                                                          overlap).result
    want = np.floor(rgba[0].numpy() * 255 + 0.5) / 255.0
    assert np.abs(saved - want).max() <= 1.5 / 255, float(np.abs(saved - want).max())
    assert float(alpha.std()) > 0.01, "the random head gives a varying alpha, not a constant"
