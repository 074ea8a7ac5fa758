"""Build and load the C++ extensions of ``csrc/`` on demand (see :mod:`.extension`).

``toolkit`` finds nvcc, the CUDA wheels' headers and ninja; ``arch`` the target GPUs and
their flags; ``cache`` the cache folders and the lock; ``extension`` compiles and loads.
"""
from .arch import arch_list, gencode_flags
from .errors import BuildFailed, CudaToolkitMissing
from .extension import CPU_EXTENSION, CUDA_EXTENSION, Extension, build, is_loaded, load, status
from .toolkit import cmake_args, find_cuda_home

__all__ = ["Extension", "CUDA_EXTENSION", "CPU_EXTENSION", "build", "load", "is_loaded", "status", "cmake_args",
           "find_cuda_home", "arch_list", "gencode_flags", "BuildFailed", "CudaToolkitMissing"]
