"""LoRA stack on the tiny SD1.5 checkpoint: equals core's LoraLoader, rows off change nothing, errors, protection."""
from __future__ import annotations

import pytest
import torch

from support.precision import relative_tol, weight_atol

LORAS = ("style_a.safetensors", "style_b.safetensors")


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(comfy_host, tmp_path_factory, one_thread):
    import comfy.sd
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint, write_random_lora

    folder = tmp_path_factory.getbasetemp() / "tiny_models"
    path = cached_tiny_sd15_checkpoint(folder)
    loras = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(LORAS):
        write_random_lora(loras / name, seed=21 + i)
    (loras / "broken.safetensors").write_bytes(b"\x07" * 64)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    # Core never loads an SD1.x CLIP's text_projection (SD1.5 files have none; SD15.process_clip_state_dict
    # files a `transformer.text_projection` key under text_model, where no weight reads it). The weight keeps
    # the memory it was allocated on, NaN included when earlier code in the process left NaN there. Fill it
    # with NaN, so every run meets that case rather than only runs after other modules.
    with torch.no_grad():
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.fill_(float("nan"))
    return {"model": model, "clip": clip, "vae": vae, "loras": loras}


@pytest.fixture
def lora_folder(tiny, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tiny["loras"])], {".safetensors"}))
    return tiny["loras"]


def _weights(patcher) -> dict:
    """Weights the patcher runs with, loaded through core's model management (as a sampler would)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _unet_dtype(patcher) -> torch.dtype:
    """The dtype ComfyUI keeps the UNet's weights in (float32 on the CPU; fp16/bf16 on most GPUs)."""
    return patcher.model.state_dict()["diffusion_model.input_blocks.0.0.weight"].dtype


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bits. Bits, not torch.equal: NaN is never equal to itself, and the CLIP's
    unloaded text_projection may hold NaN (see `tiny`)."""
    return (x.dtype == y.dtype and x.shape == y.shape
            and torch.equal(x.detach().reshape(-1).view(torch.uint8), y.detach().reshape(-1).view(torch.uint8)))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)


def _run(model, clip, **kw):
    from diffumatting.nodes.lora import LoraStack

    args = dict(lora_stack=None, model_only=False, green_protection=0.0)
    args.update(kw)
    return LoraStack.execute(model, clip, **args).result


def test_two_rows_equal_core_lora_loader_twice(tiny, lora_folder):
    import nodes as core_nodes

    model, clip = tiny["model"], tiny["clip"]
    m, c, stack = _run(model, clip, lora_1=LORAS[0], model_strength_1=0.8, clip_strength_1=0.6,
                       lora_2=LORAS[1], model_strength_2=-0.5, clip_strength_2=1.2)
    assert stack == [(LORAS[0], 0.8, 0.6), (LORAS[1], -0.5, 1.2)]
    loader = core_nodes.LoraLoader()
    rm, rc = loader.load_lora(model, clip, LORAS[0], 0.8, 0.6)
    rm, rc = loader.load_lora(rm, rc, LORAS[1], -0.5, 1.2)
    mine, ref, base = _weights(m), _weights(rm), _weights(model)
    assert _same(mine, ref), "the stack must give core's LoraLoader-twice model weights"
    assert not _same(mine, base), "the LoRAs must change the model"
    assert _same(_weights(c.patcher), _weights(rc.patcher)), "and the same CLIP weights"
    assert _same(_weights(model), base), "the input model must stay untouched"


def test_rows_off_or_zero_change_nothing(tiny, lora_folder):
    model, clip = tiny["model"], tiny["clip"]
    base_m, base_c = _weights(model), _weights(clip.patcher)
    m, c, stack = _run(model, clip, lora_1=LORAS[0], on_1=False, lora_2=LORAS[1], model_strength_2=0.0,
                       clip_strength_2=0.0, lora_3="None")
    assert stack == []
    assert _same(_weights(m), base_m) and _same(_weights(c.patcher), base_c)
    # Model strength 0 with a clip strength: the model is untouched, the CLIP changes.
    m, c, _ = _run(model, clip, lora_1=LORAS[0], model_strength_1=0.0, clip_strength_1=1.0)
    assert m is model and not m.patches
    assert not _same(_weights(c.patcher), base_c)


def test_stack_input_model_only_and_chaining(tiny, lora_folder):
    import comfy.sd
    import comfy.utils

    model, clip = tiny["model"], tiny["clip"]
    m, c, stack = _run(model, clip, lora_stack=[(LORAS[0], 0.7, 0.3)], model_only=True,
                       lora_1=LORAS[1], model_strength_1=0.4)
    assert stack == [(LORAS[0], 0.7, 0.3), (LORAS[1], 0.4, 1.0)]
    assert c is clip, "model-only mode passes the CLIP through"
    ref = model
    for name, ms in ((LORAS[0], 0.7), (LORAS[1], 0.4)):
        lora = comfy.utils.load_torch_file(str(lora_folder / name), safe_load=True)
        ref, _ = comfy.sd.load_lora_for_models(ref, None, lora, ms, 0)
    assert _same(_weights(m), _weights(ref))
    # No CLIP connected: model only, clip output None.
    m2, c2, _ = _run(model, None, lora_1=LORAS[0])
    assert c2 is None and m2.patches


def test_missing_unreadable_and_pickle_loras_name_the_file(tiny, lora_folder):
    model, clip = tiny["model"], tiny["clip"]
    with pytest.raises(ValueError, match="'gone.safetensors' not found"):
        _run(model, clip, lora_stack=[("gone.safetensors", 1.0, 1.0)])
    with pytest.raises(ValueError, match="'broken.safetensors' cannot be read"):
        _run(model, clip, lora_1="broken.safetensors")
    with pytest.raises(ValueError, match="'old.ckpt' is a pickle file"):
        _run(model, clip, lora_stack=[("old.ckpt", 1.0, 1.0)])
    with pytest.raises(ValueError, match="outside models/loras"):
        _run(model, clip, lora_stack=[("../x.safetensors", 1.0, 1.0)])
    with pytest.raises(ValueError, match="expected \\(name, model_strength, clip_strength\\)"):
        _run(model, clip, lora_stack=[("a", 1.0)])


def test_green_protection_scales_only_cross_attention(tiny, lora_folder):
    model, clip = tiny["model"], tiny["clip"]
    base = _weights(model)
    full = _weights(_run(model, clip, lora_1=LORAS[0])[0])
    half = _weights(_run(model, clip, green_protection=0.5, lora_1=LORAS[0])[0])
    off = _weights(_run(model, clip, green_protection=1.0, lora_1=LORAS[0])[0])
    cross = [k for k in base if k.startswith("diffusion_model.") and ".attn2." in k and k.endswith("weight")]
    other = [k for k in base if k.startswith("diffusion_model.") and ".attn2." not in k]
    assert cross and all(_equal(off[k], base[k]) for k in cross), "protection 1 removes attn2 deltas"
    assert all(_equal(off[k], full[k]) and _equal(half[k], full[k]) for k in other)
    changed = [k for k in cross if not _equal(full[k], base[k])]
    assert changed
    for k in changed:
        assert torch.allclose(half[k] - base[k], 0.5 * (full[k] - base[k]), atol=weight_atol(full[k], 1e-5))


def test_row_opt_out_is_never_damped(tiny, lora_folder):
    model, clip = tiny["model"], tiny["clip"]
    full = _weights(_run(model, clip, lora_1=LORAS[0], lora_2=LORAS[1])[0])
    opted = _weights(_run(model, clip, green_protection=1.0, lora_1=LORAS[0], protect_1=False,
                          lora_2=LORAS[1])[0])
    only_b_full = _weights(_run(model, clip, lora_1=LORAS[1])[0])
    only_b_protected = _weights(_run(model, clip, green_protection=1.0, lora_1=LORAS[1])[0])
    cross = [k for k in full if ".attn2." in k and k.endswith("weight")]
    base = _weights(model)
    # Row 1 (opted out) keeps its whole attn2 delta; row 2's attn2 delta is removed.
    for k in cross:
        expect = full[k] - (only_b_full[k] - base[k]) + (only_b_protected[k] - base[k])
        assert torch.allclose(opted[k], expect, atol=weight_atol(opted[k], 1e-4)), k
    assert any(not _equal(opted[k], base[k]) for k in cross)


def test_green_protection_keeps_backing_closer_to_key(tiny, lora_folder):
    """Measured on the tiny model with the green canvas on: the background's distance to the key colour
    latent, averaged over seeds and both LoRAs, is smaller with protection than without."""
    from green_measure import background_distance, sample_latent
    from diffumatting.nodes import generate

    model, clip, vae = tiny["model"], tiny["clip"], tiny["vae"]
    canvas = generate.green_canvas_model(model, vae, "#00b140", 0.8, 0.35, G_REGION, "fixed ellipse")
    key = generate.key_colour_latent(vae, model, (0.0, 0xb1 / 255, 0x40 / 255))
    dist = {0.0: [], 1.0: []}
    for seed in range(3):
        for name in LORAS:
            for p in dist:
                styled, styled_clip = _run(canvas, clip, green_protection=p, lora_1=name)[:2]
                dist[p].append(background_distance(sample_latent(styled, styled_clip, seed), key, G_REGION)[0])
    mean = {p: sum(v) / len(v) for p, v in dist.items()}
    assert mean[1.0] < 0.97 * mean[0.0], mean


G_REGION = dict(center_x=0.5, center_y=0.5, width=0.6, height=0.7, feather=0.15)


KV_MODE = "green token k/v"


def _kv_records(model, clip, seed=0):
    from green_measure import encode_green, record_step, recorded_positions

    cond = encode_green(clip, "a blue teapot with a chipped spout")
    positions = recorded_positions(cond)
    return record_step(model, cond, positions, seed, torch.zeros(1, 4, 8, 8)), positions


def test_green_kv_mode_removes_the_change_on_green_only(tiny, lora_folder):
    """With each stack's CLIP output used for the prompt (the text-encoder half applied): the green token's
    keys and values are the base model's, every other token's are the LoRA's, and the weights are the
    LoRA's (it is applied whole)."""
    from green_measure import kv_change

    model, clip = tiny["model"], tiny["clip"]
    lora_m, lora_c, _ = _run(model, clip, lora_1=LORAS[0])
    prot_m, prot_c, _ = _run(model, clip, green_protection=1.0, protection_mode=KV_MODE, lora_1=LORAS[0])
    assert _same(_weights(prot_m), _weights(lora_m)), "the LoRA's weights are applied whole"
    base, positions = _kv_records(model, clip)
    lora, _ = _kv_records(lora_m, lora_c)
    prot, _ = _kv_records(prot_m, prot_c)
    assert positions and len(base) >= 3
    green, others = kv_change(base, lora, prot, positions)
    tol = relative_tol(_unet_dtype(model), 1e-4)
    assert green < tol, f"{green:.2e} of the LoRA's key/value change on the green token is left"
    assert others == 0.0, f"the other tokens' keys/values moved by {others:.2e} of the LoRA's change"
    # Half the protection, UNet half only (clip strength 0): exactly half of the change is left.
    half_m, half_c, _ = _run(model, clip, green_protection=0.5, protection_mode=KV_MODE, lora_1=LORAS[0],
                             clip_strength_1=0.0)
    lora_u, lora_uc, _ = _run(model, clip, lora_1=LORAS[0], clip_strength_1=0.0)
    green, others = kv_change(base, _kv_records(lora_u, lora_uc)[0], _kv_records(half_m, half_c)[0], positions)
    assert abs(green - 0.5) < max(1e-3, tol) and others == 0.0, (green, others)


def test_green_kv_mode_needs_green_prompt_and_respects_opt_out(tiny, lora_folder):
    import comfy.sample

    model, clip = tiny["model"], tiny["clip"]
    prot_m, prot_c, _ = _run(model, clip, green_protection=1.0, protection_mode=KV_MODE, lora_1=LORAS[0])
    plain = prot_c.encode_from_tokens_scheduled(prot_c.tokenize("a red apple on a green screen"))
    lat = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="encode the positive prompt with Green Canvas Prompt"):
        comfy.sample.sample(prot_m, comfy.sample.prepare_noise(lat, 0), 1, 5.0, "euler", "normal", plain, plain,
                            lat, disable_pbar=True)
    # An opted-out row is applied as core does: no attention replacement, no CLIP attached.
    out_m, out_c, _ = _run(model, clip, green_protection=1.0, protection_mode=KV_MODE, lora_1=LORAS[0],
                           protect_1=False)
    assert not out_m.model_options.get("transformer_options", {}).get("patches_replace")
    assert out_c.patcher.get_attachment("diffumatting_green_clip") is None
    # A second stack on this CLIP in the same mode must use the same amount.
    with pytest.raises(ValueError, match="need the same green_protection"):
        _run(prot_m, prot_c, green_protection=0.5, protection_mode=KV_MODE, lora_1=LORAS[1])
    with pytest.raises(ValueError, match="protection_mode='sideways' is not one of"):
        _run(model, clip, green_protection=1.0, protection_mode="sideways", lora_1=LORAS[0])


def test_green_kv_mode_chained_stacks_protect_both(tiny, lora_folder):
    """Two stacks in a row, each with one LoRA: the second keeps the first's protection (model and CLIP)."""
    from green_measure import kv_change

    model, clip = tiny["model"], tiny["clip"]
    m1, c1, _ = _run(model, clip, green_protection=1.0, protection_mode=KV_MODE, lora_1=LORAS[0])
    m2, c2, _ = _run(m1, c1, green_protection=1.0, protection_mode=KV_MODE, lora_1=LORAS[1])
    both_m, both_c, _ = _run(model, clip, lora_1=LORAS[0], lora_2=LORAS[1])
    base, positions = _kv_records(model, clip)
    green, others = kv_change(base, _kv_records(both_m, both_c)[0], _kv_records(m2, c2)[0], positions)
    assert green < relative_tol(_unet_dtype(model), 1e-4) and others == 0.0, (green, others)
