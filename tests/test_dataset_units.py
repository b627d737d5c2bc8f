"""Dataset factory without servers: annotation, scores, formats, ids, prompts, workflow planning, output folder."""
from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffumatting.factory.jobs import JobError, load_prompts, make_jobs, sample_id
from diffumatting.factory.output import OutputError, OutputFolder
from diffumatting.factory.sample import SampleOptions, build_sample
from diffumatting.models.atomic import temp_name
from diffumatting.models import dataset_quality
from diffumatting.models.dataset_images import composite, contact_sheet, read_png_float
from diffumatting.models.png import encode_png

ROOT = Path(__file__).resolve().parents[1]


def disc(h=64, w=64, cy=32, cx=32, r=14, soft=3.0):
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(yy - cy, xx - cx)
    return np.clip((r - d) / soft + 0.5, 0, 1).astype(np.float32)


def test_trimap_holds_only_three_values_and_band_grows():
    a = disc()
    t2, t6 = dataset_quality.trimap(a, 2), dataset_quality.trimap(a, 6)
    assert set(np.unique(t2)) <= {0, 128, 255} and set(np.unique(t6)) == {0, 128, 255}
    assert (t6 == 128).sum() > (t2 == 128).sum()
    assert t2[32, 32] == 255 and t2[0, 0] == 0
    hard = (disc(soft=0.01) > 0.5).astype(np.float32)  # a hard edge still gets an unknown band
    assert (dataset_quality.trimap(hard, 1) == 128).sum() > 0
    with pytest.raises(ValueError, match="band"):
        dataset_quality.trimap(a, -1)


def test_16bit_png_round_trips_exactly():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 65536, (16, 24)).astype(np.uint16)
    back = read_png_float(encode_png(q / 65535.0, 16), "test")
    assert np.array_equal(np.round(back * 65535).astype(np.uint16), q)
    raw = cv2.imdecode(np.frombuffer(encode_png(q / 65535.0, 16), np.uint8), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16


def test_scores_measure_what_they_name():
    key = np.array(dataset_quality.DEFAULT_KEY, np.float32)
    a = disc()
    rgb = np.where(a[..., None] > 0.5, np.float32([0.8, 0.2, 0.2]), key).astype(np.float32)
    s = dataset_quality.score_sample(rgb, rgb, a)
    assert s["objects"] == 1 and s["border_touch"] == 0.0 and s["green_object"] == 0.0
    assert s["backing_residual"] < 1e-5 and 0.1 < s["coverage"] < 0.3
    assert dataset_quality.reject_reasons(s, dataset_quality.Thresholds()) == []
    two = np.maximum(disc(cx=12, r=8), disc(cx=50, r=8))
    assert dataset_quality.object_count(two) == 2
    edge = disc(cx=2)
    assert dataset_quality.border_touch(edge) > 0.05
    assert dataset_quality.green_object(np.broadcast_to(key, rgb.shape), a) == 1.0
    noisy = rgb + np.float32(0.5) * (a[..., None] < 0.02)
    assert dataset_quality.backing_residual(noisy, a) > 0.5
    reasons = dataset_quality.reject_reasons(dataset_quality.score_sample(rgb, rgb, np.zeros_like(a)),
                                             dataset_quality.Thresholds())
    assert any("empty or tiny" in r for r in reasons)
    mad, iou = dataset_quality.head_agreement(a, a)
    assert mad == 0.0 and iou == 1.0
    assert dataset_quality.head_agreement(np.zeros_like(a), a)[1] == 0.0


def test_perceptual_hash_finds_near_duplicates_only():
    rng = np.random.default_rng(1)
    a = disc(r=20)
    fg = np.clip(rng.random((64, 64, 3)).astype(np.float32), 0, 1)
    fg = cv2.GaussianBlur(fg, (0, 0), 4)
    h1 = dataset_quality.perceptual_hash(fg, a)
    noisy = np.clip(fg + 0.01 * rng.standard_normal(fg.shape).astype(np.float32), 0, 1)
    h2 = dataset_quality.perceptual_hash(noisy, a)
    other = dataset_quality.perceptual_hash(fg, disc(cy=20, cx=44, r=10))
    assert dataset_quality.hamming(h1, h2) <= 4 < dataset_quality.hamming(h1, other)
    assert dataset_quality.nearest_duplicate(f"{h2:016x}", {"x": h1}, 4) == "x"
    assert dataset_quality.nearest_duplicate(f"{other:016x}", {"x": h1}, 4) is None


def _key_pngs(fg_value=0.8, alpha=None):
    a = disc() if alpha is None else alpha
    fg = np.full((*a.shape, 3), fg_value, np.float32)
    key = encode_png(np.concatenate([fg, a[..., None]], -1), 16)
    green = np.where(a[..., None] > 0.5, fg, np.float32(dataset_quality.DEFAULT_KEY))
    return {"key": key, "green": encode_png(np.concatenate([green, np.ones_like(a)[..., None]], -1), 16)}


class _Job:
    id, prompt, seed, index = "mug-1-abc", "a mug", 1, 0


def test_sample_foreground_is_straight_and_alpha_16bit():
    s = build_sample(_Job, _key_pngs(0.8), SampleOptions(trimap_band=3), has_head=False)
    fg = read_png_float(s.files["fg.png"], "fg")
    alpha = cv2.imdecode(np.frombuffer(s.files["alpha.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert alpha.dtype == np.uint16 and alpha.ndim == 2
    soft = (alpha > 0.05 * 65535) & (alpha < 0.5 * 65535)
    assert soft.sum() > 10
    # straight: the colour of semi-transparent pixels is the object's (0.8), not 0.8 * alpha
    assert np.allclose(fg[soft], 0.8, atol=1e-4)
    tri = cv2.imdecode(np.frombuffer(s.files["trimap.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(tri)) == {0, 128, 255}
    assert set(s.files) == {"fg.png", "alpha.png", "trimap.png", "green.png"}


def test_sample_composites_and_assets():
    rng = np.random.default_rng(3)
    bg = [("bg.png", rng.random((80, 100, 3)).astype(np.float32))]
    s = build_sample(_Job, _key_pngs(), SampleOptions(composites=2), False, bg)
    assert {"comp_00.png", "comp_01_alpha.png"} <= set(s.files) and len(s.extra["composites"]) == 2
    comp_a = read_png_float(s.files["comp_00_alpha.png"], "ca")
    assert comp_a.shape == (80, 100) and comp_a.max() > 0.99
    asset = build_sample(_Job, _key_pngs(), SampleOptions(assets=True, asset_padding=2), False)
    img = read_png_float(asset.files["asset.png"], "asset")
    assert img.shape[-1] == 4 and img.shape[0] < 64 and img[0, 0, 3] == 0.0


def test_composite_places_object_inside():
    rng = np.random.default_rng(0)
    a = disc()
    out, oa, where = composite(np.ones((64, 64, 3), np.float32), a, np.zeros((50, 70, 3), np.float32), rng)
    assert out.shape == (50, 70, 3) and oa.shape == (50, 70)
    assert where["x"] + where["w"] <= 70 and where["y"] + where["h"] <= 50
    assert np.allclose(out[..., 0], oa, atol=1e-5)  # white object over black: colour == alpha


def test_contact_sheet_grid_and_reject_frame():
    tiles = [(np.ones((40, 30, 3), np.float32), disc(40, 30, 20, 15, 10))] * 3
    sheet = contact_sheet(tiles, cell=32, marked=[False, True, False])
    assert sheet.shape == (2 * 36 + 4, 2 * 36 + 4, 3)
    assert np.allclose(sheet[3, 45], (0.9, 0.1, 0.1))  # the gap above tile 1 (row 0, col 1) is red
    assert not np.allclose(sheet[3, 9], (0.9, 0.1, 0.1))  # tile 0 is not framed
    with pytest.raises(ValueError, match="no samples"):
        contact_sheet([])


def test_ids_are_deterministic_and_unique():
    jobs = make_jobs(["a mug", "a glass"], 3, base_seed=5)
    again = make_jobs(["a mug", "a glass"], 3, base_seed=5)
    assert [j.id for j in jobs] == [j.id for j in again] and len({j.id for j in jobs}) == 6
    assert make_jobs(["a mug"], 1, base_seed=6)[0].id != jobs[0].id
    assert sample_id("a mug", 1).startswith("a-mug-1-")
    with pytest.raises(JobError, match="distinct seeds"):
        make_jobs(["a"], seeds=[1, 1])


def test_prompt_files_errors_name_the_file(tmp_path):
    binary = tmp_path / "p.bin"
    binary.write_bytes(b"\x00\x01abc")
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing\n\n")
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for path, words in ((binary, "binary"), (empty, "no entries"), (latin, "not UTF-8"),
                        (tmp_path / "missing.txt", "does not exist")):
        with pytest.raises(JobError, match=words) as e:
            load_prompts(path)
        assert str(path) in str(e.value)
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of {thing}\n")
    with pytest.raises(JobError, match=r"\{category\}"):
        load_prompts(None, None, bad)
    assert len(load_prompts()) == 18 and "glass" in " ".join(load_prompts())


def _record(rid, files):
    return {"id": rid, "status": "accepted", "reasons": [], "files": files, "scores": {"phash": "0" * 16}}


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_output_folder_resume_cuts_partial_line_and_temporaries(tmp_path):
    out = tmp_path / "ds"
    f = OutputFolder(out, {"workflow_sha256": "a", "mode": "dataset"})
    f.commit(_record("x1", {"alpha.png": "samples/x1/alpha.png"}), {"alpha.png": b"png"})
    with open(out / "manifest.jsonl", "ab") as fh:
        fh.write(b'{"id": "x2", "fil')  # killed mid-append
    dead = _dead_pid()
    (out / "samples" / "x1" / temp_name("alpha.png", dead)).write_bytes(b"half")  # a killed writer's
    g = OutputFolder(out, {"workflow_sha256": "a", "mode": "dataset"})
    assert list(g.records) == ["x1"]
    assert (out / "manifest.jsonl").read_bytes().count(b"\n") == 1
    assert [p.name for p in out.rglob(".*")] == [], "the killed run's temporary is removed"
    with pytest.raises(OutputError, match="other settings"):
        OutputFolder(out, {"workflow_sha256": "b", "mode": "dataset"})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thing.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        OutputFolder(tmp_path / "busy", {})


def _cli(args, capsys) -> tuple[int, str]:
    """make_dataset.py's main in this process (argparse errors exit 2)."""
    import make_dataset  # the root is on sys.path (conftest appends it)

    try:
        code = make_dataset.main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cli_rejects_bad_input_before_contacting_servers(tmp_path, capsys):
    binary = tmp_path / "p.txt"
    binary.write_bytes(b"\x00\x00")
    cases = [
        (["--prompts", str(binary), "--servers", "http://127.0.0.1:9"], "binary"),
        (["--servers", "127.0.0.1:8188"], "not an http"),
        (["--composites", "2", "--servers", "http://127.0.0.1:9"], "needs --backgrounds"),
        (["--backgrounds", str(tmp_path / "nope"), "--servers", "http://127.0.0.1:9"], "not a folder"),
        (["--backgrounds", str(tmp_path), "--servers", "http://127.0.0.1:9"], "holds no"),
        (["--trimap-band", "-1", "--servers", "http://127.0.0.1:9"], "trimap-band"),
    ]
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"not a png")
    cases.append((["--backgrounds", str(tmp_path / "corrupt"), "--servers", "http://127.0.0.1:9"],
                  "not a readable image"))
    for args, words in cases:
        code, err = _cli(["--out", str(tmp_path / "o"), *args], capsys)
        assert code in (1, 2), (args, err)
        assert words in err, (args, err[-800:])


def test_cli_unreachable_server_is_a_clear_error(tmp_path, capsys):
    from comfy_client import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, err = _cli(["--out", str(tmp_path / "o"), "--servers", url], capsys)
    assert code == 1
    assert "unreachable" in err and url in err
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_widget_defaults_from_object_info():
    from diffumatting.factory.workflow import widget_defaults

    info = {"N": {"input": {"required": {"image": ["IMAGE", {"tooltip": "x"}], "mode": ["COMBO", {"options": ["a", "b"]}],
                                         "old": [["p", "q"], {}], "k": ["FLOAT", {"default": 0.5}]},
                            "optional": {"r": ["COMBO", {"options": ["x", "y"], "default": "y"}],
                                         "alpha": ["MASK", {}]}}}}
    assert widget_defaults(info, "N") == {"mode": "a", "old": "p", "k": 0.5, "r": "y"}
