"""evaluate_dataset.py at tiny scale on the CPU: two dataset folders, a set of 'real' mattes (procedural here;
tests never download), a trained network each, metrics, relative MSE."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from diffumatting.factory.output import OutputFolder
from diffumatting.models.png import encode_png
from diffumatting.models.synthetic import make_composite, random_object


def _dataset(folder, seeds, status="accepted"):
    out = OutputFolder(folder, {"workflow_sha256": "test", "mode": "dataset"})
    for s in seeds:
        fg, alpha = random_object(48, 48, s)
        rid = f"obj-{s}"
        files = {"fg.png": f"samples/{rid}/fg.png", "alpha.png": f"samples/{rid}/alpha.png"}
        out.commit({"id": rid, "status": status, "reasons": [], "files": files, "scores": {"phash": "0" * 16}},
                   {"fg.png": encode_png(fg, 16), "alpha.png": encode_png(alpha, 16)})


def _real(folder, n=2):
    for sub in ("input", "gt"):
        (folder / sub).mkdir(parents=True)
    for i in range(n):
        c = make_composite(40, 52, 100 + i)
        cv2.imwrite(str(folder / "input" / f"r{i}.png"), (c.image[..., ::-1] * 255).round().astype(np.uint8))
        cv2.imwrite(str(folder / "gt" / f"r{i}.png"), (c.alpha * 255).round().astype(np.uint8))


def _run(args, capsys):
    import evaluate_dataset  # the root is on sys.path (conftest appends it)

    code = evaluate_dataset.main(args)
    return code, capsys.readouterr()


def test_trains_and_scores_each_dataset(tmp_path, capsys):
    _dataset(tmp_path / "a", [1, 2, 3])
    _dataset(tmp_path / "b", [4, 5])
    _real(tmp_path / "real")
    out = tmp_path / "eval.json"
    code, cap = _run(["--data", str(tmp_path / "a"), "--data", str(tmp_path / "b"), "--real", str(tmp_path / "real"),
                      "--steps", "4", "--batch", "2", "--crop", "32", "--width", "4", "--eval-size", "48",
                      "--out", str(out)], capsys)
    assert code == 0 and cap.out.strip().splitlines()[-1] == str(out)
    res = json.loads(out.read_text())
    assert [d["samples"] for d in res["datasets"]] == [3, 2] and res["images"] == 2
    for d in res["datasets"]:
        assert set(d["per_image"]) == {"r0", "r1"}
        assert all(math.isfinite(v) and v >= 0 for v in d["mean"].values())
    assert res["datasets"][0]["relative_mse"] == 1.0
    assert res["datasets"][1]["relative_mse"] == pytest.approx(res["datasets"][1]["mean"]["mse"]
                                                               / res["datasets"][0]["mean"]["mse"])


def test_bad_folders_are_clear_errors(tmp_path, capsys):
    _real(tmp_path / "real", 1)
    with pytest.raises(SystemExit):
        _run(["--data", str(tmp_path / "nothing"), "--real", str(tmp_path / "real")], capsys)
    assert "no manifest.jsonl" in capsys.readouterr().err
    _dataset(tmp_path / "rej", [1], status="rejected")
    with pytest.raises(SystemExit, match="no accepted dataset samples"):
        _run(["--data", str(tmp_path / "rej"), "--real", str(tmp_path / "real"), "--steps", "1"], capsys)
    with pytest.raises(SystemExit):
        _run(["--data", str(tmp_path / "rej"), "--real", str(tmp_path)], capsys)
    assert "no input/ folder" in capsys.readouterr().err
