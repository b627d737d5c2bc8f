"""Trainer data and config, without a model: folder layouts, captions, bad files, determinism, sharding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffumatting.models.synthetic import random_object
from diffumatting.training import config
from diffumatting.training.data import (Composer, StepData, global_positions, name_to_words, scan_folder,
                                        synthetic_items)

ROOT = Path(__file__).resolve().parents[1]


def _rgba(path: Path, seed: int, size: int = 40):
    fg, a = random_object(size, size, seed)
    rgba = np.concatenate([fg, a[..., None]], axis=2)
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(path)


def test_rgba_folder_captions_and_bad_files(tmp_path):
    for i in range(3):
        _rgba(tmp_path / f"blue_vase-{i}.png", i)
    (tmp_path / "blue_vase-1.txt").write_text("  a tall\nblue vase ")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "opaque.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    logs = []
    items, bad = scan_folder(tmp_path, "auto", "a photo of {name}", log=logs.append)
    assert [i.name for i in items] == ["blue_vase-0", "blue_vase-1", "blue_vase-2"]
    assert items[0].caption == "a photo of blue vase" and items[1].caption == "a tall blue vase"
    assert len(bad) == 3 and all(any(n in b for b in bad) for n in ("junk.png", "opaque.png", "photo.jpg"))
    assert any("skipping junk.png: unreadable" in m for m in logs)
    # A file that breaks after the scan is reported once, replaced by the next good item, and counted.
    good = tmp_path / "blue_vase-2.png"
    good.write_bytes(good.read_bytes()[:60])
    data = StepData(items, Composer(64, seed=0), seed=0, batch=3, log=logs.append)
    for step in range(3):
        batch = data.batch(step)
        assert len(batch) == 3 and all(s.image.shape == (64, 64, 3) for s, _, _ in batch)
    assert list(data.bad) == [2] and "blue_vase-2.png: unreadable" in data.report()[0]
    with pytest.raises(ValueError, match="no usable samples"):
        scan_folder(tmp_path / "nothing_here" if (tmp_path / "nothing_here").mkdir() is None else None, "rgba", "")


def test_pairs_layout(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "alpha").mkdir()
    for i in range(2):
        fg, a = random_object(32, 32, i)
        Image.fromarray((fg * 255).astype(np.uint8)).save(tmp_path / "image" / f"cat_{i}.jpg")
        Image.fromarray((a * 255).astype(np.uint8)).save(tmp_path / "alpha" / f"cat_{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "image" / "orphan.jpg")
    items, bad = scan_folder(tmp_path, "auto", "{name}", log=lambda *_: None)
    assert [i.caption for i in items] == ["cat", "cat"] and items[0].alpha.endswith("cat_0.png")
    assert bad == ["orphan.jpg: no alpha file named orphan.* in alpha/"]
    s = Composer(64, seed=1)(items[0], 0, 0)
    assert s.alpha.shape == (64, 64) and 0 < s.alpha.mean() < 1
    # Ground truth is kept: away from the object the image is the returned backing (shadow included) up to
    # sensor noise, and the composite follows I = a F + (1 - a) B inside the object up to spill and noise.
    import cv2

    far = cv2.dilate((s.alpha > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    assert far.sum() > 1000 and np.abs(s.image[far] - s.backing[far]).mean() < 0.02
    solid = s.alpha > 0.999
    assert np.abs(s.image[solid] - s.foreground[solid]).mean() < 0.05


def test_samples_are_deterministic_and_sharded():
    items = synthetic_items(10, seed=3)
    comp = Composer(64, seed=3)
    a = StepData(items, comp, seed=3, batch=4).batch(7)
    b = StepData(items, comp, seed=3, batch=4).batch(7)
    assert [(i, v) for _, i, v in a] == [(i, v) for _, i, v in b]
    assert all(np.array_equal(x.image, y.image) for (x, _, _), (y, _, _) in zip(a, b))
    # Two ranks split each global batch: together they read exactly the single-process batch.
    r0 = StepData(items, comp, seed=3, batch=4, rank=0, world=2).batch(7)
    r1 = StepData(items, comp, seed=3, batch=4, rank=1, world=2).batch(7)
    assert [i for _, i, _ in r0 + r1] == [i for _, i, _ in a]
    assert list(global_positions(7, 4, 1, 2)) == [30, 31]
    # Every item appears once per epoch.
    seen = [i for step in range(5) for _, i, _ in StepData(items, comp, seed=3, batch=2).batch(step)]
    assert sorted(seen) == list(range(10))
    assert name_to_words("red_toy-03") == "red toy"


def test_default_toml_documents_every_default():
    data = config.load_toml(ROOT / "configs" / "default.toml")
    cfg = config.apply_dict(config.TrainConfig(), data, "default.toml")
    assert cfg.to_dict() == config.TrainConfig().to_dict()
    assert {s: set(v) for s, v in data.items()} == {s: set(v) for s, v in config.TrainConfig().to_dict().items()}
    tiny = config.validate(config.build("tiny"))
    assert tiny.model.tiny and tiny.data.source == "synthetic" and tiny.loss.green_factors == [1]


def test_config_coercion_and_validation():
    cfg = config.build(None, None, config.parse_set(["unet.lr=2e-5", "run.stages=head", "loss.green_factors=[1, 2]",
                                                     "data.flip=off", "model.tiny=true"]))
    assert cfg.unet.lr == 2e-5 and cfg.run.stages == ["head"] and cfg.loss.green_factors == [1, 2]
    assert cfg.data.flip is False
    with pytest.raises(config.ConfigError, match="expected SECTION.KEY=VALUE"):
        config.parse_set(["lr=1"])
    with pytest.raises(config.ConfigError, match=r"unknown section \[unett\] \(did you mean 'unet'\?\)"):
        config.apply_dict(config.TrainConfig(), {"unett": {}}, "x")
    cfg.unet.batch_size = 3
    with pytest.raises(config.ConfigError, match="multiple of the 2 process"):
        config.validate(cfg, world_size=2)
    cfg = config.build("tiny")
    cfg.model.tiny, cfg.model.checkpoint = False, "model.ckpt"
    with pytest.raises(config.ConfigError, match="pickle file"):
        config.validate(cfg)
