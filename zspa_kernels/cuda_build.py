"""On-demand build of the ``csrc/`` CUDA extension (``zspa::select_tokens_cuda``).

First use (or ``zspa build``) compiles the sources listed in ``csrc/sources.txt``
with ``torch.utils.cpp_extension`` and ninja into a cache directory keyed by
package version, torch version, CUDA version and target architectures; later
processes only load the library. A library built ahead of time by ``setup.py``
(``ZSPA_BUILD_EXT=1``) is loaded instead when present.

Environment:
  ``ZSPA_CACHE_DIR``          cache root (default ``$XDG_CACHE_HOME/zspa_kernels`` or
                              ``~/.cache/zspa_kernels``; a temp folder if that is not writable);
  ``TORCH_CUDA_ARCH_LIST``    target architectures, e.g. ``"8.0;9.0a"`` (default: the
                              visible GPUs, else :data:`DEFAULT_ARCHS`);
  ``MAX_JOBS``                parallel compile jobs (read by torch's ninja driver);
  ``CUDA_HOME``/``CUDA_PATH`` the toolkit (default: found from ``nvcc``, see
                              :func:`find_cuda_home`).

Concurrency: builders serialise on an ``fcntl.flock`` of ``build.lock`` in the cache
directory. The kernel drops the lock when its holder dies, so a build killed half
way leaves no lock behind that could block the next one.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from .version import __version__

EXTENSION_NAME = "zspa_cuda"
DEFAULT_ARCHS = "8.0;9.0"  # A100 and H100 class GPUs, used when no GPU is visible
LOCK_TIMEOUT_S = 3600.0
_ARCH = re.compile(r"^(\d+)\.(\d+)(a?)(\+PTX)?$")


class CudaToolkitMissing(RuntimeError):
    """No usable nvcc/CUDA toolkit (or torch is a CPU-only build): the extension cannot be built."""


class BuildFailed(RuntimeError):
    """The toolkit is there but compiling ``csrc/`` failed."""


def source_dir() -> Path:
    """``csrc/``: inside the installed package, or beside it in a source checkout."""
    for candidate in (Path(__file__).parent / "csrc", Path(__file__).parent.parent / "csrc"):
        if (candidate / "sources.txt").is_file():
            return candidate
    raise BuildFailed("csrc/sources.txt not found: this installation does not ship the CUDA sources")


def source_files() -> list[Path]:
    """The translation units named in ``csrc/sources.txt`` (the list CMake reads too)."""
    root = source_dir()
    names = [line.strip() for line in (root / "sources.txt").read_text().splitlines()]
    return [root / name for name in names if name and not name.startswith("#")]


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _toolkit_of_nvcc(nvcc: str) -> Optional[Path]:
    """The toolkit an ``nvcc`` belongs to, also when it is a wrapper script or a symlink."""
    real = Path(os.path.realpath(nvcc)).parent.parent
    if _is_toolkit(real):
        return real
    try:  # a wrapper: ask the real nvcc where it lives (it prints TOP=<toolkit>/bin/..)
        dry = subprocess.run([nvcc, "--dryrun", "-c", "zspa_probe.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if match:
        top = Path(os.path.realpath(match.group(1).strip()))
        if _is_toolkit(top):
            return top
    return None


def find_cuda_home() -> Optional[Path]:
    """The CUDA toolkit folder (with ``bin/nvcc`` and ``include/``), or None.

    Order: ``CUDA_HOME``/``CUDA_PATH``, the toolkit of the ``nvcc`` on ``PATH``
    (following symlinks and wrapper scripts), then ``/usr/local/cuda-<torch's CUDA>``
    and ``/usr/local/cuda``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            home = Path(value)
            if _is_toolkit(home):
                return home
            if (home / "bin" / "nvcc").is_file():
                return _toolkit_of_nvcc(str(home / "bin" / "nvcc"))
            return None  # set explicitly to something else: do not guess past the user
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home:
            return home
    for home in (Path(f"/usr/local/cuda-{torch.version.cuda}"), Path("/usr/local/cuda")):
        if torch.version.cuda and _is_toolkit(home):
            return home
    return None


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the pip ``nvidia-*`` wheels (cuBLAS, cuSPARSE, ...).

    ATen's CUDA headers include ``cublas_v2.h`` and ``cusparse.h``, which a bare nvcc
    toolkit may lack; torch's CUDA wheels ship them under ``nvidia/cu<major>/include``
    (CUDA 13) or ``nvidia/<library>/include`` (CUDA 12).
    """
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    roots = [Path(p) for p in getattr(nvidia, "__path__", [])]
    bundled = [str(r / f"cu{major}" / "include") for r in roots if (r / f"cu{major}" / "include").is_dir()]
    if bundled:
        return bundled
    return [str(p) for r in roots for p in sorted(r.glob("*/include")) if p.is_dir()]  # one per library


def _wheel_library(pattern: str) -> Optional[str]:
    try:
        import nvidia
    except ImportError:
        return None
    for root in map(Path, getattr(nvidia, "__path__", [])):
        for lib in sorted(root.glob(f"*/lib/{pattern}")):
            return str(lib)
    return None


def cmake_args() -> list[str]:
    """``-D`` options for ``CMakeLists.txt``: torch's CMake config, the toolkit, and the CUDA
    headers and ``libnvrtc`` that pip CUDA wheels keep outside the toolkit."""
    home = find_cuda_home()
    if home is None:
        raise CudaToolkitMissing("no CUDA toolkit found (no nvcc with include/ next to it); set CUDA_HOME")
    from torch.utils import cmake_prefix_path

    args = [f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}", f"-DCUDA_TOOLKIT_ROOT_DIR={home}",
            f"-DCMAKE_CUDA_COMPILER={home / 'bin' / 'nvcc'}"]
    includes = nvidia_wheel_include_dirs()
    if includes:
        args.append("-DZSPA_EXTRA_INCLUDE_DIRS=" + ";".join(includes))
    if not list((home / "lib64").glob("libnvrtc.so*")):
        nvrtc = _wheel_library("libnvrtc.so*")
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


def arch_list() -> list[str]:
    """Target architectures: ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs, else the default."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not spec:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            spec = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
        else:
            spec = DEFAULT_ARCHS
    archs = [a for a in re.split(r"[;\s]+", spec) if a]
    for arch in archs:
        if not _ARCH.match(arch):
            raise BuildFailed(f"TORCH_CUDA_ARCH_LIST: expected entries like 8.0, 9.0a or 9.0+PTX, got {arch!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: SASS per arch, plus PTX for ``+PTX`` entries."""
    flags = []
    for arch in archs:
        major, minor, suffix, ptx = _ARCH.match(arch).groups()
        sm = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


def _arch_tag(archs: list[str]) -> str:
    return "-".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)


def cache_key(archs: list[str]) -> str:
    """Folder name that changes with every input that changes the binary."""
    key = f"{__version__}-torch{torch.__version__}-cuda{torch.version.cuda}-{_arch_tag(archs)}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", key)


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


def built_library(archs: list[str]) -> Optional[Path]:
    """An up-to-date library in the configured root (read-only is fine) or the fallback root."""
    for root in (configured_root(), fallback_root()):
        if is_up_to_date(root / cache_key(archs)):
            return library_path(root / cache_key(archs))
    return None


def library_path(directory: Path) -> Path:
    return directory / f"{EXTENSION_NAME}.so"


def is_up_to_date(directory: Path) -> bool:
    """The library exists and is newer than every file in ``csrc/``."""
    lib = library_path(directory)
    if not lib.is_file():
        return False
    newest = max(p.stat().st_mtime for p in source_dir().iterdir() if p.is_file())
    return lib.stat().st_mtime >= newest


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


def prebuilt_library() -> Optional[Path]:
    """A library compiled by ``setup.py`` (``ZSPA_BUILD_EXT=1``) next to this module."""
    found = sorted(Path(__file__).parent.glob(f"_{EXTENSION_NAME}*.so"))
    return found[0] if found else None


def ninja_path() -> Optional[str]:
    """The ninja on PATH, else the one of the pip ``ninja`` package (in a venv's bin/, which
    is not on PATH when the venv's python is run without activating it)."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    return shutil.which("ninja", path=ninja.BIN_DIR)


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without the warning about its own CUDA_HOME
    guess (made at import; :func:`_compile` replaces it with :func:`find_cuda_home`'s)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _compile(directory: Path, archs: list[str], cuda_home: Path) -> None:
    cpp_extension = _cpp_extension()
    ninja = ninja_path()
    if ninja is None:
        raise BuildFailed("ninja not found: pip install ninja")
    if shutil.which("ninja") is None:  # torch runs plain `ninja`
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(ninja), os.environ.get("PATH", "")])

    # torch picks CUDA_HOME once at import, from the nvcc on PATH, which can be a
    # wrapper outside the toolkit: point it at the toolkit found here.
    cpp_extension.CUDA_HOME = str(cuda_home)
    # Older torch marks a build in progress by the mere existence of this file, so a
    # killed build leaves it behind forever; under our lock nobody else is building.
    (directory / "lock").unlink(missing_ok=True)
    sources = source_files()
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", *gencode_flags(archs)],
            extra_include_paths=[str(source_dir()), *nvidia_wheel_include_dirs()],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - torch raises bare RuntimeError/CalledProcessError
        raise BuildFailed(f"compiling csrc/ failed in {directory}:\n{exc}") from exc


def build(force: bool = False) -> Path:
    """Compile the extension if needed; return the path of the shared library.

    Raises :class:`CudaToolkitMissing` when no toolkit (or a CPU-only torch) is found,
    :class:`BuildFailed` when compiling fails.
    """
    if not torch.version.cuda:
        raise CudaToolkitMissing(f"torch {torch.__version__} is a CPU-only build; the CUDA extension needs a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise CudaToolkitMissing("no CUDA toolkit found (no nvcc with include/ next to it); set CUDA_HOME")
    archs = arch_list()
    if not force and built_library(archs):
        return built_library(archs)
    directory = cache_root() / cache_key(archs)
    with build_lock(directory):
        if force or not is_up_to_date(directory):  # another process may have built it meanwhile
            _cpp_extension()  # import first: nothing may print inside the one-line message
            start = time.perf_counter()
            print(f"zspa: compiling the CUDA kernels for {', '.join(archs)} into {directory} ...",
                  end="", file=sys.stderr, flush=True)
            try:
                _compile(directory, archs, cuda_home)
            except BaseException:
                print(" failed", file=sys.stderr, flush=True)
                raise
            print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return library_path(directory)


def status() -> str:
    """One line for ``zspa info``: is the extension compiled, and where (never builds)."""
    prebuilt = prebuilt_library()
    if prebuilt:
        return f"compiled ahead of time ({prebuilt})"
    if not torch.version.cuda or find_cuda_home() is None:
        return "no CUDA toolkit found (falls back to triton)"
    try:
        built = built_library(arch_list())
    except BuildFailed as exc:  # e.g. a malformed TORCH_CUDA_ARCH_LIST
        return f"cannot build: {exc}"
    if built:
        return f"compiled ({built})"
    return "not compiled yet (`zspa build`, or the first call, compiles it)"


def load() -> Path:
    """Build if needed and load the library once; registers ``zspa::select_tokens_cuda``."""
    if is_loaded():
        return _loaded[0]
    path = prebuilt_library() or build()
    torch.ops.load_library(str(path))
    _loaded.append(path)
    return path


def is_loaded() -> bool:
    return bool(_loaded)


_loaded: list[Path] = []
