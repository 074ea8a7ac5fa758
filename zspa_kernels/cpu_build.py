"""On-demand build of the CPU kernels (``csrc/cpu/``): ``zspa::cpu_unit_tokens``, ``zspa::cpu_greedy``.

Compiled once per machine with ``-march=native`` (AVX-512 or AVX2+F16C dot products) into the
same cache root and under the same lock as the CUDA extension (:mod:`.cuda_build`); the
folder name carries the package and torch versions and a hash of the CPU's feature flags,
so a cache shared between different CPUs never loads a library built for another one.
Compiling prints one line on stderr (tens of seconds); later processes only load it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from . import __version__, cuda_build

EXTENSION_NAME = "zspa_cpu"


def _sources() -> list[Path]:
    return sorted((cuda_build.source_dir() / "cpu").glob("*.cpp"))


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _folder_name() -> str:
    return f"{EXTENSION_NAME}-{__version__}-torch{torch.__version__}-{_cpu_tag()}"


def status() -> str:
    """One line for ``zspa info`` (never builds)."""
    for root in (cuda_build.configured_root(), cuda_build.fallback_root()):
        library = root / _folder_name() / f"{EXTENSION_NAME}.so"
        if library.is_file() and library.stat().st_mtime >= max(s.stat().st_mtime for s in _sources()):
            return f"compiled ({library})"
    return "not compiled yet (the first call compiles it, about 20 s)"


def load_cpu_extension() -> None:
    """Build if needed, then load: the one function that knows how the CPU kernels are built.
    Raises :class:`cuda_build.BuildFailed` when no compiler or ninja can build them."""
    if hasattr(torch.ops.zspa, "cpu_greedy"):
        return
    directory = cuda_build.cache_root() / _folder_name()
    library = directory / f"{EXTENSION_NAME}.so"
    sources = _sources()
    if not library.is_file() or library.stat().st_mtime < max(s.stat().st_mtime for s in sources):
        with cuda_build.build_lock(directory):
            if not library.is_file() or library.stat().st_mtime < max(s.stat().st_mtime for s in sources):
                cpp_extension = cuda_build._cpp_extension()
                ninja = cuda_build.ninja_path()
                if ninja is None:
                    raise cuda_build.BuildFailed("ninja not found: pip install ninja")
                if shutil.which("ninja") is None:  # torch runs plain `ninja`
                    os.environ["PATH"] = os.pathsep.join([os.path.dirname(ninja), os.environ.get("PATH", "")])
                (directory / "lock").unlink(missing_ok=True)  # see cuda_build._compile
                print(f"zspa: compiling the CPU kernels (once per machine) into {directory} ...",
                      end="", file=sys.stderr, flush=True)
                start = time.perf_counter()
                try:
                    cpp_extension.load(name=EXTENSION_NAME, sources=[str(s) for s in sources],
                                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                       extra_ldflags=["-fopenmp"], build_directory=str(directory),
                                       is_python_module=False, verbose=False)
                except Exception as exc:  # noqa: BLE001 - torch raises bare RuntimeError/CalledProcessError
                    print(" failed", file=sys.stderr, flush=True)
                    raise cuda_build.BuildFailed(f"compiling csrc/cpu failed in {directory}:\n{exc}") from exc
                print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if not hasattr(torch.ops.zspa, "cpu_greedy"):
        torch.ops.load_library(str(library))
