"""Where built libraries live, when they are up to date, and the lock between builders.

``ZSPA_CACHE_DIR`` is the root (default ``$XDG_CACHE_HOME/zspa_kernels`` or
``~/.cache/zspa_kernels``; a per-user temp folder when that is not writable). Builders
serialise on an ``fcntl.flock`` of ``build.lock``: the kernel drops it when its holder
dies, so a build killed half way leaves no lock behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import BuildFailed

LOCK_TIMEOUT_S = 3600.0


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            return True
    except OSError:
        return False


def configured_root() -> Path:
    """``ZSPA_CACHE_DIR``, else the user's cache folder (it may not exist or be writable)."""
    configured = os.environ.get("ZSPA_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zspa_kernels"


def fallback_root() -> Path:
    return Path(tempfile.gettempdir()) / f"zspa_kernels-{os.getuid()}"


def cache_root() -> Path:
    """The root to build in: the configured one, or a per-user temp folder when that cannot be written."""
    root = configured_root()
    if _writable_dir(root):
        return root
    fallback = fallback_root()
    if _writable_dir(fallback):
        print(f"zspa: cache folder {root} is not writable, building in {fallback}", file=sys.stderr)
        return fallback
    raise BuildFailed(f"no writable cache folder: tried {root} and {fallback} (set ZSPA_CACHE_DIR)")


def is_up_to_date(library: Path, sources: Path) -> bool:
    """``library`` exists and is newer than every file in the folder ``sources``."""
    if not library.is_file():
        return False
    newest = max(p.stat().st_mtime for p in sources.iterdir() if p.is_file())
    return library.stat().st_mtime >= newest


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock on ``directory`` between processes; released by the kernel on death."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "a+") as handle:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"zspa: waiting for another process building in {directory}", file=sys.stderr)
                    announced = True
                if time.monotonic() > deadline:
                    raise BuildFailed(f"timed out after {timeout:.0f} s waiting for the build lock in {directory}")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
