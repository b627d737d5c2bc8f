"""A tiny tmpfs, for tests of what a full output disk does (mounting needs root; skipped otherwise)."""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` (e.g. "48k") at `path` (created) for the block; skip the test when that fails."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
