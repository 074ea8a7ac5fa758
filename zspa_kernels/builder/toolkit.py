"""The tools a build needs: the CUDA toolkit (also behind a wrapper ``nvcc``), the CUDA
library headers of the pip ``nvidia-*`` wheels, ninja, and the ``-D`` options for CMake."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .errors import CudaToolkitMissing


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


def require_cuda_home() -> Path:
    """:func:`find_cuda_home`, or :class:`CudaToolkitMissing` saying why there is none."""
    if not torch.version.cuda:
        raise CudaToolkitMissing(f"torch {torch.__version__} is a CPU-only build; the CUDA extension needs a CUDA build")
    home = find_cuda_home()
    if home is None:
        raise CudaToolkitMissing("no CUDA toolkit found (no nvcc with include/ next to it); set CUDA_HOME")
    return home


def _nvidia_roots() -> list[Path]:
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    return [Path(p) for p in getattr(nvidia, "__path__", [])]


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the pip ``nvidia-*`` wheels (cuBLAS, cuSPARSE, ...), as torch's CUDA
    wheels lay them out: ``nvidia/cu<major>/include`` (CUDA 13) or ``nvidia/<library>/include``
    (CUDA 12). They also hold the CUDA runtime's own headers, of the wheels' version: see
    :func:`library_headers` for what a build may take from them."""
    major = (torch.version.cuda or "").split(".")[0]
    roots = _nvidia_roots()
    bundled = [str(r / f"cu{major}" / "include") for r in roots if (r / f"cu{major}" / "include").is_dir()]
    if bundled:
        return bundled
    return [str(p) for r in roots for p in sorted(r.glob("*/include")) if p.is_dir()]  # one per library


def library_headers(cuda_home: Path) -> list[str]:
    """Include folders that supply the CUDA library headers the toolkit at ``cuda_home`` lacks.

    ATen's CUDA headers include ``cublas_v2.h`` and ``cusparse.h``, which a bare nvcc toolkit
    may not have; torch's CUDA wheels ship them (:func:`nvidia_wheel_include_dirs`), beside
    copies of the runtime's headers of the wheels' CUDA version. Those copies must never
    shadow the toolkit's: nvcc 13.0 reading a 13.2 wheel's ``cuda_runtime_api.h`` stops at
    CCCL's "CUDA compiler and CUDA toolkit headers are incompatible", and torch allows a
    toolkit whose minor version differs from its wheels'. So the build gets one folder of
    symbolic links to exactly the wheel entries (files and folders, first wheel folder
    first) that ``cuda_home/include`` does not have; everything the toolkit has comes from
    the toolkit. ``[]`` when it lacks nothing. The folder lives in the build cache, named by
    what it links, and is made whole before it is used (a rename), so concurrent builds share it.
    """
    include = cuda_home / "include"
    toolkit = {entry.name for entry in include.iterdir()} if include.is_dir() else set()
    links: dict[str, str] = {}
    for folder in nvidia_wheel_include_dirs():
        for entry in sorted(Path(folder).iterdir()):
            if entry.name not in toolkit:
                links.setdefault(entry.name, str(entry))
    if not links:
        return []
    from .cache import cache_root

    key = hashlib.sha256(json.dumps([str(cuda_home), sorted(links.items())]).encode()).hexdigest()[:16]
    shim = cache_root() / "cuda-library-headers" / key
    if not shim.is_dir():
        shim.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=shim.parent, prefix=f".{key}-"))
        for name, target in links.items():
            (staging / name).symlink_to(target)
        try:
            staging.rename(shim)
        except OSError:  # another build made it meanwhile: the same links
            shutil.rmtree(staging, ignore_errors=True)
    return [str(shim)]


def _wheel_library(pattern: str) -> Optional[str]:
    for root in _nvidia_roots():
        for lib in sorted(root.glob(f"*/lib/{pattern}")):
            return str(lib)
    return None


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


def cmake_args() -> list[str]:
    """``-D`` options for ``CMakeLists.txt``: torch's CMake config, the toolkit, and the CUDA
    library headers (:func:`library_headers`) and ``libnvrtc`` that pip CUDA wheels keep
    outside the toolkit."""
    home = require_cuda_home()
    from torch.utils import cmake_prefix_path

    args = [f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}", f"-DCUDA_TOOLKIT_ROOT_DIR={home}",
            f"-DCMAKE_CUDA_COMPILER={home / 'bin' / 'nvcc'}"]
    includes = library_headers(home)
    if includes:
        args.append("-DZSPA_EXTRA_INCLUDE_DIRS=" + ";".join(includes))
    if not list((home / "lib64").glob("libnvrtc.so*")):
        nvrtc = _wheel_library("libnvrtc.so*")
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args
