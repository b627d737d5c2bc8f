"""scripts/gpu_keying_check.py, run on the CPU as its own device: the script the README's GPU row comes from."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_keying_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_check_on_the_cpu_agrees_with_itself(tmp_path):
    made = _run("--make-sample", str(tmp_path))
    assert made.returncode == 0, made.stderr
    r = _run("--sample", str(tmp_path), "--device", "cpu", "--big", "128", "--head-size", "32", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    paths = {row["path"]: row for row in rows if "path" in row}
    assert set(paths) == {"off", "greenpost_refiner"}
    for row in paths.values():
        assert row["max_alpha_diff_vs_cpu"] == 0.0 and row["max_fg_diff_vs_cpu"] == 0.0
        assert row["float16_input_max_diff_vs_fp32_of_same_values"] == 0.0
        assert row["bfloat16_input_max_diff_vs_fp32_of_same_values"] == 0.0
        assert 0 < row["sad_cpu"] == row["sad_device"]
        assert row["device_s_128px"] > 0
    heads = {row["head"]: row for row in rows if "head" in row}
    assert set(heads) == {"float16", "bfloat16"}
    assert all(h["alpha_dtype"] == "float32" and h["max_diff_vs_fp32"] < 1e-2 for h in heads.values())


def test_bad_arguments_are_named(tmp_path):
    r = _run("--sample", str(tmp_path))
    assert r.returncode == 2 and "expected a folder holding photo1024.npy" in r.stderr
    r = _run("--sample", str(tmp_path), "--big", "8")
    assert r.returncode == 2 and "--big 8: expected at least 64" in r.stderr
