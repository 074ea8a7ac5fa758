"""Target GPU architectures and the nvcc flags for them."""
from __future__ import annotations

import hashlib
import os
import platform
import re

import torch

from .errors import BuildFailed

DEFAULT_ARCHS = "8.0;9.0"  # A100 and H100 class GPUs, used when no GPU is visible
_ARCH = re.compile(r"^(\d+)\.(\d+)(a?)(\+PTX)?$")


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


def arch_tag(archs: list[str]) -> str:
    """``sm80-sm90a-sm90ptx``: the architectures in a folder name."""
    return "-".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)


def cpu_tag() -> str:
    """A hash of this CPU's architecture and feature flags: a library compiled with
    ``-march=native`` is only loaded on a CPU with the same features."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]
