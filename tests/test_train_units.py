"""Trainer pieces without a model: config declarations, log.csv repair, checkpoint files, the detail-loss
weighting, the head's precision, phrase-only green tokens, folder data (fg/ preference, premultiplied
resize, foreground estimation, 16-bit files) and self-consistent head-stage targets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffumatting.models import losses
from diffumatting.models.synthetic import random_object
from diffumatting.training import config
from diffumatting.training.data import Composer, Item, _read_rgba, resize_premultiplied, scan_folder, synthetic_items

ROOT = Path(__file__).resolve().parents[1]


# --- config: declared once ------------------------------------------------------------------------------
def test_shipped_default_toml_is_the_derived_one():
    assert (ROOT / "configs" / "default.toml").read_text(encoding="utf-8") == config.default_toml(), \
        "configs/default.toml is stale: python train.py --print-default-config > configs/default.toml"
    data = config.load_toml(ROOT / "configs" / "default.toml")
    assert config.apply_dict(config.TrainConfig(), data, "default.toml").to_dict() == config.TrainConfig().to_dict()


_PY310_TOML = """
import json, sys
for name in sys.argv[2:]:
    sys.modules[name] = None  # as on Python 3.10, where the stdlib has no tomllib
sys.path.append(sys.argv[1])
import _package
_package.register()
from diffumatting.training import config
data = config.load_toml(config.CONFIG_DIR / "default.toml")
cfg = config.apply_dict(config.TrainConfig(), data, "default.toml")
config.apply_dict(cfg, {"loss": {"green_factors": "[4, 8]"}}, "--set")
print(json.dumps({"parser": config.tomllib.__name__, "cfg": cfg.to_dict()}))
"""


def _config_without(*modules: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _PY310_TOML, str(ROOT), *modules], capture_output=True, text=True,
                          timeout=120)


def test_config_reads_toml_without_tomllib():
    """Python 3.10 (ComfyUI's minimum) has no tomllib: the trainer reads its configs with tomli, to the same
    values; without tomli either, importing the config is one error naming the package and the fix."""
    res = _config_without("tomllib")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = config.apply_dict(config.TrainConfig(), config.load_toml(ROOT / "configs" / "default.toml"), "d")
    config.apply_dict(expected, {"loss": {"green_factors": "[4, 8]"}}, "--set")
    assert out["parser"] == "tomli" and config.tomllib.__name__ == "tomllib"
    assert out["cfg"] == json.loads(json.dumps(expected.to_dict())) and out["cfg"]["loss"]["green_factors"] == [4, 8]
    res = _config_without("tomllib", "tomli")
    assert res.returncode != 0
    assert "ImportError: the trainer reads TOML configs: on Python 3.10 it needs the `tomli` package" in res.stderr


def test_every_choice_is_declared_and_validated():
    specs = config.spec_map()
    assert specs["run.mixed_precision"].choices == ("auto", "no", "fp16", "bf16")
    assert specs["loss.green_factors"].choices == (1, 2, 4, 8, 16)
    assert all(s.doc for s in specs.values())
    cfg = config.build("tiny")
    for dotted, spec in specs.items():
        if spec.choices is None:
            continue
        section, name = dotted.split(".")
        bad = config.build("tiny")
        value = ["bogus"] if spec.is_list else "bogus"
        if spec.base_type is int:
            value = [3] if spec.is_list else 3
        setattr(getattr(bad, section), name, value)
        with pytest.raises(config.ConfigError, match=dotted.replace(".", r"\.")):
            config.validate(bad)
    config.validate(cfg)


@pytest.mark.parametrize("setting", ["unet.lr=inf", "loss.detail=inf", "loss.green=nan", "head.lr=-inf",
                                     "data.head_realism=nan", "run.sample_cfg=inf"])
def test_non_finite_settings_are_refused(setting):
    cfg = config.build("tiny", None, config.parse_set([setting]))
    with pytest.raises(config.ConfigError, match=setting.split("=")[0].replace(".", r"\.") + r" is (inf|nan|-inf)"):
        config.validate(cfg)


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1e30"])
def test_bad_seed_is_one_clear_error(seed):
    with pytest.raises(config.ConfigError, match=r"run\.seed"):
        config.validate(config.build("tiny", None, config.parse_set([f"run.seed={seed}"])))


# --- log.csv --------------------------------------------------------------------------------------------
def test_half_written_last_log_row_is_dropped(tmp_path):
    from diffumatting.training.report import CsvLog

    log = CsvLog(tmp_path / "log.csv")
    for step in (1, 2, 3):
        log.append({"time": 0.1, "stage": "unet", "step": step, "lr": 1e-4, "loss": 0.5, "diffusion": 0.4})
    with open(tmp_path / "log.csv", "a") as fh:
        fh.write("0.4,unet,1")            # killed while appending step 12's row: "1" of "12"
    assert [r["step"] for r in log.rows()] == ["1", "2", "3"]
    log.truncate("unet", 2)
    assert [r["step"] for r in log.rows()] == ["1", "2"]
    # A damaged line in the middle (fewer fields) is skipped too, and appending after a cut line starts anew.
    with open(tmp_path / "log.csv", "a") as fh:
        fh.write("0.5,unet\n0.6,head,xx,1,2\n0.7,un")
    log.append({"time": 0.8, "stage": "head", "step": 1, "lr": 1e-3, "loss": 0.3})
    assert [(r["stage"], r["step"]) for r in log.rows()] == [("unet", "1"), ("unet", "2"), ("head", "1")]


# --- checkpoints ----------------------------------------------------------------------------------------
def test_optimizer_state_only_in_newest_checkpoint(tmp_path):
    from diffumatting.training import state

    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([p], lr=1e-3)
    for step in (1, 2, 3):
        p.grad = torch.randn_like(p)
        opt.step()
        state.save_checkpoint(tmp_path, "unet", step, {"unet.w": p.detach()}, opt, {"config": {}}, keep=2)
    names = [c.name for c in state.list_checkpoints(tmp_path)]
    assert names == ["unet-0000002", "unet-0000003"]
    assert not (tmp_path / "unet-0000002" / "optimizer.safetensors").exists()
    assert (tmp_path / "unet-0000002" / "model.safetensors").is_file()
    model, o, rng, meta = state.read_checkpoint(tmp_path / "unet-0000003")
    assert o is not None and "rng.cpu" in rng and meta["step"] == 3
    model, o, rng, meta = state.read_checkpoint(tmp_path / "unet-0000002")
    assert o is None and torch.is_tensor(model["unet.w"])
    weights, opt_bytes = state.checkpoint_bytes({"unet.w": p.detach()}, [p])
    assert weights == 64 * 64 * 4 and opt_bytes == 2 * weights
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        state.read_checkpoint(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="is not a trainer checkpoint"):
        state.read_checkpoint(tmp_path / "junk")


# --- detail-loss weighting (defect 6) ------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_detail_gradient_moves_to_low_noise(prediction):
    """Gradient of the weighted detail loss on the model output, per noise level: the low_noise weighting
    makes it fall with the noise; the first weighting made it grow."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 16, 16, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    alpha = torch.zeros(1, 1, 128, 128)
    alpha[..., 32:96, 32:96] = 1.0
    acp = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)

    def grad_norm(t: int, weighting: str) -> float:
        ab = acp[t].view(1)
        x_t = losses.add_noise(x0, noise, ab)
        out = (losses.diffusion_target(x0, noise, ab, prediction) + 0.3 * torch.randn(1, 4, 16, 16, generator=g)
               ).requires_grad_(True)
        x0_hat = losses.predicted_x0(x_t, out, ab, prediction)
        w = losses.detail_sample_weight(ab, prediction, weighting)
        losses.detail_loss(x0_hat, x0, alpha, sample_weight=w).backward()
        return float(out.grad.norm())

    steps = (50, 300, 600, 900)
    new = [grad_norm(t, "low_noise") for t in steps]
    old = [grad_norm(t, "sqrt_alpha_bar") for t in steps]
    assert new[0] > new[1] > new[2] > new[3], new
    assert new[0] > 5 * new[3], new
    if prediction == "eps":
        assert old[3] > old[0], old        # the first weighting put the gradient at high noise
    with pytest.raises(ValueError, match="detail weighting"):
        losses.detail_sample_weight(acp[:1], prediction, "bogus")


# --- head precision (defect 7) ---------------------------------------------------------------------------
def test_head_output_layer_runs_in_float32():
    from diffumatting.models.matting_head import HeadConfig, MattingHead

    head = MattingHead(HeadConfig(fine_channels=16, coarse_channels=(), coarse_taps=(), hidden=8)).reset_parameters(0)
    with torch.no_grad():
        head.out.weight.mul_(400.0)    # a trained head's confident logits
    g = torch.Generator().manual_seed(0)
    fine = torch.randn(1, 16, 64, 64, generator=g)
    ref = head(fine.double().float(), [])
    got = head(fine.to(torch.bfloat16), [])
    assert got.dtype == torch.float32
    # bf16 features cost some accuracy, but the alpha is not quantised to bf16's 8 significant bits: it has
    # far more distinct levels than 256 and follows the float32 head closely.
    assert torch.unique(got).numel() > 1024
    err = (got - ref).abs()
    assert float(err.mean()) < 0.02, float(err.mean())


# --- which green tokens (defect 2) ----------------------------------------------------------------------
def test_only_the_phrase_green_token_is_supervised():
    from diffumatting.training.text import phrase_green_positions

    # "a green apple, isolated on a flat green screen background" with made-up token ids
    green, phrase = [7], [20, 21, 22, 23, 7, 24, 25]
    caption = [49406, 1, 7, 30, 31] + phrase + [49407]
    assert phrase_green_positions(caption, phrase, green) == [5 + 4]
    assert phrase_green_positions([49406, 1, 7, 30, 49407], phrase, green) == []
    from diffumatting.models.prompting import green_token_positions

    assert green_token_positions(caption, green) == [2, 9]        # "all" mode would supervise both


# --- data: UNet stage flat canvas (defect 3), head targets (defect 4) ----------------------------------------
def test_unet_stage_samples_are_a_pure_flat_canvas():
    cfg = config.TrainConfig()
    assert cfg.data.unet_realism == 0.0 and cfg.data.head_realism == 1.0
    key = tuple(cfg.data.key_color)
    comp = Composer(64, seed=0, realism=cfg.data.unet_realism, key=key)
    for idx, item in enumerate(synthetic_items(4, seed=0)):
        s = comp(item, idx, 0)
        bg = s.alpha == 0
        assert bg.sum() > 500
        assert np.abs(s.image[bg] - np.asarray(key, np.float32)).max() < 1e-6   # one flat key colour, no noise
        assert np.array_equal(s.image, s.target)


def test_head_stage_targets_are_self_consistent():
    comp = Composer(64, seed=0, realism=1.0, key=None)
    keys = set()
    for idx, item in enumerate(synthetic_items(6, seed=2)):
        s = comp(item, idx, 1)
        a = s.alpha[..., None]
        rebuilt = a * s.foreground + (1 - a) * s.backing
        assert np.abs(rebuilt - s.target).max() < 1e-5          # the composition loss has zero at the truth
        assert np.abs(s.image - s.target).mean() < 0.03          # the input is the target, softened and noised
        keys.add(tuple(np.round(s.backing[0, 0], 3)))
    assert len(keys) > 1                                          # the head sees varied greens


def test_composition_loss_is_zero_at_the_true_alpha():
    from diffumatting.models.matting_losses import composition_loss

    comp = Composer(64, seed=5, realism=1.0)
    s = comp(synthetic_items(1, seed=5)[0], 0, 0)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]   # noqa: E731
    a = torch.from_numpy(s.alpha)[None, None]
    assert float(composition_loss(a, t(s.foreground), t(s.backing), t(s.target))) < 1e-6
    # The noisy input is not the target: comparing with it (the first version) had no zero at the truth.
    assert float(composition_loss(a, t(s.foreground), t(s.backing), t(s.image))) > 1e-3


# --- folder data (defect 5) -------------------------------------------------------------------------------
def _save(path, arr):
    Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def test_fg_folder_is_preferred_and_photos_get_estimated(tmp_path):
    for d in ("image", "fg", "alpha"):
        (tmp_path / d).mkdir()
    fg, a = random_object(48, 48, 3)
    _save(tmp_path / "fg" / "cup.png", fg)
    _save(tmp_path / "image" / "cup.png", fg * a[..., None])
    _save(tmp_path / "alpha" / "cup.png", a)
    logs = []
    items, _ = scan_folder(tmp_path, "auto", "{name}", log=logs.append)
    assert Path(items[0].image).parent.name == "fg" and not items[0].estimate_fg
    (tmp_path / "fg" / "cup.png").unlink()
    (tmp_path / "fg").rmdir()
    items, _ = scan_folder(tmp_path, "auto", "{name}", log=logs.append)
    assert Path(items[0].image).parent.name == "image" and items[0].estimate_fg
    assert any("estimating the foreground" in m for m in logs)
    assert not scan_folder(tmp_path, "auto", "{name}", log=logs.append, foreground="given")[0][0].estimate_fg


def test_foreground_estimation_recovers_colours():
    from diffumatting.training.foreground import estimate_foreground

    h = w = 64
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.clip((xx - 20) / 24.0, 0, 1).astype(np.float32)            # a wide soft edge
    fg = np.zeros((h, w, 3), np.float32)
    fg[...] = (0.9, 0.3, 0.1)
    bg = np.zeros((h, w, 3), np.float32)
    bg[...] = (0.1, 0.2, 0.8)
    photo = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    est = estimate_foreground(photo, alpha)
    soft = (alpha > 0.2) & (alpha < 0.98)
    naive = np.abs(photo[soft] - fg[soft]).mean()                          # the photo used as foreground
    got = np.abs(est[soft] - fg[soft]).mean()
    assert got < 0.25 * naive, (got, naive)


def test_premultiplied_resize_has_no_dark_fringe():
    fg = np.zeros((64, 64, 3), np.float32)
    a = np.zeros((64, 64), np.float32)
    fg[16:48, 16:48] = 1.0                 # a white square; transparent pixels are black
    a[16:48, 16:48] = 1.0
    out, ar = resize_premultiplied(fg, a, (21, 21))
    edge = (ar > 0.05) & (ar < 0.95)
    assert edge.any() and out[edge].min() > 0.98        # straight colour stays white at the soft edge


def test_16bit_files_are_read_by_value(tmp_path):
    """A 16-bit greyscale alpha and a 16-bit RGBA PNG keep their values (not clipped white, not 8-bit)."""
    import cv2

    fg, a = random_object(40, 40, 1)
    (tmp_path / "image").mkdir()
    (tmp_path / "alpha").mkdir()
    _save(tmp_path / "image" / "x.png", fg)
    a16 = (a * 65535 + 0.5).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "alpha" / "x.png")
    item = Item("x", "x", image=str(tmp_path / "image" / "x.png"), alpha=str(tmp_path / "alpha" / "x.png"))
    _, got = _read_rgba(item)
    assert np.abs(got - a16 / 65535.0).max() < 1e-6
    rgba16 = (np.concatenate([fg, a[..., None]], axis=2) * 65535 + 0.5).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba16[..., [2, 1, 0, 3]])
    rgb, got = _read_rgba(Item("y", "y", image=str(tmp_path / "rgba16.png")))
    assert np.abs(got - rgba16[..., 3] / 65535.0).max() < 1e-6
    assert np.abs(rgb - rgba16[..., :3] / 65535.0).max() < 1e-6
