"""Bad input to the nodes, in-process on the real ComfyUI modules (issue 13): save names, NaN alpha, the one
model-file resolver, NaN weights and LoRAs that match nothing. Queue-time checks are in _server.py."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.export_output import export_nodes_in


@pytest.fixture()
def export(comfy_host, tmp_path, monkeypatch):
    """(nodes.export, output folder) with ComfyUI's output directory in tmp_path."""
    return export_nodes_in(tmp_path, monkeypatch)


# --- filename_prefix -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,message", [
    ("bad\0name", "NUL byte"),
    ("x" * 300, "300 bytes long.*shorten it"),
    ("ok/" + "é" * 130 + "/x", "260 bytes long"),
])
def test_prefix_long_or_nul_is_a_clear_error(export, prefix, message):
    nodes, out = export
    msg = nodes.SaveRGBA.validate_inputs(filename_prefix=prefix)
    assert isinstance(msg, str) and "filename_prefix" in msg
    with pytest.raises(ValueError, match=message):
        nodes.SaveRGBA.execute(torch.rand(1, 2, 2, 3), filename_prefix=prefix)
    assert list(out.iterdir()) == []


def test_longest_allowed_prefix_saves(export):
    nodes, out = export
    name = "y" * (nodes.NAME_MAX - nodes.NAME_RESERVE)
    assert nodes.SaveRGBA.validate_inputs(filename_prefix=name) is True
    nodes.SaveRGBA.execute(torch.rand(1, 2, 2, 3), filename_prefix=name, save_matte=True)
    assert sorted(p.name for p in out.iterdir()) == [f"{name}_00001_.png", f"{name}_00001__matte.png"]


def test_batch_num_never_overwrites_an_earlier_run(export):
    nodes, out = export
    first = torch.rand(2, 3, 3, 3)
    nodes.SaveRGBA.execute(first, filename_prefix="runs/img_%batch_num%")
    before = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    assert sorted(before) == ["img_0_00001_.png", "img_1_00002_.png"]
    nodes.SaveRGBA.execute(torch.rand(2, 3, 3, 3), filename_prefix="runs/img_%batch_num%")
    after = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    assert len(after) == 4, sorted(after)
    assert all(after[name] == data for name, data in before.items()), "an earlier run's file was overwritten"


def test_date_token_is_filled_in(export):
    nodes, out = export
    res = nodes.SaveRGBA.execute(torch.rand(1, 2, 2, 3), filename_prefix="%date:yyyy-MM-dd%/shot")
    today = time.strftime("%Y-%m-%d")
    assert (out / today / "shot_00001_.png").is_file(), sorted(p.name for p in out.rglob("*"))
    assert res.ui.as_dict()["images"][0]["subfolder"] == today


def test_date_format_follows_the_frontend(export):
    nodes, _ = export
    t = time.struct_time((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    assert nodes.format_date("yyyy-MM-dd hh:mm:ss", t) == "2026-03-04 05:06:07"
    assert nodes.format_date("yy/M/d h.m.s", t) == "26/3/4 5.6.7"
    assert nodes.expand_filename_tokens("a/%date:yyyyMMdd%_%batch_num%", t) == "a/20260304_%batch_num%"


# --- NaN / Inf alpha -------------------------------------------------------------------------------------
def _nan_mask(shape=(1, 4, 4)):
    m = torch.rand(shape)
    m[0, 1, 1] = float("nan")
    m[0, 2, 2] = float("inf")
    return m


@pytest.mark.parametrize("where", ["alpha", "transparency_mask", "rgba"])
def test_save_refuses_nan_alpha(export, where):
    nodes, out = export
    image, kw = torch.rand(1, 4, 4, 3), {}
    if where == "rgba":
        image = torch.cat([image, _nan_mask()[..., None]], dim=-1)
    else:
        kw[where] = _nan_mask()
    with pytest.raises(ValueError, match=r"has 2 NaN or infinite value\(s\) out of"):
        nodes.SaveRGBA.execute(image, filename_prefix="nan", **kw)
    assert list(out.iterdir()) == []


def test_preview_refuses_nan_instead_of_passing_it_on(export):
    nodes, _ = export
    with pytest.raises(ValueError, match="alpha has 2 NaN"):
        nodes.PreviewRGBA.execute(torch.rand(1, 4, 4, 3), alpha=_nan_mask())
    image = torch.rand(1, 4, 4, 3)
    image[0, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="--fp32-vae"):
        nodes.PreviewRGBA.execute(image)


# --- one model-file resolver (issue 12) -----------------------------------------------------------------
@pytest.fixture()
def model_folders(comfy_host, tmp_path, monkeypatch):
    import folder_paths

    folders = {}
    for name in ("loras", "diffumatting", "diffusion_models"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(folders[name])], set()))
    return folders


BAD_NAMES = [
    ("C:/Windows/x.safetensors", "points outside"),
    ("C:x.safetensors", "points outside"),
    ("sub/../../x.safetensors", "points outside"),
    ("/abs/x.safetensors", "points outside"),
    ("x\0.safetensors", "NUL byte"),
    ("evil.PTH", "pickle file"),
    ("", "no .* file chosen"),
]


@pytest.mark.parametrize("name,message", BAD_NAMES)
def test_every_loader_refuses_the_same_names(model_folders, name, message):
    from diffumatting.nodes import generate, lora, matting

    for resolve in (lora.resolve_lora, matting.resolve_head_path,
                    lambda n: generate.resolve_model_file(n, generate.UNET_FOLDERS, "UNet")):
        with pytest.raises(ValueError, match=message):
            resolve(name)
    for validator, arg in ((matting.HeadLoader, "head_name"), (generate.UNetLoader, "unet_name")):
        result = validator.validate_inputs(**{arg: name})
        assert isinstance(result, str) and result, (validator, name)


def test_resolver_uses_folder_paths_lookup_and_lists_safetensors_only(model_folders):
    from diffumatting.nodes import _files, lora

    (model_folders["loras"] / "sub").mkdir()
    save_file({"x": torch.zeros(1)}, str(model_folders["loras"] / "sub" / "a.safetensors"))
    (model_folders["loras"] / "old.ckpt").write_bytes(b"\x80\x02")
    assert lora.lora_files() == ["sub/a.safetensors"]
    assert lora.resolve_lora("sub/a.safetensors") == str(model_folders["loras"] / "sub" / "a.safetensors")
    # The same name in the second folder is found when the first lacks it (UNets: diffumatting, then core's).
    save_file({"x": torch.zeros(1)}, str(model_folders["diffusion_models"] / "u.safetensors"))
    assert _files.resolve_model_file("u.safetensors", ("diffumatting", "diffusion_models"), "UNet") == \
        str(model_folders["diffusion_models"] / "u.safetensors")
    with pytest.raises(ValueError, match=r"not found in models/loras.*Available: \['sub/a.safetensors'\]"):
        lora.resolve_lora("gone.safetensors")


def test_one_pickle_suffix_list():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    defined = [p for p in root.glob("**/*.py") if ".venv" not in p.parts and ".host" not in p.parts
               and re.search(r"^PICKLE_SUFFIXES\s*=", p.read_text(errors="replace"), re.M)]
    assert [p.relative_to(root).as_posix() for p in defined] == ["models/model_files.py"]


# --- weights with NaN, LoRAs that match nothing ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(comfy_host, tmp_path_factory):
    import comfy.sd
    from support.tiny_sd15 import cached_tiny_sd15_checkpoint

    path = cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "tiny_models")
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    return {"model": model, "clip": clip}


def test_unet_of_nan_weights_is_refused(tiny, model_folders):
    from diffumatting.nodes import generate
    from support.tiny_sd15 import tiny_unet_finetune

    weights = {"diffusion_model." + k: torch.full_like(v, float("nan")) for k, v in tiny_unet_finetune(3).items()}
    save_file(weights, str(model_folders["diffumatting"] / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"'nan.safetensors'.*hold NaN or infinite values.*earlier checkpoint"):
        generate.UNetLoader.execute(tiny["model"], "nan.safetensors", 1.0)


def test_lora_nan_strength_is_refused(tiny, model_folders):
    from diffumatting.nodes.lora import LoraStack
    from support.tiny_sd15 import write_random_lora

    write_random_lora(model_folders["loras"] / "a.safetensors", seed=1)
    with pytest.raises(ValueError, match="strength model=nan.*finite"):
        LoraStack.execute(tiny["model"], tiny["clip"], lora_1="a.safetensors", model_strength_1=float("nan"))
    with pytest.raises(ValueError, match="clip=inf"):
        LoraStack.execute(tiny["model"], tiny["clip"], lora_stack=[("a.safetensors", 1.0, float("inf"))])


def test_lora_matching_no_weight_is_an_error(tiny, model_folders):
    from diffumatting.nodes.lora import LoraStack
    from support.tiny_sd15 import write_random_lora

    other = {"lora_unet_label_emb_0_0.lora_up.weight": torch.zeros(8, 4),
             "lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 2816)}
    save_file(other, str(model_folders["loras"] / "sdxl_only.safetensors"))
    with pytest.raises(ValueError, match="'sdxl_only.safetensors' matches none of the weights of this MODEL or CLIP"):
        LoraStack.execute(tiny["model"], tiny["clip"], lora_1="sdxl_only.safetensors")
    with pytest.raises(ValueError, match="none of the weights of this MODEL:"):
        LoraStack.execute(tiny["model"], None, lora_1="sdxl_only.safetensors")
    # A LoRA that matches only one side (here: the model, the clip side of the file is absent) is fine.
    write_random_lora(model_folders["loras"] / "a.safetensors", seed=1)
    model, _, _ = LoraStack.execute(tiny["model"], tiny["clip"], lora_1="a.safetensors").result
    assert model.patches
    np.testing.assert_equal(len(tiny["model"].patches), 0)
