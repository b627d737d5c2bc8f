"""GreenPost's learned refiner (models/refiner.py, train_refiner.py): files, determinism, the band, defaults."""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffumatting.models import refiner
from diffumatting.models.greenpost import GreenPostOptions, RefinerChoice, greenpost
from diffumatting.models.synthetic import REALISTIC, make_composite

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Import a root script (greenpost.py, train_refiner.py) as a module without touching sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _small(seed: int = 0) -> refiner.Refiner:
    torch.manual_seed(seed)
    return refiner.Refiner(refiner.RefinerConfig(hidden=(8,)))


# --- files ------------------------------------------------------------------------------------------------

def test_shipped_weights_are_small_self_describing_and_load():
    assert refiner.SHIPPED.is_file(), "models/weights/greenpost_refiner.safetensors is missing: run make train-refiner"
    assert refiner.SHIPPED.stat().st_size < 5 * 1024 * 1024
    model = refiner.load_refiner()
    assert model.num_parameters() <= 1_000_000 and not model.training
    from safetensors import safe_open

    with safe_open(str(refiner.SHIPPED), "pt") as fh:
        meta = fh.metadata()
    assert meta["kind"] == refiner.KIND and refiner.RefinerConfig.from_json(meta["config"]) == model.config
    assert "project generator" in meta["trained_on"]


def test_save_load_round_trip(tmp_path):
    model = _small(3)
    path = refiner.save_refiner(tmp_path / "r.safetensors", model, {"note": "x"})
    back = refiner.load_refiner(path)
    assert back.config == model.config and refiner.weights_hash(back) == refiner.weights_hash(model)
    with pytest.raises(ValueError, match="reserved keys"):
        refiner.save_refiner(tmp_path / "s.safetensors", model, {"kind": "other"})
    with pytest.raises(ValueError, match=r"saved as \.safetensors"):
        refiner.save_refiner(tmp_path / "r.pt", model)


def test_loader_refuses_pickles(tmp_path):
    model = _small()
    pt = tmp_path / "refiner.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(ValueError, match="pickle files .* are refused"):
        refiner.load_refiner(pt)
    disguised = tmp_path / "refiner.safetensors"  # a pickle renamed
    disguised.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=2))
    with pytest.raises(ValueError, match="is a pickle"):
        refiner.load_refiner(disguised)
    torch.save(model.state_dict(), disguised)  # torch's zip pickle renamed
    with pytest.raises(ValueError, match="is a pickle"):
        refiner.load_refiner(disguised)


def test_loader_refuses_unknown_formats(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "vae.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"kind": "vae"})
    with pytest.raises(ValueError, match="is not a GreenPost refiner .*'vae'"):
        refiner.load_refiner(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 7) + b"notjson")
    with pytest.raises(ValueError, match="not a safetensors file"):
        refiner.load_refiner(junk)
    with pytest.raises(ValueError, match="does not exist"):
        refiner.load_refiner(tmp_path / "missing.safetensors")
    model = _small()
    newer = tmp_path / "newer.safetensors"
    refiner.save_refiner(newer, model)
    from safetensors.torch import load_file

    meta = {"kind": refiner.KIND, "format_version": str(refiner.FORMAT_VERSION + 1), "config": model.config.to_json()}
    save_file(load_file(str(newer)), str(newer), metadata=meta)
    with pytest.raises(ValueError, match=f"format version {refiner.FORMAT_VERSION + 1}; this pack reads up to "
                                         f"{refiner.FORMAT_VERSION}"):
        refiner.load_refiner(newer)
    meta.update(format_version=str(refiner.FORMAT_VERSION - 1))  # an earlier pack's refiner read other inputs
    save_file(load_file(str(newer)), str(newer), metadata=meta)
    with pytest.raises(ValueError, match="format version 1, from an earlier version of the pack.*retrain"):
        refiner.load_refiner(newer)
    meta.update(format_version="x")
    save_file(load_file(str(newer)), str(newer), metadata=meta)
    with pytest.raises(ValueError, match="format_version 'x' is not a number"):
        refiner.load_refiner(newer)
    meta.update(format_version=str(refiner.FORMAT_VERSION), config='{"radius": 1, "colour": 3}')
    save_file(load_file(str(newer)), str(newer), metadata=meta)
    with pytest.raises(ValueError, match=r"config has unknown fields \[.colour.\]; it was written by a newer version"):
        refiner.load_refiner(newer)


def test_loader_refuses_wrong_shapes_and_nan(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _small()
    path = refiner.save_refiner(tmp_path / "r.safetensors", model)
    tensors = load_file(str(path))
    meta = {"kind": refiner.KIND, "format_version": str(refiner.FORMAT_VERSION), "config": model.config.to_json()}
    tensors["mlp.0.weight"] = torch.zeros(9, model.config.n_inputs)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"wrong shape \['mlp.0.weight \(9, .*\) != \(8, "):
        refiner.load_refiner(path)
    tensors = load_file(str(refiner.save_refiner(path, model)))
    del tensors["in_std"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"missing \['in_std'\]"):
        refiner.load_refiner(path)
    tensors = load_file(str(refiner.save_refiner(path, model)))
    tensors["mlp.0.bias"][0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="NaN or infinite"):
        refiner.load_refiner(path)


def test_config_validation():
    with pytest.raises(ValueError, match="radius=9"):
        refiner.RefinerConfig(radius=9)
    with pytest.raises(ValueError, match="hidden=()"):
        refiner.RefinerConfig(hidden=())
    with pytest.raises(ValueError, match="GreenPost refiner config must be a JSON object"):
        refiner.RefinerConfig.from_json("[1]")
    with pytest.raises(ValueError, match=r"unknown fields \['width'\]; it was written by a newer version"):
        refiner.RefinerConfig.from_json('{"width": 3}')
    with pytest.raises(ValueError, match="radius=9"):  # the class's own range check, through the reader
        refiner.RefinerConfig.from_json('{"radius": 9}')
    assert refiner.RefinerConfig.from_json(refiner.RefinerConfig().to_json()) == refiner.RefinerConfig()


# --- behaviour --------------------------------------------------------------------------------------------

def test_refiner_changes_only_the_uncertain_band():
    comp = make_composite(96, 128, 4, REALISTIC)
    img = torch.from_numpy(comp.image)[None]
    fg_off, a_off = greenpost(img, options=GreenPostOptions(refiner="off"))
    fg_on, a_on = greenpost(img, options=GreenPostOptions(refiner="greenpost_refiner"))
    # the band is where the classical alpha (the refiner-off output, matte levels at their defaults) is
    # strictly between 0 and 1, dilated
    band = refiner.band_mask(a_off[None])[0, 0]
    outside = ~band
    assert bool(outside.any()) and bool(band.any())
    assert torch.equal(a_on[0][outside], a_off[0][outside])
    assert torch.equal(fg_on[0][outside], fg_off[0][outside])
    assert float((a_on[0][band] - a_off[0][band]).abs().max()) > 1e-3  # it does act inside the band
    assert float(a_on.min()) >= 0 and float(a_on.max()) <= 1


@pytest.mark.parametrize("bias", [-8.0, 8.0])
def test_refiner_never_changes_what_the_classical_key_is_sure_of(bias):
    """Safe by design: even a network that pushes every band pixel to 0 or to 1 leaves the pixels the classical
    key marks certain (0 or 1, or within half an 8-bit step of them) as they are, so solid interiors and clean
    backing keep their 255 and 0 in 8-bit output."""
    from diffumatting.models import greenpost as greenpost_module

    model = _small(5)
    with torch.no_grad():
        model.mlp[-1].bias.fill_(bias)

    def refine(x, kf):
        return refiner.refine_fields(model, x, kf)
    refine.halo = model.halo()
    rgb = torch.from_numpy(make_composite(96, 128, 7, REALISTIC).image)
    _, a_off = greenpost_module._key_one(rgb, None, GreenPostOptions(refiner="off"))
    _, a_on = greenpost_module._key_one(rgb, None, GreenPostOptions(refiner="off"), refine)
    sure = (a_off <= refiner.SURE) | (a_off >= 1 - refiner.SURE)
    assert int((a_off == 0).sum()) > 1000 and int((a_off == 1).sum()) > 500 and bool((~sure).any())
    assert torch.equal(a_on[sure], a_off[sure])
    assert float((a_on[~sure] - a_off[~sure]).abs().mean()) > 0.05  # the hostile network did act on the band


def test_refine_alpha_with_an_empty_band_is_the_identity():
    src = refiner.FeatureSource(image=torch.rand(1, 3, 16, 16), backing=torch.rand(1, 3, 16, 16),
                                prior_fg=torch.rand(1, 3, 16, 16), alpha=(torch.rand(1, 1, 16, 16) > 0.5).float(),
                                sig1_low=torch.rand(1, 1, 4, 4), noise_std=torch.full((3,), 0.01))
    out, band = refiner.refine_alpha(_small(), src)
    assert not bool(band.any()) and torch.equal(out, src.alpha)


def test_features_match_a_direct_reading():
    """The gathered features are the neighbourhood values the docstring names (fine part, centre pixel)."""
    g = torch.Generator().manual_seed(0)
    src = refiner.FeatureSource(image=torch.rand(1, 3, 12, 10, generator=g),
                                backing=torch.rand(1, 3, 12, 10, generator=g),
                                prior_fg=torch.rand(1, 3, 12, 10, generator=g),
                                alpha=torch.rand(1, 1, 12, 10, generator=g),
                                sig1_low=torch.rand(1, 1, 3, 3, generator=g),
                                noise_std=torch.tensor([0.01, 0.02, 0.03]))
    cfg = refiner.RefinerConfig()
    ys, xs = torch.tensor([0, 5, 11]), torch.tensor([0, 4, 9])
    f = refiner.features(src, ys, xs, cfg)
    assert f.shape == (3, cfg.n_inputs)
    c = (2 * cfg.radius + 1) ** 2 // 2 * refiner.FINE_CH
    for n, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
        torch.testing.assert_close(f[n, c:c + 3], src.image[0, :, y, x] - src.backing[0, :, y, x])
        torch.testing.assert_close(f[n, c + 3:c + 6], src.prior_fg[0, :, y, x] - src.backing[0, :, y, x])
        assert float(f[n, refiner.alpha_column(cfg)]) == float(src.alpha[0, 0, y, x])
    torch.testing.assert_close(f[:, -3], torch.full((3,), -2.0))
    # the corner pixel's upper-left neighbour is clamped to itself
    torch.testing.assert_close(f[0, 0:3], src.image[0, :, 0, 0] - src.backing[0, :, 0, 0])


# --- training ---------------------------------------------------------------------------------------------

def _train(tmp_path: Path, name: str, seed: int) -> dict:
    out = tmp_path / f"{name}.safetensors"
    cmd = [sys.executable, str(ROOT / "train_refiner.py"), "--out", str(out), "--seed", str(seed), "--steps", "2",
           "--images", "3", "--val-images", "1", "--size-min", "48", "--size-max", "64", "--batch", "64",
           "--pixels-per-image", "200", "--threads", "1", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["weights_sha256"] == refiner.weights_hash(refiner.load_refiner(out))
    return report


def test_two_step_training_is_deterministic(tmp_path):
    a = _train(tmp_path, "a", 1)
    b = _train(tmp_path, "b", 1)
    c = _train(tmp_path, "c", 2)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["weights_sha256"] != c["weights_sha256"]
    assert not list(tmp_path.glob("*.resume.safetensors"))


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0 is outside"),
    (["--out", "w.pt"], "ending in .safetensors"),
    (["--size-min", "300", "--size-max", "100"], "above --size-max"),
    (["--lr", "0"], "--lr 0 is outside (0, 1]"),
    (["--hidden", "a,b"], "comma-separated integers"),
    (["--radius", "9"], "--radius 9 is outside"),
    (["--data", "shared"], "invalid choice: 'shared'"),
])
def test_training_flags_are_validated(args, message):
    res = subprocess.run([sys.executable, str(ROOT / "train_refiner.py"), *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 2 and message in res.stderr


def test_training_help_documents_every_flag():
    for action in _script("train_refiner").build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


# --- defaults: options, node, CLI, matting decode ------------------------------------------------------------

# Every entry point (options, node, CLI, the matting decode's GreenPost step) refines with the shipped network
# by default and offers 'off' (the classical key); these tests pin that one default everywhere.
DEFAULT = RefinerChoice.SHIPPED.value


def test_options_refiner_default_and_choices():
    assert GreenPostOptions().refiner == DEFAULT
    assert GreenPostOptions(refiner=RefinerChoice.SHIPPED).refiner == "greenpost_refiner"
    with pytest.raises(ValueError, match="refiner='best': expected one of"):
        GreenPostOptions(refiner="best")


def test_cli_refiner_default_and_choices():
    p = _script("greenpost").build_parser()
    assert p.parse_args(["in", "out"]).refiner == DEFAULT
    assert p.parse_args(["in", "out", "--refiner", "greenpost_refiner"]).refiner == "greenpost_refiner"
    with pytest.raises(SystemExit):
        p.parse_args(["in", "out", "--refiner", "best"])


def test_node_refiner_default_and_choices(comfy_host):
    import comfy.model_management

    from diffumatting.nodes import refine

    schema = refine.GreenPost.define_schema()
    inp = next(i for i in schema.inputs if i.id == "refiner")
    assert inp.default == DEFAULT and inp.options == ["greenpost_refiner", "off"]
    assert inp.tooltip
    comp = make_composite(48, 64, 2, REALISTIC)
    image = torch.from_numpy(comp.image)[None]
    dev = comfy.model_management.get_torch_device()  # the node keys where ComfyUI computes (a GPU machine's GPU)
    _, a_on = greenpost(image.to(dev), options=GreenPostOptions(refiner="greenpost_refiner"))
    _, a_off = greenpost(image.to(dev), options=GreenPostOptions(refiner="off"))
    a_on, a_off = a_on.cpu(), a_off.cpu()
    assert not torch.equal(a_on, a_off)
    _, a_node, _, _ = refine.GreenPost.execute(image).result
    assert torch.equal(a_node, a_on)
    _, a_node_off, _, _ = refine.GreenPost.execute(image, refiner="off").result  # saved workflows' old value
    assert torch.equal(a_node_off, a_off)
    with pytest.raises(ValueError, match="refiner='best' is not one of"):
        refine.GreenPost.execute(image, refiner="best")


def test_matting_decode_refinement_uses_the_default(comfy_host, monkeypatch):
    from diffumatting.nodes import matting

    seen = []
    real = refiner.refine_alpha

    def spy(model, src):
        seen.append(model.config)
        return real(model, src)

    monkeypatch.setattr(refiner, "refine_alpha", spy)
    comp = make_composite(40, 48, 3, REALISTIC)
    fg, alpha = matting._greenpost(torch.from_numpy(comp.image)[None], None)
    assert len(seen) == (0 if DEFAULT == "off" else 1) and alpha.shape == (1, 40, 48)
    _, a_default = greenpost(torch.from_numpy(comp.image)[None], options=GreenPostOptions(refiner=DEFAULT))
    assert torch.equal(alpha, a_default)


def test_refiner_in_row_bands_equals_the_whole_image(monkeypatch):
    """greenpost() keys large images in bands of rows with a halo: the refined result must not depend on it."""
    from diffumatting.models import greenpost as greenpost_module

    model = refiner.load_refiner()

    def refine(x, kf):
        return refiner.refine_fields(model, x, kf)
    refine.halo = model.halo()
    rgb = torch.from_numpy(make_composite(200, 96, 6, REALISTIC).image)
    fg1, a1 = greenpost_module._key_one(rgb, None, GreenPostOptions(refiner="off"), refine)
    monkeypatch.setattr(greenpost_module, "BAND_PIXELS", 96 * 48)
    assert len(greenpost_module._bands(200, 96, 16)) > 3
    fg2, a2 = greenpost_module._key_one(rgb, None, GreenPostOptions(refiner="off"), refine)
    assert torch.equal(a1, a2) and torch.equal(fg1, fg2)
    _, a_off = greenpost_module._key_one(rgb, None, GreenPostOptions(refiner="off"))
    assert not torch.equal(a1, a_off)


def test_refiner_is_loaded_on_the_images_device():
    """greenpost() runs where the image is: the refiner's weights go to that device (on CUDA the first
    device check found them left on the CPU). The meta device stands in for a GPU here."""
    from diffumatting.models import greenpost as gp

    refine = gp._refine_fn(RefinerChoice.SHIPPED.value, torch.device("meta"))
    devices = {t.device.type for t in (*refine.model.parameters(), *refine.model.buffers())}
    assert devices == {"meta"}, devices
    assert gp._refine_fn(RefinerChoice.OFF.value, torch.device("meta")) is None
