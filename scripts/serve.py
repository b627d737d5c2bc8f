"""`make serve`: the dev host's ComfyUI with the pack on http://127.0.0.1:8188 until interrupted."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / ".host" / "ComfyUI"

if __name__ == "__main__":
    args = [sys.executable, str(HOST / "main.py"), "--listen", "127.0.0.1", "--port",
            os.environ.get("PORT", "8188"), "--disable-auto-launch"]
    if shutil.which("nvidia-smi") is None:
        args.append("--cpu")
    os.chdir(HOST)
    os.execv(sys.executable, args)
