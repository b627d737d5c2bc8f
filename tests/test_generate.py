"""DiffuMatting UNet loader (strength, layouts, refusals) and the green prompt, on the tiny SD1.5 checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from diffumatting.models.prompting import DEFAULT_GREEN_PHRASE, add_green_phrase, green_token_positions, word_positions
from diffumatting.models.unet_layout import Layout, check_compatible, detect_architecture, detect_layout
from support.precision import weight_atol
from support.unet_blend import blend


# --- pure helpers --------------------------------------------------------------------------------------
def test_add_green_phrase():
    assert add_green_phrase("a cat", "on green") == "a cat, on green"
    assert add_green_phrase("a cat, ", "on green") == "a cat, on green"
    assert add_green_phrase("a cat ON GREEN now", "on green") == "a cat ON GREEN now"
    assert add_green_phrase("", "on green") == "on green"
    assert add_green_phrase("a cat", "") == "a cat"
    assert "green" in DEFAULT_GREEN_PHRASE


def test_green_token_positions_tokenizer_agnostic():
    ids = [0, 5, 7, 8, 5, 9, 7, 8, 1]
    assert green_token_positions(ids, [7, 8]) == [2, 3, 6, 7]
    assert green_token_positions(ids, [9]) == [5]
    assert green_token_positions(ids, [4]) == []
    with pytest.raises(ValueError, match="green_ids is empty"):
        green_token_positions(ids, [])
    assert word_positions("a cat on a flat Green, screen".split()) == [5]


def test_detect_layout_and_architecture():
    ldm = {"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
           "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    assert detect_layout(ldm) == (Layout.LDM, "")
    assert detect_layout({"diffusion_model." + k: v for k, v in ldm.items()}) == (Layout.COMFY, "diffusion_model.")
    assert detect_layout({"model.diffusion_model." + k: v for k, v in ldm.items()})[0] is Layout.CHECKPOINT
    assert detect_layout({"unet.conv_in.weight": 0, "unet.down_blocks.0.x": 0}) == (Layout.DIFFUSERS, "unet.")
    with pytest.raises(ValueError, match="not a UNet file"):
        detect_layout({"decoder.conv_in.weight": 0})
    assert detect_architecture(ldm) == "SD1.x"
    sdxl = {"input_blocks.0.0.weight": (320, 4, 3, 3), "label_emb.0.0.weight": (1280, 2816),
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}
    assert detect_architecture(sdxl) == "SDXL"
    with pytest.raises(ValueError, match=r"SDXL UNet but the MODEL is SD1\.x"):
        check_compatible(sdxl, ldm)


def test_blend_endpoints_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.equal(blend(a, b, 0.0), a)
    assert torch.equal(blend(a, b, 1.0), b)
    assert torch.allclose(blend(a, b, 0.25), 0.75 * a + 0.25 * b, atol=1e-6)
    with pytest.raises(ValueError, match="outside 0..1"):
        blend(a, b, 1.5)


# --- on the tiny checkpoint -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: more threads contend and run far slower
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(comfy_host, tmp_path_factory, one_thread):
    import comfy.sd
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    path = cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    return {"path": path, "model": model, "clip": clip, "vae": vae}


@pytest.fixture(scope="module")
def finetune(comfy_host):
    from support.tiny_sd15 import tiny_unet_finetune

    return tiny_unet_finetune(seed=5)


def _sample(model, clip, steps=2, seed=0):
    import comfy.sample

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red apple"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", cond, neg, lat, disable_pbar=True)


def _unet_weights(mp) -> dict:
    """The UNet weights the patcher runs with: loaded (patched) by core's model management, as a sampler does."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([mp])
    return {k: v.detach().clone() for k, v in mp.model.state_dict().items() if k.startswith("diffusion_model.")}


def test_strength_endpoints_and_base_untouched(tiny, finetune, tmp_path):
    import comfy.sd
    from diffumatting.nodes import generate
    from diffumatting.training.tiny_checkpoint import save_safetensors_atomic, tiny_sd15_state_dict

    base = tiny["model"]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    base_out = _sample(base, tiny["clip"])

    at0 = generate.apply_unet(base, finetune, 0.0)
    assert at0 is not base and not at0.patches
    assert torch.equal(_sample(at0, tiny["clip"]), base_out)

    # Reference: a checkpoint with the fine-tuned UNet baked in, loaded by core.
    sd = tiny_sd15_state_dict(0)
    sd.update({"model.diffusion_model." + k: v for k, v in finetune.items()})
    ref_path = save_safetensors_atomic(sd, tmp_path / "ref.safetensors")
    ref = comfy.sd.load_checkpoint_guess_config(str(ref_path), output_vae=False, output_clip=False)[0]
    at1 = generate.apply_unet(base, finetune, 1.0)
    # Strength 1 replaces the weights ("set"): no full-size difference to recompute per layer and step.
    kinds = {k: [p[1][0] if len(p[1]) == 2 else "diff" for p in v] for k, v in at1.patches.items()}
    assert len(kinds) == len(finetune) and all(v == ["set"] for v in kinds.values()), set(map(tuple, kinds.values()))
    half_model = generate.apply_unet(base, finetune, 0.5)
    half_kinds = {p[1][0] if len(p[1]) == 2 else "diff" for v in half_model.patches.values() for p in v}
    assert half_kinds == {"diff"}, "below 1 the weights blend"
    assert torch.equal(_sample(at1, tiny["clip"]), _sample(ref, tiny["clip"]))
    assert not torch.equal(_sample(at1, tiny["clip"]), base_out), "the fine-tuned UNet must change the output"

    half = _unet_weights(generate.apply_unet(base, finetune, 0.5))
    for k in ("input_blocks.0.0.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight"):
        got = half["diffusion_model." + k].cpu()
        expect = blend(before["diffusion_model." + k].cpu(), finetune[k].float(), 0.5)
        assert torch.allclose(got, expect, atol=weight_atol(got, 1e-6))

    # Clones share the torch module; what matters is what the base patcher runs with once loaded.
    assert not base.patches, "the base patcher must not get patches"
    after = _unet_weights(base)
    assert all(torch.equal(after[k].cpu(), before[k].cpu()) for k in after), "the base weights must stay as loaded"
    assert torch.equal(_sample(base, tiny["clip"]), base_out)
    with pytest.raises(ValueError, match="outside 0..1"):
        generate.apply_unet(base, finetune, 1.2)


def _layout_files(finetune, folder, unet_config):
    import comfy.utils
    from diffumatting.training.tiny_checkpoint import save_safetensors_atomic, tiny_sd15_state_dict

    files = {
        "ldm": {k: v for k, v in finetune.items()},
        "comfy": {"diffusion_model." + k: v for k, v in finetune.items()},
    }
    ckpt = {k: v for k, v in tiny_sd15_state_dict(3).items() if not k.startswith("model.diffusion_model.")}
    ckpt.update({"model.diffusion_model." + k: v for k, v in finetune.items()})
    files["checkpoint"] = ckpt
    dmap = comfy.utils.unet_to_diffusers(unet_config)
    diffusers = {d: finetune[l] for d, l in dmap.items() if l in finetune}
    assert len(diffusers) == len(finetune), "the diffusers map must cover the tiny UNet"
    files["diffusers"] = diffusers
    files["diffusers_unet_prefix"] = {"unet." + k: v for k, v in diffusers.items()}
    return {name: save_safetensors_atomic(sd, folder / f"{name}.safetensors") for name, sd in files.items()}


def test_every_layout_loads_identical_weights(tiny, finetune, tmp_path):
    from diffumatting.nodes import generate

    model = tiny["model"]
    paths = _layout_files(finetune, tmp_path, model.model.model_config.unet_config)
    expected_layouts = {"ldm": Layout.LDM, "comfy": Layout.COMFY, "checkpoint": Layout.CHECKPOINT,
                        "diffusers": Layout.DIFFUSERS, "diffusers_unet_prefix": Layout.DIFFUSERS}
    for name, path in paths.items():
        weights, layout, arch = generate.load_unet_weights(str(path), model)
        assert layout is expected_layouts[name] and arch == "SD1.x"
        assert weights.keys() == finetune.keys(), name
        assert all(torch.equal(weights[k], finetune[k]) for k in finetune), f"{name} loads other weights"


def test_loader_node_refuses_pickle_foreign_and_other_architecture(tiny, finetune, tmp_path, monkeypatch):
    import folder_paths
    from diffumatting.nodes import generate
    from diffumatting.training.tiny_checkpoint import save_safetensors_atomic

    folder = tmp_path / "diffumatting"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffumatting", ([str(folder)], set()))
    save_safetensors_atomic({"diffusion_model." + k: v for k, v in finetune.items()}, folder / "dm.safetensors")
    (folder / "evil.ckpt").write_bytes(b"not loaded")
    sdxl = {"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), "label_emb.0.0.weight": torch.zeros(1280, 2816),
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048)}
    save_safetensors_atomic(sdxl, folder / "xl.safetensors")
    save_safetensors_atomic({"decoder.conv_in.weight": torch.zeros(4, 4)}, folder / "vae.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 20)

    assert "dm.safetensors" in generate.unet_files() and "evil.ckpt" not in generate.unet_files()
    out = generate.UNetLoader.execute(tiny["model"], "dm.safetensors", 1.0).result[0]
    assert out is not tiny["model"] and out.patches
    assert "pickle" in generate.UNetLoader.validate_inputs(unet_name="evil.ckpt")
    with pytest.raises(ValueError, match="pickle"):
        generate.UNetLoader.execute(tiny["model"], "evil.ckpt", 1.0)
    with pytest.raises(ValueError, match=r"SDXL UNet but the MODEL is SD1\.x"):
        generate.UNetLoader.execute(tiny["model"], "xl.safetensors", 1.0)
    with pytest.raises(ValueError, match="not a UNet file"):
        generate.UNetLoader.execute(tiny["model"], "vae.safetensors", 1.0)
    with pytest.raises(ValueError, match="cannot read UNet file 'broken.safetensors'"):
        generate.UNetLoader.execute(tiny["model"], "broken.safetensors", 1.0)
    for bad in ("../dm.safetensors", "/etc/x.safetensors", "missing.safetensors"):
        assert generate.UNetLoader.validate_inputs(unet_name=bad) is not True
    # A truncated UNet (a layer with the wrong shape) names the key.
    wrong = {k: v for k, v in finetune.items()}
    wrong["out.2.weight"] = torch.zeros(4, 320, 1, 1)
    save_safetensors_atomic(wrong, folder / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"out\.2\.weight"):
        generate.UNetLoader.execute(tiny["model"], "wrong.safetensors", 1.0)


def test_green_prompt_encodes_the_full_text_and_marks_green_tokens(tiny):
    from diffumatting.nodes import generate

    clip = tiny["clip"]
    cond, text = generate.GreenPrompt.execute(clip, "a red apple", DEFAULT_GREEN_PHRASE).result
    assert text == "a red apple, " + DEFAULT_GREEN_PHRASE
    plain = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    assert torch.equal(cond[0][0], plain[0][0]), "the conditioning itself is core's encode of the full text"
    _, text2 = generate.GreenPrompt.execute(clip, "an apple", "").result
    assert text2 == "an apple"
    # The helper the green-token protection uses: positions of "green" per text encoder.
    positions = generate.green_tokens(clip, clip.tokenize(text))
    ids = [t[0] for t in clip.tokenize(text)["l"][0]]
    green_id = [t for t in (x[0] for x in clip.tokenize("green")["l"][0]) if t not in
                {x[0] for x in clip.tokenize("")["l"][0]}]
    assert positions["l"] and all(ids[p] in green_id for p in positions["l"])
    assert generate.green_tokens(clip, clip.tokenize("an apple")) == {"l": []}
    # Recorded in the conditioning for the LoRA stack's green token k/v protection.
    assert cond[0][1]["diffumatting_green_tokens"] == positions


def test_schemas_validate_in_the_host(comfy_host):
    """ComfyUI's own schema validation (unique ids, tooltips) for this module's nodes."""
    from diffumatting.nodes import generate, lora

    for cls in (*generate.NODES, *lora.NODES):
        info = cls.GET_NODE_INFO_V1()
        assert info["category"].startswith("DiffuMatting/") and info["description"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert all(info["output_tooltips"]), cls.__name__
