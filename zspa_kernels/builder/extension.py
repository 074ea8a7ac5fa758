"""On-demand build and loading of the package's C++ extensions (sources under ``csrc/``).

An :class:`Extension` names a source list (the ``sources.txt`` that CMake reads too) and
says whether it is CUDA (nvcc, architecture flags, a toolkit) or plain C++ (no CUDA at
all). :func:`build` compiles it with ``torch.utils.cpp_extension`` and ninja into a cache
folder keyed by the versions and architectures it is built for (:func:`cache_key`), under a lock; :func:`load` loads it
once per process. A library built ahead of time by ``setup.py`` (``ZSPA_BUILD_EXT=1``)
is loaded instead when present.

Nothing outlives a build call: the ``PATH`` entry for ninja and torch's
``cpp_extension.CUDA_HOME`` are set for the compile only, then restored.
Environment: ``ZSPA_CACHE_DIR`` (see :mod:`.cache`), ``TORCH_CUDA_ARCH_LIST`` (see
:mod:`.arch`), ``MAX_JOBS`` (torch's ninja driver), ``CUDA_HOME``/``CUDA_PATH`` (see :mod:`.toolkit`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..version import __version__
from .arch import arch_list, arch_tag, cpu_tag, gencode_flags
from .cache import build_lock, cache_root, configured_root, fallback_root, is_up_to_date
from .errors import BuildFailed
from .toolkit import library_headers, ninja_path, require_cuda_home

PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Extension:
    name: str                     # the library: <name>.so
    source_list: str              # relative to csrc/: "sources.txt", "cpu/sources.txt"
    cuda: bool                    # nvcc and CUDA flags, per-architecture binaries
    cflags: tuple[str, ...] = ("-O3",)
    ldflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ("-O3", "-lineinfo")
    csrc: Optional[Path] = None   # where the source lists live; default the package's csrc/

    def source_dir(self) -> Path:
        """The folder of the source list: inside the installed package, or beside it in a checkout."""
        roots = [self.csrc] if self.csrc else [PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"]
        for csrc in roots:
            if (csrc / self.source_list).is_file():
                return (csrc / self.source_list).parent
        raise BuildFailed(f"csrc/{self.source_list} not found: this installation does not ship the sources")

    def source_files(self) -> list[Path]:
        """The translation units named in the source list."""
        root = self.source_dir()
        names = [line.strip() for line in (root / Path(self.source_list).name).read_text().splitlines()]
        return [root / name for name in names if name and not name.startswith("#")]

    def targets(self) -> list[str]:
        """GPU architectures to compile for (none for a CPU extension)."""
        return arch_list() if self.cuda else []


CUDA_EXTENSION = Extension("zspa_cuda", "sources.txt", cuda=True)
# The CPU backend's kernels: tuned for the CPU they are built on (AVX-512 or AVX2+F16C dot
# products), at::parallel_for over OpenMP threads.
CPU_EXTENSION = Extension("zspa_cpu", "cpu/sources.txt", cuda=False, cflags=("-O3", "-march=native", "-fopenmp"),
                          ldflags=("-fopenmp",))


def cache_key(ext: Extension, archs: list[str]) -> str:
    """Folder name: the package, torch and torch's CUDA version, and the architectures (the
    CPU's instruction-set flags for a ``-march=native`` build). Not the toolkit that compiled it:
    finding that needs the toolkit, which a machine that only runs a cached build may lack, and
    another nvcc of the same sources gives a binary that runs the same (CUDA's minor-version
    compatibility). After changing toolkits, ``zspa build --force`` recompiles."""
    native = "-march=native" in ext.cflags
    device = f"cuda{torch.version.cuda}-{arch_tag(archs)}" if ext.cuda else ("cpu-" + cpu_tag() if native else "cpu")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{ext.name}-{__version__}-torch{torch.__version__}-{device}")


def library_path(ext: Extension, directory: Path) -> Path:
    return directory / f"{ext.name}.so"


def built_library(ext: Extension, archs: list[str]) -> Optional[Path]:
    """An up-to-date library in the configured root (read-only is fine) or the fallback root."""
    for root in (configured_root(), fallback_root()):
        library = library_path(ext, root / cache_key(ext, archs))
        if is_up_to_date(library, ext.source_dir()):
            return library
    return None


def prebuilt_library(ext: Extension) -> Optional[Path]:
    """A library compiled by ``setup.py`` (``ZSPA_BUILD_EXT=1``) inside the package."""
    found = sorted(PACKAGE_DIR.glob(f"_{ext.name}*.so"))
    return found[0] if found else None


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without the warning about its own CUDA_HOME
    guess (made at import; :func:`_build_environment` replaces it for the compile)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


@contextlib.contextmanager
def _build_environment(cpp_extension, ninja: str, cuda_home: Optional[Path]) -> Iterator[None]:
    """For the compile only: ninja's folder on ``PATH`` (torch runs plain ``ninja``) and torch's
    ``CUDA_HOME`` at the toolkit found here (torch guessed it at import from the ``nvcc`` on
    ``PATH``, which can be a wrapper outside the toolkit). Both are restored afterwards."""
    saved_path, saved_home = os.environ.get("PATH"), cpp_extension.CUDA_HOME
    os.environ["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(ninja), saved_path]))
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = str(cuda_home)
    try:
        yield
    finally:
        if saved_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved_path
        cpp_extension.CUDA_HOME = saved_home


def _compile(ext: Extension, directory: Path, archs: list[str], cuda_home: Optional[Path]) -> None:
    cpp_extension = _cpp_extension()
    ninja = ninja_path()
    if ninja is None:
        raise BuildFailed("ninja not found: pip install ninja")
    # Older torch marks a build in progress by the mere existence of this file, so a
    # killed build leaves it behind forever; under our lock nobody else is building.
    (directory / "lock").unlink(missing_ok=True)
    cuda_options = dict(extra_cuda_cflags=[*ext.cuda_cflags, *gencode_flags(archs)]) if ext.cuda else {}
    try:
        with _build_environment(cpp_extension, ninja, cuda_home):
            cpp_extension.load(
                name=ext.name,
                sources=[str(s) for s in ext.source_files()],
                extra_cflags=list(ext.cflags),
                extra_ldflags=list(ext.ldflags),
                extra_include_paths=[str(ext.source_dir()), *(library_headers(cuda_home) if ext.cuda else [])],
                build_directory=str(directory),
                with_cuda=ext.cuda,
                is_python_module=False,
                verbose=False,
                **cuda_options,
            )
    except Exception as exc:  # noqa: BLE001 - torch raises bare RuntimeError/CalledProcessError
        raise BuildFailed(f"compiling csrc/{ext.source_list} failed in {directory}:\n{exc}") from exc


def build(ext: Extension = CUDA_EXTENSION, force: bool = False) -> Path:
    """Compile ``ext`` if needed; return the path of the shared library.

    Raises :class:`.CudaToolkitMissing` when a CUDA extension has no toolkit (or torch is
    a CPU-only build), :class:`.BuildFailed` when compiling fails.
    """
    cuda_home = require_cuda_home() if ext.cuda else None
    archs = ext.targets()
    if not force:
        found = built_library(ext, archs)
        if found:
            return found
    directory = cache_root() / cache_key(ext, archs)
    with build_lock(directory):
        if force or not is_up_to_date(library_path(ext, directory), ext.source_dir()):  # maybe built meanwhile
            _cpp_extension()  # import first: nothing may print inside the one-line message
            start = time.perf_counter()
            what = f"the CUDA kernels for {', '.join(archs)}" if ext.cuda else f"the {ext.name} kernels"
            print(f"zspa: compiling {what} into {directory} ...", end="", file=sys.stderr, flush=True)
            try:
                _compile(ext, directory, archs, cuda_home)
            except BaseException:
                print(" failed", file=sys.stderr, flush=True)
                raise
            print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return library_path(ext, directory)


def status(ext: Extension = CUDA_EXTENSION) -> str:
    """One line for ``zspa info``: is ``ext`` compiled, and where (never builds)."""
    prebuilt = prebuilt_library(ext)
    if prebuilt:
        return f"compiled ahead of time ({prebuilt})"
    if ext.cuda:
        try:
            require_cuda_home()
        except Exception:  # noqa: BLE001 - CudaToolkitMissing, with its reason
            return "no CUDA toolkit found (falls back to triton)"
    try:
        built = built_library(ext, ext.targets())
    except BuildFailed as exc:  # e.g. a malformed TORCH_CUDA_ARCH_LIST, or no sources shipped
        return f"cannot build: {exc}"
    if built:
        return f"compiled ({built})"
    if ext.cuda:
        return "not compiled yet (`zspa build`, or the first call, compiles it)"
    return "not compiled yet (the first call compiles it, about 20 s)"


_loaded: dict[str, Path] = {}  # extension name -> library loaded into this process


def load(ext: Extension = CUDA_EXTENSION) -> Path:
    """Build if needed and load ``ext`` once per process (registering its ops)."""
    if ext.name not in _loaded:
        path = prebuilt_library(ext) or build(ext)
        torch.ops.load_library(str(path))
        _loaded[ext.name] = path
    return _loaded[ext.name]


def is_loaded(ext: Extension = CUDA_EXTENSION) -> bool:
    return ext.name in _loaded
