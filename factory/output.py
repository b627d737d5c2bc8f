"""The dataset folder: manifest (JSONL, one line per finished id), resume, atomic samples, rejects.

Layout (dataset mode):
    OUT/run.json                the run's settings (a resume must use the same workflow and mode)
    OUT/manifest.jsonl          one JSON object per line, one line per id
    OUT/samples/<id>/           fg.png (16-bit RGB, straight, despilled), alpha.png (16-bit), trimap.png,
                                green.png (the green original), head_alpha.png, comp_XX(.png|_alpha.png)
    OUT/rejected/<id>/          the same files, plus reason.txt
    OUT/contact_sheet.png       accepted samples over a checkerboard
Asset mode: OUT/<prompt words>-<n>.png (trimmed RGBA) instead of samples/<id>/, rejects in OUT/rejected/.

A sample's files are written all-or-nothing (models/atomic.write_all_atomic), then its manifest line is
appended and fsync'ed: a crash between the two leaves files without a line, which a resume redoes and
replaces. A partial last line (killed mid-append) is cut off on resume; a killed run's temporaries are removed.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ..models.atomic import clean_stale_temporaries, write_all_atomic, write_bytes_atomic

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
SHEET = "contact_sheet.png"
# Settings that must match for a resume to add to the same dataset.
RUN_KEYS = ("workflow_sha256", "mode", "trimap_band", "composites")


class OutputError(RuntimeError):
    """The output folder cannot be used or written (full disk, other run's folder)."""


def disk_error(e: OSError, path) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"the output disk is full writing {path}: free space or choose another --out; "
                           f"finished samples are kept, run the same command again to resume")
    return OutputError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and free space")


class OutputFolder:
    def __init__(self, root: Path, run_info: dict, assets: bool = False):
        self.root = Path(root)
        self.assets = assets
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"--out {self.root} is a file; give a folder (new or from an earlier run)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_run(run_info)
            self._remove_temporaries()
        except OSError as e:
            raise disk_error(e, self.root) from None
        self.records: dict[str, dict] = {}
        self._load_manifest()

    # --- setup -------------------------------------------------------------------------------------
    def _check_run(self, info: dict) -> None:
        path = self.root / RUN_FILE
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [k for k in RUN_KEYS if old.get(k) != info.get(k)]
            if diff:
                raise OutputError(f"{self.root} holds a run made with other settings ({', '.join(diff)} differ); "
                                  f"use a new --out folder, or the earlier workflow and settings to resume it")
            return
        if any(p for p in self.root.iterdir() if not p.name.startswith(".")):
            raise OutputError(f"{self.root} is not empty and has no {RUN_FILE}; give a new or empty folder")
        write_bytes_atomic(path, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())

    def _remove_temporaries(self) -> None:
        """Remove temporaries a killed run left (models/atomic: those whose writing process is gone)."""
        for folder in (self.root, self.root / "samples", self.root / "rejected"):
            if not folder.is_dir():
                continue
            for dirpath, _, _ in os.walk(folder):
                clean_stale_temporaries(dirpath)

    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.is_file():
            return
        raw = path.read_bytes()
        keep = raw[:raw.rfind(b"\n") + 1]  # a line cut by a crash has no newline: drop it
        lines, dropped = [], 0
        for line in keep.splitlines():
            rec = json.loads(line)
            if rec["id"] in self.records:
                raise OutputError(f"{path} lists id {rec['id']} twice; it was edited by hand, fix it")
            if all((self.root / f).is_file() for f in rec["files"].values()):
                self.records[rec["id"]] = rec
                lines.append(line)
            else:
                dropped += 1
        if dropped or len(keep) != len(raw):
            write_bytes_atomic(path, b"".join(line + b"\n" for line in lines))

    # --- per sample ----------------------------------------------------------------------------------
    def place(self, job, rejected: bool, asset_name: str | None = None) -> Path:
        base = self.root / "rejected" if rejected else self.root
        if self.assets:
            return base
        return base / ("" if rejected else "samples") / job.id

    def file_names(self, job, names: list[str], rejected: bool, asset_name: str | None) -> dict[str, str]:
        """Sample-relative name -> path relative to the root."""
        place = self.place(job, rejected)
        out = {}
        for n in names:
            target = place / (f"{asset_name}.png" if n == "asset.png" else n)
            out[n] = target.relative_to(self.root).as_posix()
        return out

    def commit(self, record: dict, files: dict[str, bytes]) -> None:
        """Write the sample's files (all or none), then its manifest line."""
        pairs = [(self.root / record["files"][n], data) for n, data in files.items()]
        reasons = record.get("reasons")
        if record["status"] == "rejected" and not self.assets:
            pairs.append((self.root / "rejected" / record["id"] / "reason.txt",
                          ("\n".join(reasons) + "\n").encode()))
        try:
            write_all_atomic(pairs)
            line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
            with open(self.root / MANIFEST, "ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise disk_error(e, pairs[0][0] if pairs else self.root / MANIFEST) from None
        self.records[record["id"]] = record
