"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

Temporaries are hidden files named `.<target>.~<pid>.<random><suffix>`. New files get the mode a plain
`open(path, "w")` would give (0666 minus the umask); a replaced file keeps its own mode. A writer killed
with SIGKILL cannot remove its temporary: the next atomic write into the same folder removes the
temporaries whose writing process no longer runs (`clean_stale_temporaries`).
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path

_TEMP_RE = re.compile(r"^\..+\.~(\d+)\.[0-9a-f]{12}(\.[A-Za-z0-9]{1,16})?$")
STALE_AFTER_S = 24 * 3600  # a temporary this old is stale even if its pid runs again (pid reuse)


NAME_MAX = 255  # bytes in a file name on common file systems


def temp_name(target_name: str, pid: int, suffix: str = ".tmp") -> str:
    """The hidden temporary's name for `target_name`, written by process `pid` (the target's name is cut
    short when needed, so the temporary's name fits wherever the target's fits)."""
    tail = f".~{int(pid)}.{secrets.token_hex(6)}{suffix}"
    base = target_name
    while base and len(f".{base}{tail}".encode("utf-8", "surrogatepass")) > NAME_MAX:
        base = base[:-1]
    return f".{base}{tail}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove this module's temporaries in `folder` whose writer is gone; returns the removed paths."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if old or not _pid_running(pid):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _prepare_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder)


def _create_temp(target: Path, suffix: str) -> tuple[int, Path]:
    """An open, new, empty temporary beside `target` (mode 0666 minus the umask, or the target's mode)."""
    while True:
        tmp = target.parent / temp_name(target.name, os.getpid(), suffix)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))  # replacing: keep the file's own mode
    except FileNotFoundError:
        pass
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd, tmp


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `target`; on success it is renamed to `target`, on error removed."""
    target = Path(target)
    _prepare_folder(target.parent)
    fd, tmp = _create_temp(target, suffix or target.suffix or ".tmp")
    os.close(fd)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)      # writers that recreate the file (safetensors' save_file: 0600) get the mode back
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_all_atomic(files: list[tuple[str | os.PathLike, bytes]]) -> list[Path]:
    """Write every (path, data) pair or none of them.

    All data goes to temporaries beside their targets first; only when every write succeeded are they
    renamed into place. On any error the temporaries, and targets already renamed, are removed.
    """
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    for folder in dict.fromkeys(Path(target).parent for target, _ in files):
        _prepare_folder(folder)
    try:
        for target, data in files:
            target = Path(target)
            fd, tmp = _create_temp(target, ".tmp")
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        for tmp, target in staged:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for target in placed:
            target.unlink(missing_ok=True)
        raise
    return placed
